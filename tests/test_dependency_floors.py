"""The version floors in pyproject.toml are what CI installs for `make test-floors`: every direct
dependency has one, and .ci/lowest_constraints.py pins each to it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def floors():
    spec = importlib.util.spec_from_file_location(
        "lowest_constraints", REPO / ".ci" / "lowest_constraints.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_direct_dependency_is_pinned_to_its_floor(floors):
    requirements = floors.direct_requirements()
    pins = dict(floors.floor_pin(r).split("==") for r in requirements)
    assert len(pins) == len(requirements)
    # the floors the code needs (get_total_norm; dtype= in from_pretrained; MLflow 3's logged models)
    assert (
        pins["torch"] == "2.7"
        and pins["deepspeed"] == "0.18"
        and pins["transformers"] == "4.56"
        and pins["mlflow"] == "3.11.1"
    )


def test_a_dependency_without_a_floor_is_refused(floors, tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["numpy>=1.26", "tqdm<5"]\n')
    assert floors.floor_pin("numpy >=1.26,<3") == "numpy==1.26"
    assert floors.floor_pin("transformers[torch]>=4.56,<6") == "transformers==4.56"
    with pytest.raises(SystemExit, match="'tqdm<5' has no >= floor"):
        [floors.floor_pin(r) for r in floors.direct_requirements(pyproject)]

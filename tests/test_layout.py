"""The layout tells the truth about the architecture: the model package is a leaf, data and evaluation
know nothing of training, files and functions stay small, and every write goes through spanqa.io."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "spanqa"
MAX_FILE_LINES = 450  # the CRF (one algorithm, one file) is the exception
MAX_FUNCTION_LINES = 60


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved against the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[: -node.level])
                found.add(f"{base}.{node.module}" if node.module else base)
            else:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def spanqa_imports(path: Path) -> set[str]:
    return {name for name in imported_modules(path) if name == "spanqa" or name.startswith("spanqa.")}


def sources(*parts: str) -> list[Path]:
    return sorted(PACKAGE.joinpath(*parts).rglob("*.py"))


@pytest.mark.parametrize("path", sources("model"), ids=lambda p: p.name)
def test_the_model_package_is_a_leaf(path):
    outside = {name for name in spanqa_imports(path) if not name.startswith("spanqa.model")}
    assert not outside, (
        f"{path.name} imports {sorted(outside)}: spanqa.model may import only torch, transformers"
    )


@pytest.mark.parametrize("path", sources("data") + sources("eval"), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_data_and_eval_import_nothing_of_training(path):
    forbidden = ("spanqa.train", "spanqa.cli")
    bad = {name for name in spanqa_imports(path) if name.startswith(forbidden)}
    assert not bad, f"{path} imports {sorted(bad)}"


def test_the_layering_test_can_fail(tmp_path):
    """A file that breaks the rule is caught (so the tests above are not vacuous)."""
    bad = tmp_path / "bad.py"
    bad.write_text("from spanqa.eval.candidates import WindowCandidates\nimport spanqa.train.trainer\n")
    assert spanqa_imports(bad) >= {"spanqa.eval.candidates", "spanqa.train.trainer"}


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_and_functions_stay_small(path):
    lines = len(path.read_text().splitlines())
    if path.name != "crf.py":
        assert lines <= MAX_FILE_LINES, f"{path}: {lines} lines"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path}: {node.name} has {length} lines"


HAND_MADE_WRITES = re.compile(
    r"os\.replace\(|os\.rename\(|mkdtemp\(|mkstemp\(|(?<!\bio)\.write_(text|bytes)\("
)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_hand_made_atomic_writes_outside_spanqa_io(path):
    """Files that replace others go through spanqa.io (atomic, with the umask's modes): no module
    renames temporaries or writes whole files by hand."""
    if path.name == "io.py":
        return
    for number, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#")[0]
        assert not HAND_MADE_WRITES.search(code), f"{path}:{number}: {line.strip()}"

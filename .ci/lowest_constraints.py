"""Print pip constraints that pin every direct dependency of spanqa to its floor.

    python3 .ci/lowest_constraints.py > constraints.txt
    pip install -c constraints.txt torch && pip install -c constraints.txt -e '.[dev]'

installs the lowest versions pyproject.toml allows (its `dependencies` and the `dev` extra), which is
what `make test-floors` tests. A dependency without a `>=` floor is refused: a floor nobody tests is a
guess. Standard library only (tomllib), so it runs before any venv exists.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def direct_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    return [*project["dependencies"], *project.get("optional-dependencies", {}).get("dev", [])]


def floor_pin(requirement: str) -> str:
    """'torch>=2.6' -> 'torch==2.6'; SystemExit naming a requirement without a floor."""
    match = REQUIREMENT.match(requirement)
    floors = re.findall(r">=\s*([0-9][^,;\s]*)", match.group(3)) if match else []
    if not floors:
        raise SystemExit(f"{PYPROJECT}: {requirement!r} has no >= floor")
    return f"{match.group(1)}=={floors[0]}"


def main() -> int:
    print("\n".join(floor_pin(requirement) for requirement in direct_requirements()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

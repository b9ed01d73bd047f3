"""The README cannot drift from the code: its commands name real targets, sub-commands and flags,
its flags table is the one the config makes, CI runs its test command, and `make demo` is the command the
install test runs."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

from runs import DEMO_SMOKE_FLAGS

from spanqa.cli import COMMANDS
from spanqa.config import build_parser, flags_table

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
TRAIN_SCRIPTS = ("launcher/train.py", "slurm/train.sbatch", "slurm/compare.sbatch")


def readme_commands() -> list[list[str]]:
    """Every command in the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def flags_of(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if w.startswith("--")]


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), flags=re.M))


@cache
def subcommand_help(name: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "spanqa.cli", name, "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_two_commands_are_make_targets_and_ci_runs_the_test_command():
    two = README.split("## Two commands", 1)[1].split("##", 1)[0]
    assert "make demo" in two and "make test" in two
    assert {"demo", "test", "test-fast", "install", "lint"} <= make_targets()
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M), ci


def test_every_readme_command_names_real_targets_subcommands_and_flags():
    train_flags = {f for action in build_parser()._actions for f in action.option_strings}
    checked = 0
    for words in readme_commands():
        program = Path(words[0]).name
        if program == "make":
            assert set(words[1:]) - {w for w in words[1:] if "=" in w} <= make_targets(), words
        elif program == "spanqa":
            assert words[1] in COMMANDS, words
            usage = subcommand_help(words[1])
            for flag in flags_of(words[2:]):
                assert flag in usage, f"{flag} is not a flag of `spanqa {words[1]}`: {words}"
        else:
            script = next((i for i, w in enumerate(words) if w in TRAIN_SCRIPTS), None)
            if script is None:
                continue  # mlflow, export, sbatch options of other tools
            assert (REPO / words[script]).is_file(), words
            own = {"--seeds"} if words[script] == "slurm/compare.sbatch" else set()  # the array's own flag
            unknown = set(flags_of(words[script + 1 :])) - train_flags - own
            assert not unknown, f"not training flags: {sorted(unknown)} in {words}"
        checked += 1
    assert checked >= 10  # the README's recipes were found


def test_the_flags_table_is_the_one_the_config_makes():
    assert flags_table() in README, "README's flags table is stale: paste spanqa.config.flags_table()"


def test_the_readme_names_only_shipped_deepspeed_configs():
    for name in set(re.findall(r"\b(\w+\.json)\b", README)):
        if re.match(r"(fp16|bf16|cpu)_", name):
            assert (REPO / "ds_configs" / name).is_file(), name


def test_make_demo_is_the_spanqa_demo_command_the_install_test_runs(tmp_path):
    """`make demo` runs one command, `spanqa demo`, with DEMO_DIR and DEMO_FLAGS passed through: that
    command, run from an installed wheel outside the checkout, is tests/test_install.py's demo test (it
    checks the figures the README shows), so the demo trains once in the suite, not twice."""
    out, flags = tmp_path / "demo", " ".join(DEMO_SMOKE_FLAGS)
    dry_run = ["make", "-n", "--no-print-directory", "-o", "install", "demo", f"DEMO_DIR={out}"]
    under_make = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")  # `make test`'s own, which would change the output
    alone = {k: v for k, v in os.environ.items() if k not in under_make}
    done = subprocess.run(
        [*dry_run, f"DEMO_FLAGS={flags}"], cwd=REPO, env=alone, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f".venv/bin/spanqa demo --output_dir {out} -- {flags}"]

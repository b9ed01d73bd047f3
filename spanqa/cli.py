"""The `spanqa` console script: one sub-command per job, each implemented by a module's `main(argv)`.

Sub-commands import their module only when run, so `spanqa evaluate` never pays for deepspeed.
"""

from __future__ import annotations

import importlib
import sys

from spanqa.errors import SpanqaError, report

COMMANDS = {
    "prepare": ("spanqa.data.prepare", "tokenize a SQuAD or MRQA file into a memory-mapped window store"),
    "stats": ("spanqa.data.stats", "length distributions of a data file or window store (JSON + PNG)"),
    "evaluate": ("spanqa.eval.evaluate", "score predictions with the data's official metric (SQuAD, MRQA)"),
    "convert": ("spanqa.data.convert", "write a SQuAD file as an MRQA file (`--to mrqa`)"),
    "train": ("spanqa.train.entry", "train in this process (use `deepspeed launcher/train.py` for many)"),
    "predict": ("spanqa.predict", "answer questions with an exported model"),
    "compare": ("spanqa.train.compare", "runs side by side, paired bootstrap of their differences"),
    "demo": ("spanqa.demo", "train and evaluate MiniLM on the bundled sample (CPU or GPU), in minutes"),
}


def usage() -> str:
    lines = ["usage: spanqa COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    lines.append("\n`spanqa COMMAND --help` shows a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"spanqa: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return module.main(rest) or 0
    except SpanqaError as err:
        return report(f"spanqa {name}", err)


if __name__ == "__main__":
    sys.exit(main())

"""Reading the user's files: every failure becomes a one-line SpanqaError that names the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spanqa.errors import SpanqaError


def read_text(path: str | Path, what: str = "file") -> str:
    """The file's UTF-8 text; `what` names it in the error ("data file", "predictions file")."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpanqaError(f"{path}: no such {what}") from None
    except UnicodeDecodeError as err:
        raise SpanqaError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise SpanqaError(f"{path}: cannot read {what} ({err.strerror})") from None


def read_json(path: str | Path, what: str = "file") -> Any:
    """The file's JSON document; a file cut short is told apart from one that is not JSON at all."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        # an unterminated string or an error at the very end means the file was cut short
        cut_short = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")
        kind = "truncated JSON" if cut_short else "not valid JSON"
        raise SpanqaError(f"{path}: {kind}: {err.msg} (line {err.lineno}, column {err.colno})") from None

"""Which format a data file is in, told by its content, and the one loader of training examples.

    SQuAD  one JSON document {"version", "data": [articles]} (v1.1 or v2.0), plain or gzipped
    MRQA   JSON lines, usually gzipped: a {"header": ...} line, then {"context", "qas"} lines

The name of a file says nothing here: gzip is told by its magic bytes and MRQA by its first line (a
header object, or a context object with "qas", which the MRQA reader then reports as a missing header).
Each format is scored by its own official script (`METRICS`): SQuAD files by their `version` (1.x:
evaluate-v1.1.py, else evaluate-v2.0.py), MRQA files by mrqa_official_eval.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spanqa import io
from spanqa.data.squad import Example, parse_squad

SQUAD, MRQA = "squad", "mrqa"
SQUAD_V2, SQUAD_V1, MRQA_METRIC = "squad-v2.0", "squad-v1.1", "mrqa"
METRICS = (SQUAD_V2, SQUAD_V1, MRQA_METRIC)
PEEK_BYTES = 1 << 20


def detect_format(path: str | Path) -> str:
    """SQUAD or MRQA, from the first line of the (decompressed) file."""
    first = io.peek_text(path, PEEK_BYTES).lstrip().partition("\n")[0]
    try:
        obj = json.loads(first)
    except (json.JSONDecodeError, RecursionError):
        # the first line of a pretty-printed document, or the start of a one-line document longer
        # than the peek: SQuAD either way (MRQA lines are far shorter than the peek)
        return SQUAD
    if isinstance(obj, dict) and ("header" in obj or ("qas" in obj and "context" in obj)):
        return MRQA
    return SQUAD


def squad_metric_for(version: Any) -> str:
    """The official script a SQuAD file's `version` field names (v2.0 when it names none)."""
    return SQUAD_V1 if isinstance(version, str) and version.lstrip("v").startswith("1.") else SQUAD_V2


@dataclass(frozen=True)
class LoadedData:
    examples: list[Example]
    report: dict  # the validation report (spanqa.data.squad.ValidationReport.as_dict)
    format: str  # SQUAD or MRQA
    metric: str  # the official scorer of the file (one of METRICS)


def load_examples(path: str | Path) -> LoadedData:
    """The validated examples of a SQuAD or MRQA file, whichever it is."""
    from spanqa.data.mrqa import parse_mrqa

    source = str(path)
    text = io.read_data_text(path)
    if detect_format(path) == MRQA:
        examples, report, _ = parse_mrqa(text, source)
        return LoadedData(examples, report.as_dict(), MRQA, MRQA_METRIC)
    data = io.parse_json(text, source)
    examples, report = parse_squad(data, source)
    version = data.get("version") if isinstance(data, dict) else None
    return LoadedData(examples, report.as_dict(), SQUAD, squad_metric_for(version))


def read_squad_document(path: str | Path) -> Any:
    """A SQuAD file's JSON document (plain or gzipped)."""
    return io.parse_json(io.read_data_text(path), str(path))

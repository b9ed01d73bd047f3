"""Shipped training presets (`--preset NAME`), one JSON file each beside this module."""

from __future__ import annotations

import json
from importlib import resources

from spanqa.errors import SpanqaError


def preset_names() -> list[str]:
    return sorted(
        p.name[: -len(".json")] for p in resources.files(__name__).iterdir() if p.name.endswith(".json")
    )


def load_preset(name: str) -> dict:
    """The preset's flag values (keys are TrainConfig fields); keys starting with `_` are comments."""
    if name not in preset_names():
        raise SpanqaError(f"--preset: unknown preset {name!r} (choose from {', '.join(preset_names())})")
    values = json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text())
    return {key: value for key, value in values.items() if not key.startswith("_")}

"""Command-line flags made from dataclasses: one flag per field, its help the field's docstring.

A settings dataclass documents each field with a string right under it (as `TrainConfig` and
`WindowSettings` do); a field whose type is itself such a dataclass contributes its fields as flags
of their own (flag names are unique across the tree). Types come from `typing.get_type_hints`, so
`int | None` parses as an int.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import types
import typing
from collections.abc import Iterator
from functools import cache
from typing import Any

from spanqa.errors import SpanqaError


@dataclasses.dataclass(frozen=True)
class Flag:
    name: str  # the field name, also the flag: --name
    path: tuple[str, ...]  # where the value lives in the tree, e.g. ("windows", "max_seq_length")
    kind: type  # int, float, str or bool
    optional: bool  # None is allowed
    default: Any  # dataclasses.MISSING when required
    doc: str


class FlagParser(argparse.ArgumentParser):
    """argparse that raises SpanqaError (one line, exit 2 through the CLI) instead of printing usage."""

    def error(self, message: str):
        raise SpanqaError(message)


def is_settings(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def walk(cls: type, path: tuple[str, ...] = ()) -> Iterator[Flag]:
    """Every flag of `cls`, nested settings expanded in place, in field order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if is_settings(hint):
            yield from walk(hint, (*path, field.name))
            continue
        kind, optional = _plain_type(hint)
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        yield Flag(field.name, (*path, field.name), kind, optional, default, docs.get(field.name, ""))


def _plain_type(hint: Any) -> tuple[type, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported flag type {hint}")
        return args[0], True
    return hint, False


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string under each field in the source), whitespace collapsed."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def add_flags(parser: argparse.ArgumentParser, cls: type, choices: dict[str, tuple] | None = None) -> None:
    """One flag per field of `cls` (defaults are left to the dataclass: argument_default=SUPPRESS
    on the parser keeps only what was given)."""
    choices = choices or {}
    for flag in walk(cls):
        name = f"--{flag.name}"
        required = " (required)" if flag.default is dataclasses.MISSING else ""
        help_text = flag.doc + required
        if flag.kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=help_text)
        elif flag.name in choices:
            parser.add_argument(name, choices=choices[flag.name], help=help_text)
        else:
            parser.add_argument(name, type=flag.kind, help=help_text, metavar=flag.name.upper())


def build(cls: type, values: dict[str, Any]):
    """An instance of `cls` from flat flag values (nested settings built from their own flags);
    fields without a value keep their defaults."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if is_settings(hints[field.name]):
            kwargs[field.name] = build(hints[field.name], values)
        elif field.name in values:
            kwargs[field.name] = values[field.name]
    return cls(**kwargs)


def alternatives(cls: type) -> dict[str, str]:
    """{flag: the flag it clears} over the tree: a setting that can be given two ways (a class's
    ALTERNATIVES) takes the way given last; giving both ways at once is an error."""
    found = dict(getattr(cls, "ALTERNATIVES", {}))
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if is_settings(hints[field.name]):
            found.update(alternatives(hints[field.name]))
    return found


def refuse_both_ways(given: dict[str, Any], cls: type) -> None:
    for flag, other in alternatives(cls).items():
        if flag in given and other in given:
            first, second = sorted((flag, other))
            raise SpanqaError(f"--{first}, --{second}: give one of them, not both")


def apply_layer(values: dict[str, Any], layer: dict[str, Any], cls: type) -> None:
    """Lay `layer`'s values over `values`: a setting the layer gives one way clears the other way."""
    for flag, cleared in alternatives(cls).items():
        if flag in layer and cleared not in layer:
            values[cleared] = None
    values.update(layer)


def build_given(cls: type, namespace: argparse.Namespace):
    """An instance of `cls` from the flags a parser (without defaults of its own) was given."""
    given = {k: v for k, v in vars(namespace).items() if v is not None}
    refuse_both_ways(given, cls)
    values: dict[str, Any] = {}
    apply_layer(values, given, cls)
    return build(cls, values)


def flat_values(settings: Any) -> dict[str, Any]:
    """The flag values of a settings tree: {flag name: value}."""
    out = {}
    for flag in walk(type(settings)):
        value = settings
        for part in flag.path:
            value = getattr(value, part)
        out[flag.name] = value
    return out


def to_argv(settings: Any) -> list[str]:
    """The flags that give `settings` (None values left out): the inverse of building from flags."""
    argv = []
    for name, value in flat_values(settings).items():
        if isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no-{name}")
        elif value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def markdown_table(cls: type) -> str:
    """The flags of `cls` as a Markdown table (flag, default, meaning)."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for flag in walk(cls):
        name = f"`--{flag.name}`" + (f" / `--no-{flag.name}`" if flag.kind is bool else "")
        default = {dataclasses.MISSING: "required", None: "—"}.get(flag.default, f"`{flag.default}`")
        rows.append(f"| {name} | {default} | {flag.doc.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)

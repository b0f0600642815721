"""Map ``XxxConfig`` dataclasses 1:1 onto command-line flags, and back.

Library code takes typed config dataclasses; only the CLI sees ``argparse``. Each field becomes
``--field-name``; its help text is the field's ``metadata["help"]``. Supported field types: ``int``,
``float``, ``str``, ``bool`` (``--x`` / ``--no-x``), ``Optional`` of those, ``list[...]`` of those
(comma-separated on the command line) and ``Literal[...]`` (choices).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

__all__ = ["add_config_args", "config_from_args", "field", "config_to_dict"]

C = TypeVar("C")


def field(default: Any = dataclasses.MISSING, *, help: str = "", default_factory: Any = dataclasses.MISSING):
    """``dataclasses.field`` with a help string for the generated CLI flag."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _scalar_parser(tp: Any):
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        kind = type(choices[0])
        return kind, [str(c) for c in choices]
    if tp in (int, float, str):
        return tp, None
    raise TypeError(f"config field type {tp!r} has no command-line form")


def _list_of(scalar):
    def parse(text: str):
        return [scalar(t) for t in text.split(",") if t.strip()]

    return parse


def add_config_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of dataclass ``cls`` (flags named ``--{prefix}{field-name}``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        flag = "--" + (prefix + f.name).replace("_", "-")
        dest = prefix.replace("-", "_") + f.name
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        if get_origin(tp) is list:
            (inner,) = get_args(tp)
            scalar, choices = _scalar_parser(inner)
            shown = ",".join(map(str, default)) if default else "none"
            parser.add_argument(flag, dest=dest, type=_list_of(scalar), default=default,
                                help=f"{help_text} (comma-separated; default {shown})")
            continue
        scalar, choices = _scalar_parser(tp)
        shown = "none" if default is None else default
        parser.add_argument(flag, dest=dest, type=scalar, choices=choices and [scalar(c) for c in choices],
                            default=default, help=f"{help_text} (default {shown})" + (" [optional]" if optional else ""))


def config_from_args(cls: type[C], ns: argparse.Namespace, prefix: str = "", **overrides: Any) -> C:
    """Build ``cls`` from the flags :func:`add_config_args` added (fields missing from ``ns`` keep defaults)."""
    values = {}
    for f in dataclasses.fields(cls):
        key = prefix.replace("-", "_") + f.name
        if f.init and hasattr(ns, key):
            values[f.name] = getattr(ns, key)
    values.update(overrides)
    return cls(**values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a (possibly nested) config dataclass."""
    return dataclasses.asdict(cfg)

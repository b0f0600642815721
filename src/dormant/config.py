"""Config dataclasses: their fields, the checks on them, and their 1:1 mapping onto command-line flags.

Library code takes typed config dataclasses; only the CLI sees ``argparse``. Each field becomes
``--field-name``; its help text is the field's ``metadata["help"]``. Supported field types: ``int``,
``float``, ``str``, ``bool`` (``--x`` / ``--no-x``), ``Optional`` of those, ``list[...]`` of those
(comma-separated on the command line) and ``Literal[...]`` (choices).

**Checks at the door.** A field declares what it accepts (``ge``/``gt``/``le``/``lt``, ``choices``, ``nonempty``,
or any ``check`` function); floats must be finite unless ``finite=False``. A class decorated with :func:`checked`
runs :func:`validate` when an instance is made, so a bad value is refused when it is given -- by a flag or in
code -- before any model is loaded, with a :class:`UsageError` that says what is wrong and what is allowed.
This module imports nothing heavy (no torch), so the CLI can parse and check flags in milliseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args, get_origin

__all__ = ["UserError", "UsageError", "add_config_args", "config_from_args", "field", "config_to_dict", "checked",
           "validate", "in_file", "in_dir", "out_file", "out_dir"]

C = TypeVar("C")


class UserError(Exception):
    """An error in what the user gave (a flag, a file, an environment variable), not in dormant: the CLI prints its
    message as one line and exits with status 2."""


class UsageError(UserError, ValueError):
    """A config field or flag has a value it does not accept.

    Attributes:
        field: the field's name (the CLI rewrites it as ``--flag-name``), or ``None``.
        value: the refused value.
        problem: what is wrong and what is allowed.
    """

    def __init__(self, problem: str, field: str | None = None, value: Any = None):
        self.problem, self.field, self.value = problem, field, value
        super().__init__(problem if field is None else f"{field}={value!r}: {problem}")


def field(default: Any = dataclasses.MISSING, *, help: str = "", default_factory: Any = dataclasses.MISSING,
          ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
          choices: tuple | list | None = None, nonempty: bool = False, finite: bool = True,
          check: Callable[[Any], str | None] | None = None):
    """``dataclasses.field`` with a help string for the generated CLI flag and the checks of :func:`validate`.

    ``ge``/``gt``/``le``/``lt``/``choices``/``finite`` apply to each element of a list field; ``nonempty`` to the
    list itself; ``check(value)`` returns a problem (a string) or ``None``.
    """
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "nonempty": nonempty,
            "finite": finite, "check": check}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# -- path checks (no side effects: nothing is created) ----------------------------------------------------------
def in_file(value: str) -> str | None:
    """``check`` of an input file: it must exist and be a file."""
    p = os.path.expanduser(value)
    if os.path.isfile(p):
        return None
    return "is a directory, not a file" if os.path.isdir(p) else "does not exist"


def in_dir(value: str) -> str | None:
    """``check`` of an input folder: it must exist and be a folder."""
    p = os.path.expanduser(value)
    if os.path.isdir(p):
        return None
    return "is a file, not a folder" if os.path.exists(p) else "does not exist"


def _writable_ancestor(p: str) -> str | None:
    parent = os.path.dirname(os.path.abspath(p))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created: {parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable"
    # access() says yes to root everywhere and knows nothing of read-only or pseudo file systems: try it
    try:
        fd, probe = tempfile.mkstemp(prefix=".dormant-probe-", dir=parent)
    except OSError as e:
        return f"cannot be created in {parent}: {e.strerror}"
    os.close(fd)
    os.unlink(probe)
    return None


def out_file(value: str) -> str | None:
    """``check`` of an output file: not an existing folder, and its folder can be made or written."""
    p = os.path.expanduser(value)
    if os.path.isdir(p):
        return "is an existing folder; give a file path"
    if os.path.exists(p):
        return None if os.access(p, os.W_OK) else "exists and is not writable"
    return _writable_ancestor(p)


def out_dir(value: str) -> str | None:
    """``check`` of an output folder: not an existing file, and writable or creatable."""
    p = os.path.expanduser(value)
    if os.path.isdir(p):
        return None if os.access(p, os.W_OK | os.X_OK) else "is not writable"
    if os.path.exists(p):
        return "is an existing file; give a folder"
    return _writable_ancestor(p)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _range_text(m: dict) -> str:
    lo = f"[{m['ge']:g}" if m.get("ge") is not None else (f"({m['gt']:g}" if m.get("gt") is not None else "(-inf")
    hi = f"{m['le']:g}]" if m.get("le") is not None else (f"{m['lt']:g})" if m.get("lt") is not None else "inf)")
    return f"{lo}, {hi}"


def _scalar_problem(value: Any, tp: Any, m: dict) -> str | None:
    if get_origin(tp) is Literal:
        options = get_args(tp)
        return None if value in options else f"choose from {', '.join(map(str, options))}"
    if tp is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and not isinstance(value, int)):
            return f"must be {'an integer' if tp is int else 'a number'}"
        if tp is float and m.get("finite", True) and not math.isfinite(value):
            return "must be a finite number" + (f" in {_range_text(m)}" if _has_range(m) else "")
        if _has_range(m) and not _in_range(value, m):
            return f"must lie in {_range_text(m)}"
    if tp is str and not isinstance(value, str):
        return "must be a string"
    if m.get("choices") is not None and value not in m["choices"]:
        return f"choose from {', '.join(map(str, m['choices']))}"
    return None


def _has_range(m: dict) -> bool:
    return any(m.get(k) is not None for k in ("ge", "gt", "le", "lt"))


def _in_range(v: float, m: dict) -> bool:
    return not ((m.get("ge") is not None and not v >= m["ge"]) or (m.get("gt") is not None and not v > m["gt"])
                or (m.get("le") is not None and not v <= m["le"]) or (m.get("lt") is not None and not v < m["lt"]))


def validate(cfg: Any) -> None:
    """Check every field of config dataclass ``cfg`` (nested configs included); raise :class:`UsageError`."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            continue  # nested configs check themselves when they are made
        tp, optional = _unwrap_optional(hints[f.name])
        m = f.metadata
        if value is None:
            if not optional:
                raise UsageError("is required", f.name, value)
            continue
        if get_origin(tp) is list:
            (inner,) = get_args(tp)
            if not isinstance(value, list):
                raise UsageError("must be a list", f.name, value)
            if m.get("nonempty") and not value:
                raise UsageError("must name at least one value", f.name, value)
            for v in value:
                problem = _scalar_problem(v, inner, m)
                if problem:
                    raise UsageError(f"element {v!r} {problem}", f.name, value)
        else:
            problem = _scalar_problem(value, tp, m)
            if problem:
                raise UsageError(problem, f.name, value)
        if m.get("check") is not None:
            problem = m["check"](value)
            if problem:
                raise UsageError(problem, f.name, value)


def checked(cls: type[C]) -> type[C]:
    """Class decorator for a config dataclass: :func:`validate` runs, then the class's own ``__post_init__``, on
    every instance. Put it *under* ``@dataclass`` (so the generated ``__init__`` calls it)."""
    original = getattr(cls, "__post_init__", None)

    def __post_init__(self):
        validate(self)
        if original is not None:
            try:
                original(self)
            except UsageError:
                raise
            except ValueError as e:  # a config's own cross-field checks
                raise UsageError(str(e)) from None

    cls.__post_init__ = __post_init__
    return cls


# -- command-line flags ------------------------------------------------------------------------------------------
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

    parse.__name__ = f"comma-separated {scalar.__name__}"  # argparse names it in its error message
    return parse


def _flag(prefix: str, name: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of dataclass ``cls`` (flags named ``--{prefix}{field-name}``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        flag = _flag(prefix, f.name)
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
    """Build ``cls`` from the flags :func:`add_config_args` added (fields missing from ``ns`` keep defaults).

    A refused value raises :class:`UsageError` naming the flag (``--prefix-field-name``).
    """
    values = {}
    for f in dataclasses.fields(cls):
        key = prefix.replace("-", "_") + f.name
        if f.init and hasattr(ns, key):
            values[f.name] = getattr(ns, key)
    values.update(overrides)
    try:
        return cls(**values)
    except UsageError as e:
        if e.field is None:
            raise
        value = e.value
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        raise UsageError(f"{_flag(prefix, e.field)} {shown}: {e.problem}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a (possibly nested) config dataclass."""
    return dataclasses.asdict(cfg)

"""Small declarative checks for the JSON a run trusts: a bundle's manifest, a checkpoint's state.

A rule is a callable ``rule(value, where) -> None`` that raises :class:`SchemaError` naming the
first field that is wrong (``components.unet.bytes: expected an integer >= 0, got "12"``). The
rules are plain data built from a few constructors, so the manifest's contract reads as a table.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable

Rule = Callable[[Any, str], None]


class SchemaError(ValueError):
    """One field of a document is missing or of the wrong kind."""


def _fail(where: str, want: str, value: Any) -> None:
    shown = repr(value)
    raise SchemaError(f"{where or 'document'}: expected {want}, got {shown[:60] + '...' if len(shown) > 60 else shown}")


def Int(lo: int | None = None, hi: int | None = None) -> Rule:
    """An integer (not a bool) in [lo, hi]."""
    want = "an integer" + (f" >= {lo}" if lo is not None and hi is None else "") + \
        (f" in [{lo}, {hi}]" if lo is not None and hi is not None else "")

    def rule(v: Any, where: str) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or (hi is not None and v > hi):
            _fail(where, want, v)
    return rule


def Num(lo: float | None = None, hi: float | None = None, *, above: float | None = None) -> Rule:
    """A finite number (not a bool), >= lo, <= hi, > above."""
    parts = [f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "",
             f"> {above}" if above is not None else ""]
    want = "a finite number " + " and ".join(p for p in parts if p)

    def rule(v: Any, where: str) -> None:
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or (lo is not None and v < lo) or (hi is not None and v > hi) or (above is not None and v <= above)):
            _fail(where, want.strip(), v)
    return rule


def Str(choices: Iterable[str] | None = None, pattern: str | None = None) -> Rule:
    options = tuple(choices) if choices is not None else None
    regex = re.compile(pattern) if pattern else None
    want = f"one of {', '.join(options)}" if options else "a string" + (f" matching {pattern}" if pattern else "")

    def rule(v: Any, where: str) -> None:
        if not isinstance(v, str) or (options is not None and v not in options) or (regex and not regex.fullmatch(v)):
            _fail(where, want, v)
    return rule


def Bool() -> Rule:
    def rule(v: Any, where: str) -> None:
        if not isinstance(v, bool):
            _fail(where, "true or false", v)
    return rule


def Optional(inner: Rule) -> Rule:
    """``null`` or what ``inner`` accepts."""
    return lambda v, where: None if v is None else inner(v, where)


def List(item: Rule, length: int | None = None) -> Rule:
    def rule(v: Any, where: str) -> None:
        if not isinstance(v, list) or (length is not None and len(v) != length):
            _fail(where, "a list" + (f" of {length}" if length is not None else ""), v)
        for i, x in enumerate(v):
            item(x, f"{where}[{i}]")
    return rule


def Obj(fields: dict[str, Rule], optional: dict[str, Rule] | None = None, extra: Rule | None = None) -> Rule:
    """A JSON object with ``fields`` (required) and ``optional`` keys; other keys must satisfy
    ``extra`` when given, and are ignored otherwise (newer writers may add fields)."""
    optional = optional or {}

    def rule(v: Any, where: str) -> None:
        if not isinstance(v, dict):
            _fail(where, "an object", v)
        missing = [k for k in fields if k not in v]
        if missing:
            raise SchemaError(f"{where + ': ' if where else ''}missing {', '.join(missing)}")
        for k, x in v.items():
            sub = f"{where}.{k}" if where else str(k)
            if k in fields:
                fields[k](x, sub)
            elif k in optional:
                optional[k](x, sub)
            elif extra is not None:
                extra(x, sub)
    return rule


def check(document: Any, rule: Rule) -> None:
    """Raise SchemaError if ``document`` breaks ``rule``."""
    rule(document, "")

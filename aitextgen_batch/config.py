"""The one config mechanism: dataclasses whose fields become CLI flags and YAML keys.

A command's config is a dataclass. Each field becomes `--field-name` (its `help` metadata is the help
text), YAML files given with `--config` set any field, and flags on the command line win over both.
Validation lives in each dataclass's `__post_init__` and raises `UserError` naming the flag, so the
Python API and the CLI report the same message.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

from .errors import UserError

_UNSET = object()


def flag(name: str) -> str:
    """`max_new_tokens` -> `--max-new-tokens`."""
    return "--" + name.replace("_", "-")


def check(ok: bool, name: str, message: str, value: Any = _UNSET) -> None:
    """Raise a UserError naming field `name` (and its flag) unless `ok`."""
    if not ok:
        got = "" if value is _UNSET else f", got {value!r}"
        raise UserError(f"{name} ({flag(name)}) {message}{got}")


def unicode_error(text: str) -> str | None:
    """Why `text` is not valid Unicode (it holds a lone surrogate, which no UTF-8 file can: JSON's `\\ud83d`
    escapes and undecodable command-line bytes make them), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone surrogate {text[exc.start]!r} at character {exc.start}"
    return None


def check_text(name: str, value: str | None) -> None:
    """Raise a UserError naming field `name` (and its flag) when `value` is text that is not valid Unicode."""
    err = unicode_error(value) if isinstance(value, str) else None
    check(err is None, name, f"is not valid Unicode ({err})")


def check_range(name: str, value, lo=None, hi=None, *, lo_open: bool = False) -> None:
    """Check lo <= value <= hi (or lo < value with lo_open); the message states the allowed range.

    NaN and the infinities are refused whatever the range: NaN compares false with everything, so it would pass.
    """
    check(isinstance(value, (int, float)) and not isinstance(value, bool), name, "must be a number", value)
    check(math.isfinite(value), name, "must be a finite number", value)
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad:
        left = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        right = "" if hi is None else f"<= {hi}"
        check(False, name, "must be " + " and ".join(x for x in (left, right) if x), value)


SEED_MAX = (1 << 63) - 1  # the one seed rule: every seed (flags, seed columns, the Python API) is in [0, 2**63-1]


def check_seed(name: str, value) -> None:
    """The one rule of every seed a user gives: an integer in [0, 2**63-1] (a seed column holds int64)."""
    check(isinstance(value, int) and not isinstance(value, bool), name, "must be an integer", value)
    check(0 <= value <= SEED_MAX, name, "must be an integer in [0, 2**63-1]", value)


def check_at_most(name: str, value, hi, why: str = "") -> None:
    """A size's sane upper bound (after `check_range` took its type and lower bound): every size a user gives has
    one, checked up front with the flag named, so an absurd value is refused instead of exhausting memory."""
    check(value <= hi, name, f"must be <= {hi:,}{why}", value)


def _fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    """Fields of `cls`, nested dataclass fields flattened in place, with resolved type hints."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(_fields(tp))
        else:
            out.append((f, tp))
    return out


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _none_or(convert):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one flag per (flattened) field of `cls`; every default is a sentinel so merging can tell what was set."""
    for f, tp in _fields(cls):
        tp, optional = _unwrap_optional(tp)
        help_text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"default": _UNSET, "help": help_text, "dest": f.name}
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            kwargs["type"] = type(kwargs["choices"][0])
        elif origin in (list, tuple):
            kwargs["nargs"] = "*"
            kwargs["type"] = typing.get_args(tp)[0] if typing.get_args(tp) else str
        else:
            conv = Path if tp is Path else _finite if tp is float else tp if tp in (int, str) else str
            kwargs["type"] = _none_or(conv) if optional else conv
            kwargs["metavar"] = f.metadata.get("metavar", f.name.upper())
        if f.metadata.get("positional"):
            kwargs.pop("dest")
            kwargs["nargs"] = "?" if f.default is not dataclasses.MISSING else None
            parser.add_argument(f.name, **kwargs)
        else:
            parser.add_argument(flag(f.name), *f.metadata.get("aliases", ()), **kwargs)


def _finite(text: str) -> float:
    """argparse type of float flags: NaN and the infinities are refused like any other bad number."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


_finite.__name__ = "finite number"


def coerce(name: str, tp, value, where: str = ""):
    """`value` checked against field `name`'s type `tp` (and converted where lossless: a path to str or Path).

    The one type check of every option, whatever its source (flags, YAML, keyword arguments): an integer field
    takes integers only, a float field finite numbers only, a bool field true/false only.

    Raises:
        UserError: naming the field, its flag, the value and `where` it came from (e.g. a YAML file).
    """

    def bad(what: str):
        got = f", got {value!r} ({type(value).__name__})"
        raise UserError(f"{where}{name} ({flag(name)}) must be {what}{got}")

    inner, _ = _unwrap_optional(tp)
    if value is None:
        nullable = tp is Any or type(None) in typing.get_args(tp)
        return None if nullable else bad("given (it cannot be null)")
    origin = typing.get_origin(inner)
    if inner is bool:
        return value if isinstance(value, bool) else bad("true or false")
    if inner is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else bad("an integer")
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad("a number")
        return float(value) if math.isfinite(value) else bad("a finite number")
    if inner is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            bad("a string")
        err = unicode_error(value)
        return value if err is None else bad(f"valid Unicode text (it holds {err})")
    if inner is Path:
        return Path(value) if isinstance(value, (str, os.PathLike)) else bad("a path")
    if origin is Literal:
        choices = typing.get_args(inner)
        text = str(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else value
        return text if text in choices else bad(f"one of {', '.join(map(str, choices))}")
    if origin in (list, tuple):
        (elem,) = typing.get_args(inner)[:1] or (str,)
        items = [value] if isinstance(value, (str, os.PathLike)) else value
        if not isinstance(items, (list, tuple)):
            bad("a list")
        return [coerce(name, elem, v, where) for v in items]
    if origin in (typing.Union, types.UnionType):  # e.g. `str | Path`: keep any value of one of the types
        for option in typing.get_args(inner):
            if option is not type(None) and isinstance(value, option):
                return value
        return bad(" or ".join(getattr(t, "__name__", str(t)) for t in typing.get_args(inner)))
    return value


def _build(cls, values: dict[str, Any], defaults=None):
    """`cls` from the flat `values`; a field not given takes its value in `defaults` (an instance of `cls`: a nested
    config's own default, e.g. the OpenAI sampling defaults of `run-batch`) or else the class's default."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            nested = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            kwargs[f.name] = _build(hints[f.name], values, nested)
        elif f.name in values:
            kwargs[f.name] = coerce(f.name, hints[f.name], values[f.name])
        elif defaults is not None:
            kwargs[f.name] = getattr(defaults, f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"{flag(f.name)} is required")
    return cls(**kwargs)


def load_yaml_config(path: str | Path, cls) -> dict[str, Any]:
    """Read a YAML mapping of field names (dashes or underscores) to values; unknown keys are errors."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {str(p)!r} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise UserError(f"--config {str(p)!r} must hold a mapping of option: value")
    types_by_name = {f.name: tp for f, tp in _fields(cls)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in types_by_name:
            raise UserError(f"--config {str(p)!r}: unknown option {key!r}; known: {', '.join(sorted(types_by_name))}")
        out[name] = coerce(name, types_by_name[name], value, where=f"--config {str(p)!r}: ")
    return out


def config_from_namespace(cls, ns: argparse.Namespace):
    """Merge dataclass defaults < `--config` YAML < flags, then construct (and so validate) `cls`."""
    values: dict[str, Any] = {}
    for path in getattr(ns, "config", None) or []:
        values.update(load_yaml_config(path, cls))
    for f, _ in _fields(cls):
        v = getattr(ns, f.name, _UNSET)
        if v is not _UNSET:
            values[f.name] = v
    return _build(cls, values)


def to_dict(cfg) -> dict[str, Any]:
    """A config as plain JSON-able data (paths as strings), for manifests and `hyperparameters.yaml`."""

    def plain(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def build_config(cls, options: dict[str, Any]):
    """Construct `cls` from flat keyword options (the CLI flags with underscores); unknown names are errors."""
    known = {f.name for f, _ in _fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return _build(cls, options)

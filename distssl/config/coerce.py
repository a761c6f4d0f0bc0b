"""A tree of dataclasses built from nested dicts (YAML), with ``a.b=value`` overrides: every value is
checked against its annotation (bool, int, float, str, Literal, Optional, list, nested dataclasses,
or an annotation class with ``coerce_value``/``type_name``), and every mistake raises
:class:`ConfigError` naming the dotted key and what is allowed. The schema lives in distssl.config."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

import yaml

from distssl.errors import ConfigError  # noqa: F401 - raised here, and imported from here by callers


def _type_name(tp: Any) -> str:
    if hasattr(tp, "type_name"):
        return tp.type_name
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if _optional_inner(tp) is not None:
        return f"{_type_name(_optional_inner(tp))} or null"
    return getattr(tp, "__name__", str(tp))


def _optional_inner(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    if hasattr(tp, "coerce_value"):  # an annotation that checks its own values (config.DataSpec)
        return tp.coerce_value(key, value)
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else coerce(key, value, inner)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this file


def build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        close = nearest(str(unknown[0]), names)
        hint = f"did you mean {_join(prefix, close)}? " if close else ""
        raise ConfigError(f"unknown key '{_join(prefix, unknown[0])}': {hint}{where} allows {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp, key = hints[name], _join(prefix, name)
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, data[name] or {}, key)
        else:
            kwargs[name] = coerce(key, data[name], tp)
    return cls(**kwargs)


def nearest(word: str, names: list[str]) -> str | None:
    """The name a typo most likely meant: one with the same letters (a transposition: tua -> tau) first, else
    the closest by difflib's ratio (at least 0.6), else None."""
    same = [n for n in names if sorted(n) == sorted(word)]
    if same:
        return same[0]
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    return close[0] if close else None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value) with the value read as YAML (numbers, bools, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value (for example ssl.tau=0.9)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_path(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = _join(prefix, k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def changed_keys(old: dict, new: dict, allowed: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every value two trees disagree on, but the ``allowed`` keys."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in allowed and a.get(k) != b.get(k)]


def _field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the source of the class that declares it last (a subclass's comment
    wins over its base's): the one ending its line, else the comment lines just above it (the schema
    documents itself where it is defined; ``--keys`` prints these)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_comments(klass))
    return out


def _own_comments(cls: type) -> dict[str, str]:
    import inspect
    import io
    import tokenize

    try:
        source, first = inspect.getsourcelines(cls)
    except (OSError, TypeError):  # no source (a frozen build): the keys without meanings
        return {}
    comments: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO("".join(source)).readline):
            text = tok.string.lstrip("#").strip()
            if tok.type == tokenize.COMMENT and not text.startswith(("type:", "noqa")):  # for tools, not readers
                comments[tok.start[0]] = text
    except (tokenize.TokenError, IndentationError):
        return {}
    out = {}
    for i, line in enumerate(source, start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0].strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped or not name.isidentifier():
            continue
        if i in comments and not stripped.startswith("#"):
            out[name] = comments[i]
            continue
        above, j = [], i - 1
        while j in comments and source[j - 1].strip().startswith("#"):
            above.insert(0, comments[j])
            j -= 1
        if above:
            out[name] = " ".join(above)
    return out


def describe_keys(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, meaning) for every value of the tree, in schema order."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    rows = []
    default_tree = cls()
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], _join(prefix, f.name)
        if dataclasses.is_dataclass(tp):
            doc = (tp.__doc__ or "").strip()
            if doc.startswith(f"{tp.__name__}("):  # dataclasses' own generated signature: no doc of its own
                doc = ""
            rows.append((key, "section", None, " ".join(doc.split("\n\n")[0].split())))
            rows.extend(describe_keys(tp, key))
        else:
            rows.append((key, _type_name(tp), getattr(default_tree, f.name), comments.get(f.name, "")))
    return rows

"""Typed configs: dataclasses filled from YAML, with one-line errors that name the bad key.

A config is a plain dataclass; `load_config("demo.yaml", TrainConfig)` reads the file and
converts every value to its field's type. Supported field types: `int`, `float` (an int is
accepted and converted; a bool is never a number), `str`, `bool` (YAML booleans only),
`X | None`, `Literal[...]`, `Enum` subclasses, `list[T]`, `tuple[T, ...]`, fixed tuples such as
`tuple[int, int]`, `dict[str, T]`, nested dataclasses, `Any`, `Path` and the two path markers
`ExistingPath` (must exist when the config is loaded) and `OutputPath` (not checked).
Relative paths are resolved against the YAML file's folder, except values given with `--set`,
which are resolved against the current folder. A field with a default is optional; defaults
are used as written (not converted, resolved or checked).

Validation: a dataclass may define `validate(self) -> None` (or `__post_init__`) that raises
`ValueError`. If the message starts with a field name and a colon, the error points at that field:
`raise ValueError("lr: must be > 0")` in `train` reads `demo.yaml: train.lr: must be > 0`;
any other message points at the dataclass itself (`demo.yaml: train: <message>`).

YAML is read as YAML 1.1 (`yaml.safe_load`) with two fixes: a repeated key is an error instead
of silently keeping the last one, and `1e-3` is a float instead of a string.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, TypeVar

import yaml

from facekd.errors import ConfigError
from facekd.io.atomic import atomic_write_text

__all__ = [
    "ExistingPath",
    "OutputPath",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "parse_override",
]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class _PathRule:
    must_exist: bool


ExistingPath = Annotated[Path, _PathRule(must_exist=True)]
"""A path that must exist when the config is loaded (an input file or folder)."""

OutputPath = Annotated[Path, _PathRule(must_exist=False)]
"""A path that is written to; only resolved, never checked."""


# ----------------------------------------------------------------------------- YAML reading


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses repeated keys and reads `1e-3` as a float."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; errors become one-line `ConfigError`s that name `source`."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{source}: line {exc.line}: duplicate key {exc.key!r}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        reason = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
        reason = " ".join(str(reason).split())
        raise ConfigError(f"{source}: {where}invalid YAML ({reason})") from None


# ----------------------------------------------------------------------------- conversion


class _FieldError(Exception):
    """A bad value at a key path; formatted with its source by the caller."""

    def __init__(self, key: str, message: str):
        super().__init__(key, message)
        self.key, self.message = key, message


@dataclasses.dataclass(frozen=True)
class _Context:
    base_dir: Path
    cli_keys: tuple[str, ...] = ()  # keys set on the command line: their paths are cwd-relative

    def path_base(self, key: str) -> Path:
        return Path.cwd() if any(_is_under(key, k) for k in self.cli_keys) else self.base_dir


def _is_under(key: str, parent: str) -> bool:
    return key == parent or key.startswith(parent + ".") or key.startswith(parent + "[")


def _join(prefix: str, name: Any) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(word: Any, choices: Sequence[Any]) -> str:
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(str(word), names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_SCALARS = (bool, int, float, str, Path)


def _check_supported(tp: Any, where: str) -> None:
    """Raise TypeError (a bug in the config class, not in the YAML) for types we cannot fill."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _check_supported(args[0], where)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(args) != 2:
            raise TypeError(f"{where}: only `X | None` unions are supported, got {tp}")
        return _check_supported(rest[0], where)
    if origin in (list, tuple, dict):
        if origin is dict and args and args[0] is not str:
            raise TypeError(f"{where}: dict keys must be str, got {tp}")
        for arg in args[1:] if origin is dict else args:
            if arg is not Ellipsis:
                _check_supported(arg, where)
        return
    if origin is Literal or tp is Any or tp in _SCALARS or tp in (list, tuple, dict):
        return
    if isinstance(tp, type) and (issubclass(tp, enum.Enum) or dataclasses.is_dataclass(tp)):
        return
    raise TypeError(f"{where}: unsupported config field type {tp!r}")


@functools.lru_cache(maxsize=None)
def _init_fields(cls: type) -> dict[str, tuple[Any, bool]]:
    """Map each init field of a dataclass to (resolved type, required)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        tp = hints[field.name]
        _check_supported(tp, f"{cls.__qualname__}.{field.name}")
        no_default = dataclasses.MISSING
        required = field.default is no_default and field.default_factory is no_default
        fields[field.name] = (tp, required)
    return fields


def _convert(value: Any, tp: Any, key: str, ctx: _Context) -> Any:
    """Convert the raw YAML `value` at `key` to type `tp`, or raise `_FieldError`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail(expected: str, hint: str = "") -> typing.NoReturn:
        raise _FieldError(key, f"expected {expected}, got {_describe(value)}{hint}")

    if tp is Any:
        return value
    if origin is Annotated:
        path = _convert(value, args[0], key, ctx)
        rules = [m for m in args[1:] if isinstance(m, _PathRule)]
        if path is not None and any(r.must_exist for r in rules) and not path.exists():
            raise _FieldError(key, f"file not found: {path}")
        return path
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _convert(value, next(a for a in args if a is not type(None)), key, ctx)
    if origin is Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return allowed
        hint = _suggest(value, args) if isinstance(value, str) else ""
        fail("one of " + ", ".join(repr(a) for a in args), hint)
    if tp is bool:
        return value if isinstance(value, bool) else fail("bool (true or false)")
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else fail("int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        fail("float")
    if tp is str:
        return value if isinstance(value, str) else fail("str")
    if tp is Path:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            fail("a path")
        path = Path(value).expanduser()
        return Path(os.path.abspath(ctx.path_base(key) / path))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member.name or value is member:
                return member
        fail("one of " + ", ".join(repr(m.value) for m in tp))
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail("a list")
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            fail(f"a list of {len(args)} items", f" with {len(value)} items")
        if not args:
            item_types = [Any] * len(value)
        elif origin is list or args[-1] is Ellipsis:
            item_types = [args[0]] * len(value)
        else:
            item_types = list(args)
        items = [
            _convert(v, t, f"{key}[{i}]", ctx) for i, (v, t) in enumerate(zip(value, item_types))
        ]
        return tuple(items) if tuple in (origin, tp) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        value_type = args[1] if args else Any
        for k in value:
            if not isinstance(k, str):
                raise _FieldError(_join(key, k), "keys must be strings")
        return {k: _convert(v, value_type, _join(key, k), ctx) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            fail("a mapping")
        return _build_dataclass(value, tp, key, ctx)
    raise TypeError(f"{key}: unsupported config field type {tp!r}")


def _build_dataclass(data: dict, cls: type, key: str, ctx: _Context) -> Any:
    fields = _init_fields(cls)
    for name in data:
        if name not in fields:
            raise _FieldError(_join(key, name), "unknown key" + _suggest(name, list(fields)))
    kwargs = {}
    for name, (tp, required) in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], tp, _join(key, name), ctx)
        elif required:
            raise _FieldError(_join(key, name), "missing required key")
    try:
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if callable(validate):
            validate()
    except ValueError as exc:
        raise _validation_error(exc, key, fields) from None
    return obj


def _validation_error(exc: ValueError, key: str, fields: dict) -> _FieldError:
    """Apply the `"field: message"` convention of `validate`/`__post_init__` errors."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    head, sep, rest = message.partition(": ")
    name = re.match(r"[A-Za-z_]\w*", head)
    if sep and name and name.group(0) in fields and re.fullmatch(r"[\w.\[\]]+", head):
        return _FieldError(_join(key, head), rest)
    return _FieldError(key, message)


def _build(data: Any, cls: type[T], ctx: _Context) -> T:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"config class must be a dataclass, got {cls!r}")
    if not isinstance(data, dict):
        raise _FieldError("", "expected a mapping at the top level")
    return _build_dataclass(data, cls, "", ctx)


def _format(source: str, key: str, message: str) -> str:
    return f"{source}: {key}: {message}" if key else f"{source}: {message}"


# ----------------------------------------------------------------------------- public API


def config_from_dict(
    data: dict, cls: type[T], source: str = "<config>", base_dir: Path | None = None
) -> T:
    """Build dataclass `cls` from a plain dict; relative paths are resolved against `base_dir`
    (default: the current folder). Errors read `source: key.path: reason`."""
    ctx = _Context(Path(os.path.abspath(base_dir if base_dir is not None else Path.cwd())))
    try:
        return _build(data, cls, ctx)
    except _FieldError as exc:
        raise ConfigError(_format(source, exc.key, exc.message)) from None


def parse_override(item: str) -> tuple[str, Any]:
    """Split a `--set` item `"train.lr=0.1"` into ("train.lr", 0.1); the value is YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.strip() for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.001")
    return key, _parse_yaml(text, f"--set {key}")


def _apply_override(data: dict, key: str, value: Any, source: str) -> None:
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(_format(source, where, f"expected a mapping, got {_describe(child)}"))
        node = child
    node[parts[-1]] = value


def load_config(path: str | os.PathLike, cls: type[T], overrides: Sequence[str] = ()) -> T:
    """Read a YAML file into dataclass `cls`, after applying `--set` style `overrides`
    (`"train.lr=0.1"`, values parsed as YAML). Raises `ConfigError` with a one-line reason."""
    source = str(path)
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"{source}: file not found")
    if file.is_dir():
        raise ConfigError(f"{source}: is a folder, not a config file")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read ({exc.strerror or exc})") from None
    data = _parse_yaml(text, source)
    if data is None:  # an empty file is an empty mapping: every field takes its default
        data = {}

    parsed = [(item, *parse_override(item)) for item in overrides]
    if parsed and not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    for item, key, value in parsed:
        _apply_override(data, key, value, f"{source} (--set {item})")

    ctx = _Context(Path(os.path.abspath(file.parent)), tuple(key for _, key, _ in parsed))
    try:
        return _build(data, cls, ctx)
    except _FieldError as exc:
        related = [i for i, k, _ in parsed if _is_under(exc.key, k) or _is_under(k, exc.key)]
        culprit = related if exc.key else []
        where = f"{source} (--set {culprit[-1]})" if culprit else source
        raise ConfigError(_format(where, exc.key, exc.message)) from None


def config_to_dict(obj: Any) -> Any:
    """A config as plain JSON/YAML-ready data: Paths become str, tuples lists, enums values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [f.name for f in dataclasses.fields(obj) if f.init]
        return {name: config_to_dict(getattr(obj, name)) for name in fields}
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return config_to_dict(obj.value)
    if isinstance(obj, (list, tuple)):
        return [config_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): config_to_dict(v) for k, v in obj.items()}
    return obj


def dump_config(obj: Any, path: str | os.PathLike) -> None:
    """Write a config as YAML, atomically; `load_config` reads it back to an equal object."""
    text = yaml.safe_dump(config_to_dict(obj), sort_keys=False, allow_unicode=True)
    atomic_write_text(path, text)

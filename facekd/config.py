"""Typed configs: pydantic models filled from YAML, with one-line errors that name the bad key.

A config is a `ConfigModel` (a pydantic v2 model that refuses unknown keys and does not coerce:
a bool is never a number, `"32"` is not an int, an int is accepted for a float and converted).
`load_config("demo.yaml", QualityRunConfig)` reads the file and validates it; ranges and
choices are pydantic constraints (`Field(gt=0)`, `Literal[...]`) or validators that raise
`ValueError("reason")`. Every failure is a `ConfigError` of one line, `demo.yaml: train.lr:
must be > 0, got 0.0`, the key path coming from the validation error's location. Building a
model in Python (`TrainConfig(lr=0)`) or assigning a bad value raises the same `ConfigError`,
without the file name. `validated(Model, data, where)` serves options that are not in a file
(model and loss options): errors read `where.key: reason`.

Paths: `ExistingPath` (must exist when the config is loaded) and `OutputPath` (not checked).
Relative paths are resolved against the YAML file's folder, except values given with `--set`,
which are resolved against the current folder. Defaults are used as written (not validated).

YAML is read as YAML 1.1 (`yaml.safe_load`) with two fixes: a repeated key is an error instead
of silently keeping the last one, and `1e-3` is a float instead of a string.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError, ValidationInfo

from facekd.errors import ConfigError
from facekd.io.atomic import atomic_write_text

__all__ = [
    "ConfigModel",
    "ExistingPath",
    "OutputPath",
    "NonNegative",
    "validated",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "parse_override",
]

Model = TypeVar("Model", bound=BaseModel)


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


# ----------------------------------------------------------------------------- paths


class _CommandLineText(str):
    """A string given with `--set`: a path in it is relative to the current folder."""


def _path(must_exist: bool):
    def resolve(value: Any, info: ValidationInfo) -> Path:
        if isinstance(value, Path):
            value = str(value)
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a path, got {_describe(value)}")
        base = (info.context or {}).get("base_dir")
        if base is None or isinstance(value, _CommandLineText):
            base = Path.cwd()
        path = Path(os.path.abspath(Path(base) / Path(value).expanduser()))
        if must_exist and not path.exists():
            raise ValueError(f"file not found: {path}")
        return path

    return PlainValidator(resolve)


ExistingPath = Annotated[Path, _path(must_exist=True)]
"""A path that must exist when the config is loaded (an input file or folder)."""

OutputPath = Annotated[Path, _path(must_exist=False)]
"""A path that is written to; only resolved, never checked."""

NonNegative = Annotated[float, Field(ge=0)]
"""A number >= 0 (a loss weight, a rate)."""


# ----------------------------------------------------------------------------- errors


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _suggest(word: Any, choices: Sequence[Any]) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _key(loc: Sequence[Any]) -> str:
    """`('train', 'milestones', 1)` → `train.milestones[1]`."""
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _model_at(cls: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The model class holding the key at `loc` (for 'did you mean' suggestions)."""
    annotation: Any = cls
    for part in loc:
        while not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if not args:
                return None
            # Annotated[X, ...] → X; Optional[X], list[X], dict[str, X] → X
            annotation = args[0] if typing.get_origin(annotation) is Annotated else args[-1]
        field = annotation.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


_EXPECTED = {
    "float_type": "float", "int_type": "int", "bool_type": "bool (true or false)", "string_type": "str",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "list_type": "a list", "tuple_type": "a list",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _reason(error: dict, cls: type[BaseModel]) -> str:
    """The reason part of the one-line message for one pydantic error."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    got = f"got {_describe(value)}"
    if kind == "missing":
        return "missing required key"
    if kind == "extra_forbidden":
        parent = _model_at(cls, error["loc"][:-1])
        return "unknown key" + (_suggest(error["loc"][-1], list(parent.model_fields)) if parent else "")
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, {got}"
    if kind in ("literal_error", "enum"):
        choices = ctx["expected"].rsplit(" or ", 1)
        named = kind == "literal_error" and isinstance(value, str)
        hint = _suggest(value, re.findall(r"'([^']*)'", ctx["expected"])) if named else ""
        return f"expected one of {', '.join(choices)}, {got}{hint}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"must be {_BOUNDS[kind]} {_number(bound)}, {got}"
    if kind == "finite_number":
        return f"must be a finite number, {got}"
    if kind in ("too_long", "too_short") and ctx.get("field_type") == "Tuple":
        return f"expected a list of {ctx.get('max_length', ctx.get('min_length'))} items, got a list with " \
               f"{ctx['actual_length']} items"
    if kind in ("too_long", "too_short"):
        limit = f"at most {ctx['max_length']}" if kind == "too_long" else f"at least {ctx['min_length']}"
        return f"expected {limit} items, got {ctx['actual_length']}"
    if kind in ("value_error", "assertion_error"):
        return " ".join(str(ctx["error"]).split())
    return error["msg"]


def _first(exc: ValidationError) -> dict:
    """The error to report: the first unknown key, else the first error."""
    errors = exc.errors()
    return next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])


def error_line(exc: ValidationError, cls: type[BaseModel], where: str = "") -> str:
    """One line for the first error of `exc`: `where.key.path: reason`."""
    error = _first(exc)
    key = _key(error["loc"])
    key = f"{where}.{key}" if where and key else where or key
    return f"{key}: {_reason(error, cls)}" if key else _reason(error, cls)


@contextlib.contextmanager
def _as_config_error(cls: type[BaseModel], where: str = ""):
    try:
        yield
    except ValidationError as exc:
        raise ConfigError(error_line(exc, cls, where)) from None


# ----------------------------------------------------------------------------- models


class ConfigModel(BaseModel):
    """Base of every config and option model: strict, no unknown keys, finite numbers, checked
    on assignment too; a bad value raises `ConfigError` ("key: reason")."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, validate_assignment=True)

    def __init__(self, **data: Any):
        with _as_config_error(type(self)):
            super().__init__(**data)

    # only wraps pydantic's own __init__: tell pydantic so, or it would validate nested models
    # through it (without the validation context that carries the config file's folder)
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        with _as_config_error(type(self)):
            super().__setattr__(name, value)


def validated(cls: type[Model], data: Any, where: str = "", base_dir: Path | None = None) -> Model:
    """`data` validated as `cls`; errors raise `ConfigError` reading `where.key: reason`."""
    with _as_config_error(cls, where):
        return cls.model_validate(data, context={"base_dir": base_dir})


# ----------------------------------------------------------------------------- public API


def config_from_dict(
    data: dict, cls: type[Model], source: str = "<config>", base_dir: Path | None = None
) -> Model:
    """Build model `cls` from a plain dict; relative paths are resolved against `base_dir`
    (default: the current folder). Errors read `source: key.path: reason`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    base = Path(os.path.abspath(base_dir if base_dir is not None else Path.cwd()))
    try:
        return cls.model_validate(data, context={"base_dir": base})
    except ValidationError as exc:
        raise ConfigError(f"{source}: {error_line(exc, cls)}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """Split a `--set` item `"train.lr=0.1"` into ("train.lr", 0.1); the value is YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.strip() for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.001")
    return key, _parse_yaml(text, f"--set {key}")


def _from_command_line(value: Any) -> Any:
    """`value` with every string in it marked as given on the command line."""
    if isinstance(value, str):
        return _CommandLineText(value)
    if isinstance(value, list):
        return [_from_command_line(v) for v in value]
    if isinstance(value, dict):
        return {k: _from_command_line(v) for k, v in value.items()}
    return value


def _apply_override(data: dict, key: str, value: Any, source: str) -> None:
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"{source}: {where}: expected a mapping, got {_describe(child)}")
        node = child
    node[parts[-1]] = _from_command_line(value)


def _is_under(key: str, parent: str) -> bool:
    return key == parent or key.startswith(parent + ".") or key.startswith(parent + "[")


def load_config(path: str | os.PathLike, cls: type[Model], overrides: Sequence[str] = ()) -> Model:
    """Read a YAML file into model `cls`, after applying `--set` style `overrides`
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
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")

    parsed = [(item, *parse_override(item)) for item in overrides]
    for item, key, value in parsed:
        _apply_override(data, key, value, f"{source} (--set {item})")
    try:
        return cls.model_validate(data, context={"base_dir": Path(os.path.abspath(file.parent))})
    except ValidationError as exc:
        key = _key(_first(exc)["loc"])
        culprit = [i for i, k, _ in parsed if key and (_is_under(key, k) or _is_under(k, key))]
        where = f"{source} (--set {culprit[-1]})" if culprit else source
        raise ConfigError(f"{where}: {error_line(exc, cls)}") from None


def config_to_dict(obj: BaseModel) -> Any:
    """A config as plain JSON/YAML-ready data: Paths become str, tuples lists, enums values."""
    return obj.model_dump(mode="json")


def dump_config(obj: BaseModel, path: str | os.PathLike) -> None:
    """Write a config as YAML, atomically; `load_config` reads it back to an equal object."""
    text = yaml.safe_dump(config_to_dict(obj), sort_keys=False, allow_unicode=True)
    atomic_write_text(path, text)

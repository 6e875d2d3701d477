"""Typed configs with strict loading.

Every config in memllm is a dataclass; YAML/JSON is only its serialisation. Loading is strict:
an unknown key, a wrong type or an impossible value raises :class:`ConfigError` with one line that
names the key (and the file when there is one), before anything is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml

from memllm.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is lossless."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
                if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    raise  # an optional section: its own error names the key inside it
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no / off / yes / on as a bool
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            spelled = [a for a in get_args(tp) if isinstance(a, str) and a.lower() in words]
            if len(spelled) == 1:
                return spelled[0]
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{key}: must be one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (Any, Any)
        return {k: _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        # YAML reads "1e-3" as a string; accept numeric strings and ints for floats.
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        # No setting means "unbounded" by inf (null does), and nan compares false with every
        # bound check: both would only surface later as a NaN stop.
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types are errors.

    After construction the dataclass's ``__post_init__`` validates values and raises
    :class:`ConfigError` for impossible ones.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s} (known keys: {known})")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith(prefix) else f"{prefix}{msg}") from None
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (tuples become lists, for YAML/JSON)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


# A YAML alias (``*name``) repeats a value without copying it, so a few lines can stand for
# billions of values (an "alias bomb"), which memllm would expand when it copies or walks the
# config. Real configs share a few sections; this bounds the expanded size instead of aliases.
MAX_YAML_VALUES = 100_000


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML keeps the last).

    Keys brought in by a merge (``<<: *base``) may be overridden by the mapping's own keys.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: the base class says so
                    break
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def expanded_size(value: Any, limit: int = MAX_YAML_VALUES) -> int:
    """How many values ``value`` holds with every shared (aliased) part counted each time.

    Stops counting past ``limit`` (returns ``limit + 1``) so that a bomb costs nothing.
    """
    memo: dict[int, int] = {}

    def size(v: Any) -> int:
        if not isinstance(v, (dict, list)):
            return 1
        if id(v) in memo:
            return memo[id(v)]
        memo[id(v)] = limit + 1  # a cycle (``&a [*a]``) counts as too big
        children = v.values() if isinstance(v, dict) else v
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                break
        memo[id(v)] = min(total, limit + 1)
        return memo[id(v)]

    return size(value)


def safe_load_yaml(text: str, where: str) -> Any:
    """Parse YAML text strictly: no duplicate keys, no alias expansion past
    :data:`MAX_YAML_VALUES`; errors are one :class:`ConfigError` line that starts with ``where``.
    """
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}:{line} invalid YAML ({getattr(err, 'problem', err)})") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid YAML (nested too deeply)") from None
    if expanded_size(data) > MAX_YAML_VALUES:
        raise ConfigError(
            f"{where}: YAML aliases (*name) expand to more than {MAX_YAML_VALUES:,} values; "
            "write the repeated sections out or use fewer aliases"
        )
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping strictly; every problem is one :class:`ConfigError` naming the file.

    Refused: a missing file or a folder, bytes that are not UTF-8, a syntax error, a key given
    twice in one mapping, aliases that expand past :data:`MAX_YAML_VALUES` values, an empty file
    (it would silently run on defaults) and a top level that is not a mapping.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
        ) from None
    data = safe_load_yaml(text, str(path))
    if data is None:
        raise ConfigError(f"{path}: the config is empty (no keys); write at least one setting")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse a command-line override ``a.b.c=value``; the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    if not key or "" in key.split("."):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = safe_load_yaml(raw, f"override {item!r}") if raw != "" else ""
    except ConfigError as err:
        if "expand to more than" in str(err):
            raise
        value = raw  # not YAML: the text itself (e.g. a path with a colon)
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted ``key=value`` overrides applied."""
    out = _unshared_copy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a mapping")
            node = child
        node[path[-1]] = value
    return out


def _unshared_copy(value: Any) -> Any:
    """A deep copy in which no two places share an object. YAML aliases (``*anchor``) load as
    one shared mapping, and ``copy.deepcopy`` keeps that sharing: an override of one arm's
    aliased ``train`` section would then change every arm that uses the anchor."""
    if isinstance(value, dict):
        return {k: _unshared_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared_copy(v) for v in value]
    return value


def field_help(cls: type) -> dict[str, str]:
    """Each field's help text, taken from ``metadata={"help": ...}``."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def check(condition: bool, key: str, message: str) -> None:
    """Raise a one-line :class:`ConfigError` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")

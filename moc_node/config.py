"""Load the node's configuration: TOML file, then `MOC_<SECTION>__<KEY>` environment overrides.

Each package owns the dataclass of its sections; this module only composes them and converts
plain TOML values into those dataclasses, checking every type. Any unknown key or bad value stops
the start with one `ConfigError` line naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from actors.goals.config import GoalsConfig
from actors.learning.config import LearningConfig
from actors.serving.config import ModelsConfig, ResilienceConfig, ResourcesConfig
from cluster.config import ClusterConfig, require_enabled
from cluster.config import from_mapping as cluster_from_mapping
from transports.config import ServerConfig

ENV_PREFIX = "MOC_"


class ConfigError(Exception):
    """The configuration has an unknown key or a bad value; the message names the key."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """[node]: who this node is and where it keeps its files."""

    name: str = field(default_factory=socket.gethostname)
    """Node name in the cluster, logs and metrics; defaults to the host name."""
    state_dir: str = ".state"
    """SQLite state, worker sockets and generated models live here (relative to the working
    directory; the systemd example uses /var/lib/moc-node)."""
    model_dirs: tuple[str, ...] = ()
    """Directories models may be loaded from; loads by path outside them are refused. Empty means
    only `<state_dir>/models`."""
    drain_timeout: float = 30.0
    """Seconds SIGTERM waits for in-flight requests before unloading anyway."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must not be empty")
        if self.drain_timeout < 0:
            raise ValueError("drain_timeout: must be >= 0 seconds")

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).resolve()

    @property
    def model_paths(self) -> tuple[Path, ...]:
        """The allowed model directories, resolved; the state's own models dir is always one."""
        dirs = [Path(d).resolve() for d in self.model_dirs]
        own = self.state_path / "models"
        return tuple(dirs) if own in dirs else (*dirs, own)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration; one attribute per TOML section."""

    node: NodeConfig = field(default_factory=NodeConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    learning: LearningConfig = field(default_factory=LearningConfig)
    goals: GoalsConfig = field(default_factory=GoalsConfig)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any), apply environment overrides and build a checked Config."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as exc:
            raise ConfigError(f"config file {path}: cannot read it: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path}: not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except RecursionError:  # tomllib recurses per nesting level
            raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    _apply_env(data, os.environ if env is None else env)
    return from_mapping(data)


def from_mapping(data: Mapping[str, Any]) -> Config:
    """Build a checked Config from parsed TOML (environment overrides already applied)."""
    data = dict(data)
    # Sections with presets build themselves: `profile` picks the base the other keys override.
    loaders = {"cluster": _cluster}
    custom: dict[str, Any] = {}
    for name, loader in loaders.items():
        if name in data:
            table = data.pop(name)
            if not isinstance(table, dict):
                raise ConfigError(f"{name}: expected a table")
            try:
                custom[name] = loader(table)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    config: Config = build(Config, data, "")
    return dataclasses.replace(config, **custom) if custom else config


def _cluster(table: Mapping[str, Any]) -> ClusterConfig:
    require_enabled(table)
    return cluster_from_mapping(table)


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
        if not all(parts):
            raise ConfigError(f"{key}: expected MOC_<SECTION>__<KEY>, a name is empty")
        target = data
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{key}: {part} is not a table")
        target[parts[-1]] = _parse_env_value(raw)


def _parse_env_value(raw: str) -> Any:
    """Read an env value as a TOML value (numbers, booleans, arrays), else as a plain string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return raw


def build(cls: type[Any], values: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a TOML table, checking keys and types; errors name the key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a table, got {type(values).__name__}")
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in values:
            raise ConfigError(f"{prefix + '.' if prefix else ''}{f.name}: required key is missing")
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"{dotted}: unknown key")
        kwargs[key] = _convert(hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{exc}") from None


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _type_hints(cls: type[Any]) -> dict[str, Any]:
    # Evaluating the string annotations is most of the cost of a load; the classes never change.
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(typing.cast(type, hint), value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple or origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0]
        return tuple(_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            raise ConfigError(f"{key}: {value} is too large") from None
        # No key means "forever" by infinity, and NaN fails every range check silently.
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if hint is Any:
        return value
    raise ConfigError(f"{key}: unsupported config type {hint!r}")


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def describe_sections() -> list[tuple[str, type[Any]]]:
    """List (section, dataclass) pairs, for the generated configuration reference."""
    hints = typing.get_type_hints(Config)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(Config)]

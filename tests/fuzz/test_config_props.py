"""Property tests of the config path `moc-node run` takes: load, then preflight.

Every key of every section (found from the config dataclasses, so a key added later is fuzzed
too) gets values of the wrong type and the wrong range, paths to the wrong kind of file, and
tables where a value belongs; keys are removed and unknown ones added. Whatever the input, the
outcome is a started-able config or one `ConfigError` line that names a key: never another
exception, which `moc-node run` would print as a traceback instead of exiting 2.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import re
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moc_node.config import Config, ConfigError, from_mapping, load_config
from moc_node.preflight import preflight

SETTINGS = settings(
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

KEY_HEX = "00112233445566778899aabbccddeeff"

Path_ = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: where it sits in the TOML table (list items at index 0), and its type."""

    path: Path_
    hint: Any


def config_keys(cls: type[Any] = Config, prefix: Path_ = ()) -> list[Key]:
    """Every key of the config, read from the dataclasses."""
    found: list[Key] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        path = (*prefix, f.name)
        found.append(Key(path, hint))
        args = typing.get_args(hint)
        if dataclasses.is_dataclass(hint):
            found.extend(config_keys(typing.cast(type, hint), path))
        elif args and dataclasses.is_dataclass(args[0]):
            found.extend(config_keys(typing.cast(type, args[0]), (*path, 0)))
    return found


KEYS = config_keys()
SECTIONS = [f.name for f in dataclasses.fields(Config)]

WRONG_NUMBERS: list[Any] = [
    0, 1, -1, 65535, 65536, 2**31, 2**63 - 1, -(2**63), 10**30, 10**400,
    0.0, -0.0, 0.5, -2.5, 1e-300, 1e300, float("inf"), float("-inf"), float("nan"),
]
WRONG_SHAPES: list[Any] = [
    True, False, "", "x", [], [1], ["x", "x"], [[]], {}, {"x": 1}, {"name": "m"},
    datetime.datetime(1979, 5, 27, 7, 32, tzinfo=datetime.UTC), datetime.date(1979, 5, 27),
    datetime.time(7, 32),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files of every kind a path key may name: good ones and wrong ones."""
    root = tmp_path_factory.mktemp("config-fuzz")
    for name in ("models", "data", "eval", "dir"):
        (root / name).mkdir()
    (root / "models" / "m.gguf").write_bytes(b"GGUF")
    (root / "api.keys").write_text("api-key\n")
    (root / "cluster.key").write_text(KEY_HEX + "\n")
    (root / "bad.key").write_text("neither hex nor base64\n")
    (root / "binary").write_bytes(b"\xff\xfe\x00\x01")
    (root / "empty").write_text("")
    return root


def base(root: Path) -> dict[str, Any]:
    """A valid config that sets every section, so each key is checked in context."""
    return {
        "node": {
            "name": "fuzz",
            "state_dir": str(root / "state"),
            "model_dirs": [str(root / "models")],
            "drain_timeout": 5.0,
        },
        "server": {
            "host": "127.0.0.1",
            "rest_port": 0,
            "zmq_port": 0,
            "grpc_port": 0,
            "api_keys": ["inline"],
            "api_key_file": str(root / "api.keys"),
        },
        "resources": {"devices": "simulated", "simulated": [{"name": "sim0", "total_mb": 1000}]},
        "models": {
            "keep_alive": "5m",
            "catalog": [{"name": "m", "path": str(root / "models" / "m.gguf"), "preload": True}],
        },
        "resilience": {
            "circuit_breaker": {"failure_threshold": 4, "reset_timeout": 20},
            "bulkhead": {"max_concurrent": 8, "max_queue_size": 16},
        },
        "cluster": {
            "enabled": True,
            "profile": "local",
            "bind": "127.0.0.1:7946",
            "peer_port": 7213,
            "seeds": ["127.0.0.1:7947"],
            "voters": ["fuzz", "b", "c"],
            "key_file": str(root / "cluster.key"),
        },
        "learning": {"dataset_dirs": [str(root / "data")]},
        "goals": {"eval_dirs": [str(root / "eval")]},
    }


def special_strings(root: Path) -> list[str]:
    """Strings that mean something to some key: paths of every kind, addresses, enum values."""
    paths = ["models", "models/m.gguf", "api.keys", "cluster.key", "bad.key", "binary", "empty"]
    return [
        *(str(root / p) for p in paths),
        str(root / "dir"),
        str(root / "missing" / "file"),
        "/",
        "/dev/null",
        "/dev/zero",
        "/proc/self",
        "",
        " ",
        "\x00",
        "a\x00b",
        "line\nbreak",
        "relative/path",
        "127.0.0.1:7946",
        "0.0.0.0:7946",
        "[::1]:7946",
        "127.0.0.1:0",
        "127.0.0.1:70000",
        "host:port",
        "5m",
        "-1",
        "0",
        "soon",
        "auto",
        "cpu",
        "simulated",
        "gguf",
        "torch",
        "lan",
        "local",
        "lora",
    ]


def toml_values(root: Path) -> st.SearchStrategy[Any]:
    """Any value tomllib can produce, weighted towards edges."""
    scalars = st.one_of(
        st.booleans(),
        st.integers(),
        st.floats(),  # nan and the infinities included: TOML has them
        st.sampled_from(WRONG_NUMBERS),
        st.text(max_size=12),
        st.sampled_from(special_strings(root)),
        st.sampled_from(WRONG_SHAPES),
        st.datetimes(),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.dictionaries(st.sampled_from(["name", "path", "x", "enabled"]), inner, max_size=3),
        ),
        max_leaves=6,
    )


def values_for(hint: Any, root: Path) -> st.SearchStrategy[Any]:
    """Values aimed at one key: its type's edges and the wrong types, then anything at all."""
    anything = toml_values(root)
    strings = st.one_of(st.sampled_from(special_strings(root)), st.text(max_size=12))
    args = typing.get_args(hint)
    if hint in (int, float):
        aimed: st.SearchStrategy[Any] = st.one_of(
            st.sampled_from(WRONG_NUMBERS), st.integers(), st.floats()
        )
    elif dataclasses.is_dataclass(hint):
        names = [f.name for f in dataclasses.fields(hint)]
        aimed = st.dictionaries(st.sampled_from(names), anything, max_size=3)
    elif args and dataclasses.is_dataclass(args[0]):
        names = [f.name for f in dataclasses.fields(args[0])]
        aimed = st.lists(st.dictionaries(st.sampled_from(names), anything, max_size=3), max_size=2)
    elif args and args[0] is str and typing.get_origin(hint) is tuple:
        aimed = st.lists(st.one_of(strings, anything), max_size=3)
    else:  # strings, optional strings, literals, booleans
        aimed = st.one_of(strings, st.sampled_from([*args, *WRONG_SHAPES]))
    return st.one_of(aimed, aimed, anything)


def set_at(data: dict[str, Any], path: Path_, value: Any, delete: bool = False) -> None:
    """Set (or delete) the value at `path`, if the tables on the way are still tables."""
    target: Any = data
    for part in path[:-1]:
        if isinstance(target, dict) and isinstance(part, str):
            target = target.setdefault(part, {})
        elif isinstance(target, list) and isinstance(part, int) and part < len(target):
            target = target[part]
        else:
            return
    last = path[-1]
    if isinstance(target, dict) and isinstance(last, str):
        if delete:
            target.pop(last, None)
        else:
            target[last] = value


def edits(root: Path) -> st.SearchStrategy[list[tuple[str, Path_, Any]]]:
    """One to three edits: set a key, remove it, or add an unknown one beside it."""
    unknown = st.from_regex(r"[a-z_]{1,10}", fullmatch=True)
    set_one = st.sampled_from(KEYS).flatmap(
        lambda key: st.tuples(st.just("set"), st.just(key.path), values_for(key.hint, root))
    )
    one = st.one_of(
        set_one,
        set_one,
        set_one,
        st.tuples(st.just("delete"), st.sampled_from([k.path for k in KEYS]), st.none()),
        st.tuples(
            st.just("unknown"),
            st.tuples(st.sampled_from(SECTIONS), unknown),
            toml_values(root),
        ),
        st.tuples(st.just("section"), st.sampled_from(SECTIONS).map(lambda s: (s,)), st.integers()),
    )
    return st.lists(one, min_size=1, max_size=3)


KEY_AT_START = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)[.:\[]")


def assert_one_line_naming_a_key(error: ConfigError, names: set[str]) -> None:
    message = str(error)
    assert "\n" not in message, message
    match = KEY_AT_START.match(message)
    assert match is not None and match.group(1) in names, message


def start_checks(data: dict[str, Any]) -> None:
    """What `moc-node run` does with a parsed file before anything is built or bound."""
    try:
        preflight(from_mapping(data))
    except ConfigError as error:
        assert_one_line_naming_a_key(error, set(data) | set(SECTIONS))


def test_the_fuzzing_base_config_passes_the_preflight(root: Path) -> None:
    keys = preflight(from_mapping(base(root)))
    assert keys.api == {"inline", "api-key"}
    assert len(KEYS) > 100  # every section's keys are in the list


def test_every_key_with_every_wrong_value_is_accepted_or_one_line_naming_a_key(
    root: Path,
) -> None:
    """Each key alone, set to each wrong number, shape and special string, then removed."""
    values = [*WRONG_NUMBERS, *WRONG_SHAPES, *special_strings(root)]
    tried = 0
    for key in KEYS:
        for value in values:
            table = base(root)
            set_at(table, key.path, value)
            start_checks(table)
            tried += 1
        table = base(root)
        set_at(table, key.path, None, delete=True)
        start_checks(table)
    assert tried == len(KEYS) * len(values)


@SETTINGS
@given(data=st.data())
def test_any_edit_of_any_key_is_accepted_or_one_line_naming_a_key(
    root: Path, data: st.DataObject
) -> None:
    table = copy.deepcopy(base(root))
    for kind, path, value in data.draw(edits(root)):
        if kind == "section":
            table[str(path[0])] = value
        else:
            set_at(table, path, value, delete=kind == "delete")
    start_checks(table)


ENV_KEYS = [k.path for k in KEYS if not any(isinstance(part, int) for part in k.path)]


@SETTINGS
@given(
    overrides=st.dictionaries(
        st.one_of(
            st.sampled_from(ENV_KEYS).map(lambda p: "MOC_" + "__".join(map(str, p)).upper()),
            st.from_regex(r"MOC_[A-Z_]{0,12}__[A-Z_]{0,12}", fullmatch=True),
        ),
        st.one_of(
            st.text(max_size=16),
            st.sampled_from(
                ["true", "1e400", "1" + "0" * 400, "nan", "-inf", "[1, 2]", "{a = 1}", "[[[]]]"]
            ),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_any_environment_override_is_accepted_or_one_line_naming_a_key(
    overrides: dict[str, str],
) -> None:
    try:
        config = load_config(None, env=overrides)
        preflight(config)
    except ConfigError as error:
        message = str(error)
        assert "\n" not in message
        if not message.startswith("MOC_"):  # an override that is not a table names itself
            assert_one_line_naming_a_key(error, set(SECTIONS) | _sections_named(overrides))


def _sections_named(overrides: dict[str, str]) -> set[str]:
    return {key[len("MOC_") :].split("__")[0].lower() for key in overrides}

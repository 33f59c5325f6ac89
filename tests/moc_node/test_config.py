from __future__ import annotations

from pathlib import Path

import pytest

from moc_node.config import ConfigError, load_config

FULL = """
[node]
name = "gpu-01"
state_dir = "/var/lib/moc-node"
model_dirs = ["/models"]

[server]
host = "0.0.0.0"
zmq_port = 7211
rest_port = 8008
max_workers = 16
api_keys = []

[resources]
devices = "simulated"
gpu_poll_interval = 5
vram_soft_limit_mb = 0
eviction_threshold_pct = 90
reserve_mb = 512

[[resources.simulated]]
name = "sim0"
total_mb = 24576

[models]
keep_alive = "5m"
max_loaded = 0

[[models.catalog]]
name = "tiny"
path = "/models/tiny.gguf"
backend = "gguf"
n_ctx = 2048
gpu_layers = -1
preload = false
pin = false

[resilience]
circuit_breaker = { failure_threshold = 4, reset_timeout = 20 }
bulkhead = { max_concurrent = 64, max_queue_size = 256 }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_the_documented_example_config_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL), env={})
    assert config.node.name == "gpu-01"
    assert config.resources.simulated[0].total_mb == 24576
    assert config.resources.gpu_poll_interval == 5.0
    assert config.models.catalog[0].name == "tiny"
    assert config.models.keep_alive_seconds == 300
    assert config.resilience.bulkhead.max_queue_size == 256
    assert config.server.zmq_port == 7211


def test_no_file_gives_working_defaults() -> None:
    config = load_config(None, env={})
    assert config.server.rest_port == 8008
    assert config.resources.devices == "auto"
    assert config.node.model_paths[-1] == config.node.state_path / "models"


def test_environment_overrides_any_key() -> None:
    env = {
        "MOC_SERVER__REST_PORT": "9000",
        "MOC_NODE__MODEL_DIRS": '["/a", "/b"]',
        "MOC_RESILIENCE__BULKHEAD__MAX_CONCURRENT": "3",
        "MOC_NODE__NAME": "box-7",
        "UNRELATED": "x",
    }
    config = load_config(None, env=env)
    assert config.server.rest_port == 9000
    assert config.node.model_dirs == ("/a", "/b")
    assert config.resilience.bulkhead.max_concurrent == 3
    assert config.node.name == "box-7"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node]\nnmae = 'x'\n", "node.nmae: unknown key"),
        ("[server]\nrest_port = 'eighty'\n", "server.rest_port: expected an integer"),
        ("[resources]\ndevices = 'tpu'\n", "resources.devices: expected one of"),
        ("[resources]\neviction_threshold_pct = 150\n", "resources.eviction_threshold_pct"),
        ("[resources]\nworker_nice = -5\n", "resources.worker_nice: must be in 0..19"),
        ("[resources]\nhuge_pages = 'yes'\n", "resources.huge_pages"),
        ("[models]\nkeep_alive = 'soon'\n", "models.keep_alive"),
        ("[[models.catalog]]\nname = 'a'\n", "models.catalog[0]"),
        (
            "[[models.catalog]]\nname = 'a'\npath = 'a.gguf'\nbackend = 'onnx'\n",
            "models.catalog[0].backend",
        ),
        ("[resilience]\nbulkhead = { max_concurrent = 0 }\n", "resilience.bulkhead.max_concurrent"),
        ("[learning]\nmax_parallel_jobs = 'two'\n", "learning.max_parallel_jobs"),
        ("[bogus]\n", "bogus: unknown key"),
        ("[node\n", "not valid TOML"),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "bad-enum",
        "out-of-range",
        "negative-nice",
        "huge-pages-not-bool",
        "bad-duration",
        "missing-field",
        "bad-backend",
        "nested-range",
        "learning-section",
        "unknown-section",
        "broken-toml",
    ],
)
def test_a_bad_config_stops_with_one_line_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), env={})
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_missing_config_file_is_named() -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/moc.toml", env={})


def test_the_cluster_section_applies_its_profile_then_the_overrides(tmp_path: Path) -> None:
    text = '[cluster]\nenabled = true\nprofile = "local"\nvoters = ["a", "b", "c"]\n'
    config = load_config(write(tmp_path, text), env={})
    assert config.cluster.voters == ("a", "b", "c")
    assert config.cluster.probe_interval_s < 1.0  # the local preset, not the LAN default


def test_a_bad_cluster_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cluster.bogus"):
        load_config(write(tmp_path, "[cluster]\nbogus = 1\n"), env={})


@pytest.mark.parametrize("key", ["seeds", "voters"])
def test_seeds_or_voters_without_enabled_are_refused_naming_the_key(
    tmp_path: Path, key: str
) -> None:
    text = f'[cluster]\n{key} = ["10.0.0.1:7946"]\n'
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), env={})
    assert str(error.value).startswith(f"cluster.{key}: set without `enabled`")


def test_seeds_from_the_environment_without_enabled_are_refused_too() -> None:
    with pytest.raises(ConfigError, match="cluster.seeds: set without `enabled`"):
        load_config(None, env={"MOC_CLUSTER__SEEDS": '["10.0.0.1:7946"]'})


def test_an_explicit_enabled_false_keeps_a_cluster_section_inert(tmp_path: Path) -> None:
    text = '[cluster]\nenabled = false\nseeds = ["10.0.0.1:7946"]\nvoters = ["a"]\n'
    config = load_config(write(tmp_path, text), env={})
    assert not config.cluster.enabled
    assert config.cluster.seeds == ("10.0.0.1:7946",)


def test_an_enabled_cluster_on_a_wildcard_bind_needs_advertise(tmp_path: Path) -> None:
    text = '[cluster]\nenabled = true\nbind = "0.0.0.0:7946"\n'
    with pytest.raises(ConfigError, match="cluster.advertise: required"):
        load_config(write(tmp_path, text), env={})
    text += 'advertise = "10.0.0.5:7946"\n'
    assert load_config(write(tmp_path, text), env={}).cluster.advertise == "10.0.0.5:7946"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node]\ndrain_timeout = inf\n", "node.drain_timeout: expected a finite number"),
        ("[node]\ndrain_timeout = nan\n", "node.drain_timeout: expected a finite number"),
        ("[node]\ndrain_timeout = 1" + "0" * 400 + "\n", "node.drain_timeout: 1000"),
        ("[cluster]\nlease_s = inf\n", "cluster.lease_s: must be a finite number"),
        ("[cluster]\nlease_s = 1" + "0" * 400 + "\n", "cluster.lease_s: 1000"),
        ("[cluster]\nprofile = ['lan']\n", "cluster.profile: must be one of"),
        ("[cluster]\nmax_stream_bytes = 10\n", "cluster.max_stream_bytes: must be >="),
    ],
    ids=[
        "inf",
        "nan",
        "too-large-for-a-float",
        "cluster-inf",
        "cluster-too-large",
        "profile-a-list",
        "stream-below-a-packet",
    ],
)
def test_numbers_no_timer_can_use_are_refused_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), env={})
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_a_config_path_that_is_a_directory_or_not_text_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(tmp_path, env={})
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[node]\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(binary, env={})


def test_toml_nested_past_the_parser_s_recursion_is_one_line(tmp_path: Path) -> None:
    deep = "a = " + "[" * 5000 + "]" * 5000 + "\n"
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, deep), env={})

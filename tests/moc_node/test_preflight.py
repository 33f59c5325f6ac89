"""The preflight: a config that cannot start stops with one line naming the key, before any port.

Pure checks run on configs built from TOML-shaped tables; the file checks use real files in
`tmp_path`; the start tests run the real `serve` (actors, listeners) against ports taken by a
socket of the test's own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pykka
import pytest
import zmq

from moc_node.app import Front, Runtime, default_servers, serve
from moc_node.config import Config, ConfigError, from_mapping, load_config
from moc_node.node import Node
from moc_node.preflight import Keys, Listener, check_listeners, preflight
from moc_node.witness import serve_witness
from tests.support import wait_for

KEY_HEX = "00112233445566778899aabbccddeeff"
SECRET_LINE = "zz-secret-looking-line"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def table(tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A valid single-node table in `tmp_path`, with `sections` merged over it."""
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    data: dict[str, Any] = {
        "node": {"name": "pre", "state_dir": str(tmp_path / "state"), "model_dirs": [str(models)]},
        "server": {"host": "127.0.0.1", "rest_port": 0, "zmq_port": 0, "grpc_port": 0},
        "resources": {"devices": "cpu"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def config_of(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    return from_mapping(table(tmp_path, **sections))


def refusal(config: Config) -> str:
    """Run the preflight, which must refuse `config`; return its one-line message."""
    with pytest.raises(ConfigError) as error:
        preflight(config)
    message = str(error.value)
    assert "\n" not in message
    return message


def cluster(tmp_path: Path, **values: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "profile": "local",
        "bind": f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
        "peer_port": free_port(),
        **values,
    }


# ---- key files -------------------------------------------------------------------------


def test_a_good_config_gives_the_keys_its_files_hold(tmp_path: Path) -> None:
    (tmp_path / "api.keys").write_text("# ops\nfile-key\n", encoding="utf-8")
    (tmp_path / "cluster.key").write_text(f"{KEY_HEX}\n", encoding="ascii")
    config = config_of(
        tmp_path,
        server={"api_keys": ["inline"], "api_key_file": str(tmp_path / "api.keys")},
        cluster=cluster(tmp_path, key_file=str(tmp_path / "cluster.key")),
    )
    keys = preflight(config)
    assert keys.api == {"inline", "file-key"}
    assert keys.cluster.keys == (bytes.fromhex(KEY_HEX),)


def test_the_preflight_writes_nothing(tmp_path: Path) -> None:
    preflight(config_of(tmp_path))
    assert not (tmp_path / "state").exists()


def _fifo(path: Path) -> None:
    os.mkfifo(path)


BAD_CLUSTER_KEYS: list[tuple[str, Any, str]] = [
    ("neither-hex-nor-base64", f"{KEY_HEX}\n{SECRET_LINE}\n", "line 2: neither hex nor base64"),
    ("short-key", "00112233\n", "line 1: key shorter than 16 bytes"),
    ("no-key", "# only a comment\n\n", "holds no key"),
    ("binary", b"\xff\xfe" + SECRET_LINE.encode(), "not ASCII text"),
    ("too-large", "#" * (1024 * 1024 + 1), "is larger than"),
    ("a-directory", "dir", "is not a regular file"),
    ("a-fifo", "fifo", "is not a regular file"),
    ("missing", None, "does not exist"),
]


@pytest.mark.parametrize(
    ("content", "message"), [c[1:] for c in BAD_CLUSTER_KEYS], ids=[c[0] for c in BAD_CLUSTER_KEYS]
)
def test_a_bad_cluster_key_file_is_one_line_naming_the_key_and_never_its_contents(
    tmp_path: Path, content: Any, message: str
) -> None:
    path = tmp_path / "cluster.key"
    if content == "dir":
        path.mkdir()
    elif content == "fifo":
        _fifo(path)  # opening it would block: refused by its type first
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="ascii")
    config = config_of(tmp_path, cluster=cluster(tmp_path, key_file=str(path)))
    text = refusal(config)
    assert text.startswith(f"cluster.key_file: {str(path)!r}")
    assert message in text
    assert SECRET_LINE not in text


def test_a_cluster_key_file_is_checked_even_while_the_cluster_is_off(tmp_path: Path) -> None:
    config = config_of(
        tmp_path, cluster={"enabled": False, "key_file": str(tmp_path / "not-yet.key")}
    )
    assert refusal(config).startswith("cluster.key_file:")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("# no key here\n", "holds no key"),
        (b"\xff\xfekey\n", "not UTF-8 text"),
        ("dir", "is not a regular file"),
    ],
    ids=["missing", "no-key", "not-utf-8", "a-directory"],
)
def test_a_bad_api_key_file_is_one_line_naming_the_key(
    tmp_path: Path, content: Any, message: str
) -> None:
    path = tmp_path / "api.keys"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    text = refusal(config_of(tmp_path, server={"api_key_file": str(path)}))
    assert text.startswith("server.api_key_file: ")
    assert message in text


def test_the_zmq_curve_key_files_are_read_by_the_preflight(tmp_path: Path) -> None:
    public, secret = zmq.curve_keypair()
    (tmp_path / "server.key").write_bytes(secret + b"\n")
    (tmp_path / "clients").write_bytes(public + b"\n")
    server = {
        "zmq_curve_secret_key_file": str(tmp_path / "server.key"),
        "zmq_curve_client_keys_file": str(tmp_path / "clients"),
    }
    keys = preflight(config_of(tmp_path, server=server))
    assert keys.zmq.curve_public_key == public
    assert keys.zmq.curve_client_keys == {public}


@pytest.mark.parametrize(
    ("key", "content", "message"),
    [
        ("zmq_curve_secret_key_file", SECRET_LINE, "holds neither a Z85 secret key"),
        ("zmq_curve_secret_key_file", None, "does not exist"),
        ("zmq_curve_client_keys_file", "dir", "is not a regular file"),
    ],
    ids=["secret-not-a-key", "secret-missing", "clients-a-directory"],
)
def test_a_bad_zmq_curve_key_file_is_one_line_naming_its_key(
    tmp_path: Path, key: str, content: str | None, message: str
) -> None:
    _, secret = zmq.curve_keypair()
    good = tmp_path / "good.key"
    good.write_bytes(secret)
    path = tmp_path / "bad"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    server = {"zmq_curve_secret_key_file": str(good), key: str(path)}
    text = refusal(config_of(tmp_path, server=server))
    assert text.startswith(f"server.{key}: ")
    assert message in text
    assert SECRET_LINE not in text


# ---- listeners -------------------------------------------------------------------------


def L(key: str, host: str, port: int) -> Listener:  # noqa: N802 - a table's short constructor
    return Listener(key, host, port)


CLASHES: list[tuple[str, list[Listener], str | None]] = [
    (
        "rest-and-zmq-on-one-port",
        [L("server.rest_port", "127.0.0.1", 9000), L("server.zmq_port", "127.0.0.1", 9000)],
        "server.zmq_port: port 9000 is also server.rest_port",
    ),
    (
        "a-wildcard-overlaps-any-host",
        [L("server.rest_port", "0.0.0.0", 9000), L("cluster.peer_port", "10.0.0.1", 9000)],
        "cluster.peer_port: port 9000 is also server.rest_port",
    ),
    (
        "gossip-on-the-zmq-port",
        [L("server.zmq_port", "10.0.0.1", 7211), L("cluster.bind", "10.0.0.1", 7211)],
        "cluster.bind: port 7211 is also server.zmq_port",
    ),
    (
        "one-port-on-two-hosts",
        [L("server.rest_port", "10.0.0.1", 9000), L("cluster.peer_port", "10.0.0.2", 9000)],
        None,
    ),
    (
        "port-0-is-any-free-port",
        [L("server.rest_port", "127.0.0.1", 0), L("server.zmq_port", "127.0.0.1", 0)],
        None,
    ),
]


@pytest.mark.parametrize(
    ("found", "message"), [c[1:] for c in CLASHES], ids=[c[0] for c in CLASHES]
)
def test_two_listeners_on_one_port_are_refused_before_either_binds(
    found: list[Listener], message: str | None
) -> None:
    if message is None:
        check_listeners(found)
        return
    with pytest.raises(ConfigError) as error:
        check_listeners(found)
    assert str(error.value).startswith(message)


def test_the_config_s_own_listeners_are_checked(tmp_path: Path) -> None:
    config = config_of(tmp_path, server={"rest_port": 9000, "zmq_port": 9000})
    assert refusal(config).startswith("server.zmq_port: port 9000 is also server.rest_port")


def test_an_advertised_name_that_does_not_resolve_is_refused(tmp_path: Path) -> None:
    config = config_of(
        tmp_path, cluster=cluster(tmp_path, advertise="no-such-host.invalid:7946")
    )
    assert refusal(config).startswith("cluster.advertise: 'no-such-host.invalid' does not resolve")


# ---- directories and models ------------------------------------------------------------


def test_a_state_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    assert refusal(config_of(tmp_path)).startswith("node.state_dir: ")
    config = config_of(tmp_path, node={"state_dir": str(tmp_path / "state" / "below")})
    assert refusal(config).startswith("node.state_dir: ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_state_dir_that_cannot_be_created_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    config = config_of(tmp_path, node={"state_dir": str(locked / "state")})
    assert "is not writable by this user" in refusal(config)


@pytest.mark.parametrize(
    ("sections", "start"),
    [
        ({"node": {"model_dirs": ["/nonexistent/models"]}}, "node.model_dirs[0]: "),
        ({"node": {"model_dirs": ["/dev/null"]}}, "node.model_dirs[0]: "),
        ({"node": {"state_dir": "bad\x00dir"}}, "node.state_dir: "),
        ({"learning": {"dataset_dirs": ["/nonexistent/data"]}}, "learning.dataset_dirs[0]: "),
        ({"goals": {"eval_dirs": ["/nonexistent/eval"]}}, "goals.eval_dirs[0]: "),
        ({"learning": {"job_store": "/"}}, "learning.job_store: "),
        ({"goals": {"goal_store": "/dev/null/goals.db"}}, "goals.goal_store: "),
    ],
    ids=[
        "model-dir-missing",
        "model-dir-a-device",
        "nul-in-a-path",
        "dataset-dir-missing",
        "eval-dir-missing",
        "job-store-a-directory",
        "goal-store-below-a-device",
    ],
)
def test_directories_the_node_cannot_use_are_refused_naming_the_key(
    tmp_path: Path, sections: dict[str, dict[str, Any]], start: str
) -> None:
    assert refusal(config_of(tmp_path, **sections)).startswith(start)


def catalog(tmp_path: Path, **entry: Any) -> dict[str, Any]:
    return {"catalog": [{"name": "m", "path": str(tmp_path / "models" / "m.gguf"), **entry}]}


def test_a_preloaded_model_whose_file_is_missing_is_refused(tmp_path: Path) -> None:
    text = refusal(config_of(tmp_path, models=catalog(tmp_path, preload=True)))
    assert text.endswith("no such file, and the model is preloaded")
    legacy = {**catalog(tmp_path), "preload": ["m"]}  # the legacy list preloads it too
    assert refusal(config_of(tmp_path, models=legacy)).startswith("models.catalog[0].path:")


def test_a_model_not_preloaded_may_be_missing_here_as_in_a_cluster_it_lives_elsewhere(
    tmp_path: Path,
) -> None:
    preflight(config_of(tmp_path, models=catalog(tmp_path)))


def test_a_catalog_path_outside_the_model_dirs_is_refused_preloaded_or_not(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(b"GGUF")
    text = refusal(config_of(tmp_path, models=catalog(tmp_path, path=str(outside))))
    assert text.startswith(f"models.catalog[0].path: {str(outside)!r}")
    assert "outside the model directories" in text


def test_a_preloaded_model_s_missing_lora_is_refused(tmp_path: Path) -> None:
    models = catalog(tmp_path, preload=True, lora=str(tmp_path / "adapter.gguf"))
    config = config_of(tmp_path, models=models)
    (tmp_path / "models" / "m.gguf").write_bytes(b"GGUF")
    assert refusal(config).startswith("models.catalog[0].lora: ")


# ---- ports at start (the real serve) ---------------------------------------------------


@pytest.fixture
def taken() -> Iterator[dict[str, tuple[socket.socket, int]]]:
    """Sockets holding ports, by kind ("tcp", "udp"), closed at teardown."""
    held: dict[str, tuple[socket.socket, int]] = {}
    for kind, sock_type in (("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)):
        s = socket.socket(socket.AF_INET, sock_type)
        s.bind(("127.0.0.1", 0))
        if sock_type == socket.SOCK_STREAM:
            s.listen()
        held[kind] = (s, int(s.getsockname()[1]))
    yield held
    for s, _ in held.values():
        s.close()


def connectable(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def refused_start(config: Config) -> str:
    """Serve `config`, which must fail to bind; return the message; check all was stopped."""
    with pytest.raises(ConfigError) as error:
        await serve(config, preflight(config))
    assert pykka.ActorRegistry.get_all() == []  # actors stopped: nothing keeps the process up
    return str(error.value)


async def test_an_http_port_in_use_names_the_key_and_address(
    tmp_path: Path, taken: dict[str, tuple[socket.socket, int]]
) -> None:
    _, port = taken["tcp"]
    zmq_port = free_port()
    config = config_of(tmp_path, server={"rest_port": port, "zmq_port": zmq_port})
    message = await refused_start(config)
    assert message == f"server.rest_port: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not connectable(zmq_port)


async def test_a_zmq_port_in_use_closes_the_http_port_already_open(
    tmp_path: Path, taken: dict[str, tuple[socket.socket, int]]
) -> None:
    _, port = taken["tcp"]
    rest_port = free_port()
    config = config_of(tmp_path, server={"rest_port": rest_port, "zmq_port": port})
    message = await refused_start(config)
    assert message == f"server.zmq_port: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not connectable(rest_port)


async def test_a_peer_port_in_use_names_the_cluster_key(
    tmp_path: Path, taken: dict[str, tuple[socket.socket, int]]
) -> None:
    _, port = taken["tcp"]
    config = config_of(tmp_path, cluster=cluster(tmp_path, peer_port=port))
    message = await refused_start(config)
    assert message == f"cluster.peer_port: cannot listen on 127.0.0.1:{port}: Address already in use"


async def test_a_gossip_port_in_use_names_the_cluster_key(
    tmp_path: Path, taken: dict[str, tuple[socket.socket, int]]
) -> None:
    _, port = taken["udp"]
    config = config_of(tmp_path, cluster=cluster(tmp_path, bind=f"127.0.0.1:{port}"))
    message = await refused_start(config)
    assert message == f"cluster.bind: cannot listen on 127.0.0.1:{port}: Address already in use"


async def test_the_node_serves_with_the_keys_read_by_the_preflight_and_never_rereads_them(
    tmp_path: Path,
) -> None:
    api_file = tmp_path / "api.keys"
    api_file.write_text("file-key\n", encoding="utf-8")
    key_file = tmp_path / "cluster.key"
    key_file.write_text(f"{KEY_HEX}\n", encoding="ascii")
    curve_file = tmp_path / "server.key"
    curve_file.write_bytes(zmq.curve_keypair()[1])
    config = config_of(
        tmp_path,
        server={"api_key_file": str(api_file), "zmq_curve_secret_key_file": str(curve_file)},
        cluster=cluster(tmp_path, key_file=str(key_file)),
    )
    keys = preflight(config)
    for path in (api_file, key_file, curve_file):
        path.unlink()  # a second read would now fail the start
    statuses: list[int] = []
    fronts: list[Front] = []

    def servers(node: Node, config: Config, keys: Keys) -> list[Front]:
        fronts.extend(default_servers(node, config, keys))
        return fronts

    async def probe(runtime: Runtime) -> None:
        assert runtime.clustered is not None  # joined with the keyring the preflight read
        url = f"http://127.0.0.1:{fronts[0].server.port}/models"
        async with aiohttp.ClientSession() as session:
            for headers in ({}, {"X-API-Key": "file-key"}):
                async with session.get(url, headers=headers) as resp:
                    statuses.append(resp.status)
        os.kill(os.getpid(), signal.SIGTERM)  # the way an operator stops it

    code = await asyncio.wait_for(serve(config, keys, servers=servers, started=probe), 60)
    assert code == 0
    assert statuses == [401, 200]


async def test_a_witness_whose_gossip_port_is_in_use_names_the_cluster_key(
    tmp_path: Path, taken: dict[str, tuple[socket.socket, int]]
) -> None:
    _, port = taken["udp"]
    config = config_of(
        tmp_path, cluster=cluster(tmp_path, bind=f"127.0.0.1:{port}", voters=["pre"])
    )
    with pytest.raises(ConfigError) as error:
        await serve_witness(config, preflight(config).cluster)
    assert str(error.value) == f"cluster.bind: cannot listen on 127.0.0.1:{port}: Address already in use"


async def test_a_reload_to_a_config_that_could_not_start_is_refused_and_the_running_one_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "moc.toml"
    models = tmp_path / "models"
    good = f"""
[node]
state_dir = "{tmp_path / "state"}"
model_dirs = ["{models}"]
[server]
rest_port = 0
zmq_port = 0
grpc_port = 0
[resources]
devices = "cpu"
[[models.catalog]]
name = "m"
path = "{models / "m.gguf"}"
"""
    models.mkdir()
    path.write_text(good)
    config = load_config(path, env={})
    refused: list[str] = []

    async def reload_a_broken_edit(runtime: Runtime) -> None:
        path.write_text(good + "preload = true\n")  # its file is missing: could not start
        os.kill(os.getpid(), signal.SIGHUP)
        def logged() -> bool:
            refused.extend(m for r in caplog.records if "reload refused" in (m := r.getMessage()))
            return bool(refused)

        await wait_for(logged, 10, "the refused reload logged")
        assert runtime.config.models.catalog[0].preload is False  # the running config kept
        os.kill(os.getpid(), signal.SIGTERM)

    caplog.set_level("ERROR", logger="moc_node.app")
    code = await serve(config, preflight(config), config_path=str(path), started=reload_a_broken_edit)
    assert code == 0
    assert len(refused) == 1 and "models.catalog[0].path:" in refused[0]

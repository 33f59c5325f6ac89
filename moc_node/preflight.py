"""Check a loaded config before anything is built or bound, and read the files it names once.

`moc-node run` calls `preflight` right after `load_config`. A config that cannot start stops
here with one `ConfigError` line naming the key, before any port opens, any actor or worker
starts, or any file is written. What the key files hold comes back as `Keys` and is handed to
the wiring, so no file is read a second time. The checks read file metadata, the key files and
(for a named `cluster.advertise`) the resolver; they write nothing. A bind that still fails
later (`listen`, a port taken meanwhile) is the same one line naming its key.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import zmq

from actors.errors import ModelNotFound, PathNotAllowed
from actors.serving.paths import resolve_model_path
from cluster.config import WILDCARDS, parse_hostport
from cluster.errors import LocalUsageError
from cluster.keyring import Keyring, read_key_file
from moc_node.config import Config, ConfigError
from moc_node.services import learning_output_dir
from transports.config import ZmqAuth, load_api_keys, load_zmq_auth
from transports.tls import TlsMaterial, load_tls

T = TypeVar("T")

MAX_KEY_FILE_BYTES = 1024 * 1024
"""Largest file of keys read: a path naming a log or an image by mistake is refused unread."""


@dataclass(frozen=True, slots=True)
class Keys:
    """What the key files named by the config hold, read once before any port opens.

    One field per kind of key; a new key file adds a field here and a call in `read_keys`.
    """

    api: frozenset[str]
    """Accepted API keys: `server.api_keys` plus those of `server.api_key_file`."""
    cluster: Keyring
    """Keys of `cluster.key_file`; empty when none is named (gossip is then unauthenticated)."""
    zmq: ZmqAuth
    """The ZeroMQ front's allow-list and CURVE keys (`server.zmq_curve_*_file`)."""
    tls: TlsMaterial | None = None
    """The HTTP and gRPC fronts' certificate, key and client CA (`server.tls_*_file`), checked
    to load together; None serves plain text."""


@dataclass(frozen=True, slots=True)
class Listener:
    """One address the node listens on, with the config key that sets its port."""

    key: str
    """The key an operator edits when the port is wrong, e.g. "server.rest_port"."""
    host: str
    port: int
    """0: any free port (tests)."""

    @property
    def address(self) -> str:
        """Return host:port, with an IPv6 host in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def preflight(config: Config) -> Keys:
    """Check `config` (see `check`) and read its key files (see `read_keys`)."""
    check(config)
    return read_keys(config)


def check(config: Config) -> None:
    """Refuse a config that cannot start; read nothing but file metadata, write nothing.

    Listeners that would take one port twice, directories the node cannot use, catalog models
    outside the model directories, and models to preload whose file is missing.
    """
    check_listeners(listeners(config))
    _check_advertise(config)
    node = config.node
    _creatable_dir("node.state_dir", node.state_dir)
    for i, directory in enumerate(node.model_dirs):
        _existing_dir(f"node.model_dirs[{i}]", directory)
    state = _path("node.state_dir", node.state_dir)
    learning = config.learning.resolved(state)
    _creatable_dir("learning.output_dir", learning.output_dir)
    _creatable_file("learning.job_store", learning.job_store)
    for i, directory in enumerate(learning.dataset_dirs):
        _existing_dir(f"learning.dataset_dirs[{i}]", directory)
    goals = config.goals.resolved(state)
    _creatable_file("goals.goal_store", goals.goal_store)
    for i, directory in enumerate(goals.eval_dirs):
        _existing_dir(f"goals.eval_dirs[{i}]", directory)
    _check_catalog(config)


def read_keys(config: Config) -> Keys:
    """Read every key file the config names; any failure is one ConfigError naming its key.

    A key file is read whether or not its feature is on, so a broken file shows now, not on
    the day the feature is switched on.
    """
    server = config.server
    api = read_files({"server.api_key_file": server.api_key_file}, lambda: load_api_keys(server))
    cluster = Keyring(())
    if key_file := config.cluster.key_file:
        cluster = read_files({"cluster.key_file": key_file}, lambda: read_key_file(key_file))
    curve = {
        "server.zmq_curve_secret_key_file": server.zmq_curve_secret_key_file,
        "server.zmq_curve_client_keys_file": server.zmq_curve_client_keys_file,
    }
    zmq = read_files(curve, lambda: load_zmq_auth(server))
    tls_files = {
        "server.tls_cert_file": server.tls_cert_file,
        "server.tls_key_file": server.tls_key_file,
        "server.tls_client_ca_file": server.tls_client_ca_file,
    }
    tls = read_files(tls_files, lambda: load_tls(server))
    # Each further key file is one more call here and a field of Keys.
    return Keys(api=api, cluster=cluster, zmq=zmq, tls=tls)


def read_files(files: Mapping[str, str | None], read: Callable[[], T]) -> T:
    """Return what `read` makes of the files it reads; `files` maps their config keys to paths.

    Every path set (None: unset) must name a regular file of at most MAX_KEY_FILE_BYTES, so a
    directory, a device or a FIFO is refused before it is opened. Every failure of `read`
    (OSError, undecodable text, bad content) becomes one ConfigError line naming a key, the
    reader's own when its message starts with one, else the first in `files`; none quotes
    the file's contents.
    """
    for key, path in files.items():
        if path is not None and _regular_file(key, path) > MAX_KEY_FILE_BYTES:
            raise ConfigError(f"{key}: {path!r} is larger than {MAX_KEY_FILE_BYTES} bytes")
    key, path = next(iter(files.items()))
    shown = f"{key}: {path!r}:" if path is not None else f"{key}:"
    try:
        return read()
    except OSError as exc:
        raise ConfigError(f"{shown} cannot read it: {_reason(exc)}") from None
    except UnicodeDecodeError:  # a ValueError: caught first, its text quotes the bytes
        raise ConfigError(f"{shown} not UTF-8 text") from None
    except (ValueError, LocalUsageError) as exc:
        message = " ".join(str(exc).splitlines())
        if _NAMES_A_KEY.match(message):
            raise ConfigError(message) from None
        raise ConfigError(f"{shown} {message}") from None


_NAMES_A_KEY = re.compile(r"^[a-z_]+\.[a-z_]+: ")


def listeners(config: Config) -> list[Listener]:
    """Return every address the node will listen on, in the order they are bound."""
    server = config.server
    found = [
        Listener("server.rest_port", server.host, server.rest_port),
        Listener("server.zmq_port", server.host, server.zmq_port),
        Listener("server.grpc_port", server.host, server.grpc_port),
    ]
    cluster = config.cluster
    if cluster.enabled:
        try:
            host, port = parse_hostport(cluster.bind, "bind")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        found.append(Listener("cluster.peer_port", host, cluster.peer_port))
        found.append(Listener("cluster.bind", host, port))
    return found


def listener(config: Config, key: str) -> Listener:
    """Return the listener whose port `key` sets (see `listeners`)."""
    return next(found for found in listeners(config) if found.key == key)


def check_listeners(found: Sequence[Listener]) -> None:
    """Refuse two listeners on one port where their hosts overlap (one would fail to bind)."""
    for i, later in enumerate(found):
        for earlier in found[:i]:
            if later.port and later.port == earlier.port and _overlap(earlier.host, later.host):
                raise ConfigError(
                    f"{later.key}: port {later.port} is also {earlier.key} "
                    f"({earlier.address}); each listener needs its own port"
                )


def _overlap(a: str, b: str) -> bool:
    return a == b or a in (*WILDCARDS, "") or b in (*WILDCARDS, "")


def _check_advertise(config: Config) -> None:
    """A named advertise host must resolve: the gossip runner resolves it after ports open."""
    cluster = config.cluster
    if not (cluster.enabled and cluster.advertise):
        return
    host, port = parse_hostport(cluster.advertise, "advertise")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cluster.advertise: {host!r} does not resolve: {_reason(exc)}") from None


def _check_catalog(config: Config) -> None:
    """Every catalog path lies inside the model directories; preloaded models' files exist."""
    dirs = (*config.node.model_paths, learning_output_dir(config))
    preload = set(config.models.preload)
    for i, entry in enumerate(config.models.catalog):
        key = f"models.catalog[{i}]"
        must_exist = entry.preload or entry.name in preload
        _path(f"{key}.path", entry.path)  # empty, or holding a NUL byte
        shown = f"{key}.path: {entry.path!r}"
        try:
            resolved = resolve_model_path(entry.path, dirs)
        except ModelNotFound:
            # In a cluster a model may live on other hosts only; the primary places it there.
            if must_exist:
                raise ConfigError(f"{shown}: no such file, and the model is preloaded") from None
            continue
        except PathNotAllowed:
            allowed = ", ".join(repr(str(d)) for d in dirs)
            raise ConfigError(f"{shown}: outside the model directories ({allowed})") from None
        except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, names too long
            raise ConfigError(f"{shown}: {_reason(exc)}") from None
        if must_exist:
            _readable(f"{key}.path", resolved)
            if entry.lora:
                _regular_file(f"{key}.lora", entry.lora)
                _readable(f"{key}.lora", Path(entry.lora))


def _path(key: str, value: str) -> Path:
    if not value:
        raise ConfigError(f"{key}: must not be empty")
    if "\x00" in value:
        raise ConfigError(f"{key}: {value!r} contains a NUL byte")
    return Path(value)


def _stat(key: str, value: str) -> os.stat_result | None:
    """Return the path's status, None when it does not exist."""
    path = _path(key, value)
    try:
        return path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:  # not a directory on the way, permissions, name too long
        if isinstance(exc, NotADirectoryError):
            raise ConfigError(f"{key}: {value!r}: a parent is not a directory") from None
        raise ConfigError(f"{key}: {value!r}: {_reason(exc)}") from None


def _regular_file(key: str, value: str) -> int:
    """Check `value` names an existing regular file; return its size."""
    status = _stat(key, value)
    if status is None:
        raise ConfigError(f"{key}: {value!r} does not exist")
    if not stat.S_ISREG(status.st_mode):
        raise ConfigError(f"{key}: {value!r} is not a regular file")
    return status.st_size


def _readable(key: str, path: Path) -> None:
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{key}: {str(path)!r} is not readable by this user")


def _existing_dir(key: str, value: str) -> None:
    """Check `value` names a directory the node can read (it never creates these)."""
    status = _stat(key, value)
    if status is None:
        raise ConfigError(f"{key}: {value!r} does not exist")
    if not stat.S_ISDIR(status.st_mode):
        raise ConfigError(f"{key}: {value!r} is not a directory")
    if not os.access(value, os.R_OK | os.X_OK):
        raise ConfigError(f"{key}: {value!r} is not readable by this user")


def _creatable_dir(key: str, value: str) -> None:
    """Check `value` is a writable directory, or could be created as one."""
    status = _stat(key, value)
    if status is not None:
        if not stat.S_ISDIR(status.st_mode):
            raise ConfigError(f"{key}: {value!r} is not a directory")
        if not os.access(value, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: {value!r} is not writable by this user")
        return
    _creatable_below(key, value)


def _creatable_file(key: str, value: str) -> None:
    """Check `value` is a writable regular file, or could be created as one."""
    status = _stat(key, value)
    if status is not None:
        if not stat.S_ISREG(status.st_mode):
            raise ConfigError(f"{key}: {value!r} is not a regular file")
        if not os.access(value, os.R_OK | os.W_OK):
            raise ConfigError(f"{key}: {value!r} is not writable by this user")
        return
    _creatable_below(key, value)


def _creatable_below(key: str, value: str) -> None:
    """Check the nearest existing ancestor of `value` is a directory this user may write."""
    for parent in Path(value).absolute().parents:
        status = _stat(key, str(parent))
        if status is None:
            continue
        if not stat.S_ISDIR(status.st_mode):
            raise ConfigError(f"{key}: {value!r} cannot be created: {str(parent)!r} is a file")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(
                f"{key}: {value!r} cannot be created: {str(parent)!r} is not writable by this user"
            )
        return


def _reason(exc: BaseException) -> str:
    """The OS's words for an error, without Python's decoration."""
    strerror = getattr(exc, "strerror", None)
    return str(strerror) if strerror else str(exc) or type(exc).__name__


async def listen(listener: Listener, start: Callable[[], Awaitable[None]]) -> None:
    """Run `start`, which binds `listener`; a bind that fails is a ConfigError naming its key.

    A port in use, an address not on this host or a privileged port: the config is wrong for
    this host, so the start ends with one line (and exit 2) instead of a traceback.
    """
    try:
        await start()
    except (OSError, zmq.ZMQError) as exc:
        raise ConfigError(
            f"{listener.key}: cannot listen on {listener.address}: {_bind_reason(exc)}"
        ) from None


def _bind_reason(exc: OSError | zmq.ZMQError) -> str:
    # aiohttp rewrites strerror into a sentence quoting the address; the errno's text is enough.
    code = exc.errno
    if isinstance(code, int) and code in errno.errorcode:
        return os.strerror(code)
    return str(exc.strerror or exc)

"""Two serving hosts and a witness-only voter: either host plus the witness keep a primary."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.gguf_synth import write_preset
from tests.moc_node.cluster_procs import (
    KEY,
    Addresses,
    NodeProc,
    alive,
    complete,
    free_ports,
    node_config,
    spawn,
    stop_all,
    wait_ready,
    wait_until,
)

HOSTS = ("host-a", "host-b")
WITNESS = "witness"
VOTERS = (*HOSTS, WITNESS)


@pytest.fixture
def pair_and_witness(
    tmp_path: Path,
) -> Iterator[tuple[dict[str, NodeProc], subprocess.Popen[bytes]]]:
    models = tmp_path / "models"
    models.mkdir()
    write_preset(models / "m.gguf", "tiny")
    key_file = tmp_path / "cluster.key"
    key_file.write_text(KEY + "\n")
    # One call: ports from separate calls may repeat (each call frees its sockets on return).
    free = free_ports(12)
    gossip, peer, http, zmq = (free[i * 3 : (i + 1) * 3] for i in range(4))
    seeds = [f"127.0.0.1:{p}" for p in gossip]
    extra = f"witnesses = {json.dumps([WITNESS])}"
    nodes: dict[str, NodeProc] = {}
    witness: subprocess.Popen[bytes] | None = None
    try:
        for i, name in enumerate(VOTERS):
            ports = {"gossip": gossip[i], "peer": peer[i], "http": http[i], "zmq": zmq[i]}
            config = tmp_path / f"{name}.toml"
            config.write_text(
                node_config(
                    tmp_path,
                    name,
                    models=models,
                    key_file=key_file,
                    ports=ports,
                    addresses=Addresses(),
                    seeds=seeds,
                    voters=VOTERS,
                    extra=extra,
                )
            )
            log = tmp_path / f"{name}.log"
            if name == WITNESS:
                witness = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "moc_node.cli",
                        "run",
                        "--witness",
                        "--config",
                        str(config),
                    ],
                    stdout=log.open("wb"),
                    stderr=subprocess.STDOUT,
                )
            else:
                nodes[name] = NodeProc(name, http[i], spawn(config, log), log, config)
        for node in nodes.values():
            wait_ready(node)
        assert witness is not None
        yield nodes, witness
    finally:
        stop_all(nodes.values())
        if witness is not None:
            witness.send_signal(signal.SIGTERM)
            try:
                assert witness.wait(timeout=30) == 0
            finally:
                if witness.poll() is None:
                    witness.kill()


def primary(node: NodeProc) -> str | None:
    view = node.get("/cluster")
    return view["primary"]["name"] if view["primary"] else None


def test_the_witness_votes_but_never_serves_and_keeps_a_majority_when_a_host_dies(
    pair_and_witness: tuple[dict[str, NodeProc], subprocess.Popen[bytes]],
) -> None:
    nodes, witness = pair_and_witness
    a, b = nodes["host-a"], nodes["host-b"]
    wait_until(lambda: alive(a.get("/cluster")) == set(VOTERS), 30, "hosts and witness alive")
    wait_until(lambda: primary(a) == "host-a" and primary(b) == "host-a", 30, "host-a primary")
    assert complete(b)[0] == 200  # placed through the primary on a host, never on the witness

    a.proc.kill()  # the primary's host dies: host-b and the witness are still a majority
    a.proc.wait()
    try:
        wait_until(lambda: primary(b) == "host-b", 30, "host-b primary with the witness's vote")
    except AssertionError:
        raise AssertionError(json.dumps(b.get("/cluster"), indent=1)) from None
    status, body = complete(b)
    assert status == 200, body
    assert witness.poll() is None

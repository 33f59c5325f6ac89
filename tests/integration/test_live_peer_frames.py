"""The model holder's peer RPC port under random and mutated multipart frames.

Frames built from real sealed envelopes, mutated, re-signed, stale, of other versions, sealed for
another node, and exact replays of frames it took (refused: its replay window). Each frame's fate
is predicted with the server's own `open_frames`; the drop counters must move by exactly that.
Good requests go in between all along: peer pings, and inferences sent to the holder directly and
through another member.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter
from typing import Any

import msgpack
import pytest
import zmq

from cluster.keyring import TAG_BYTES, Keyring
from tests.integration.live_cluster import (
    BATCH,
    FUZZ,
    KEYRING,
    SEED,
    WAIT_S,
    WRONG,
    Cluster,
    by_label,
    by_label2,
    healthy,
    mutate,
    no_failures_logged,
    scrape,
    until,
    worker_pid,
)
from tests.moc_node.cluster_procs import NAMES, NodeProc, complete
from transports.peer_wire import (
    MAX_FRAME_BYTES,
    PEER_PROTOCOL,
    Envelope,
    Kind,
    Op,
    PeerWireError,
    open_frames,
    seal,
)

pytestmark = pytest.mark.timeout(300)

PEER_MESSAGES = 1500

_request_ids = itertools.count()


def sealed(
    op: Op, body: Any, *, dst: str, ts_offset: float = 0.0, term: int | None = None
) -> list[bytes]:
    """Seal a request for node `dst` as a peer would, with a fresh id and a timestamp
    `ts_offset` s from now."""
    rid = f"fuzz-{next(_request_ids)}"
    env = Envelope(op, rid, time.time() + ts_offset, body, term, src=FUZZ, dst=dst)
    return seal(KEYRING, env)


def signed_payload(obj: Any, keyring: Keyring = KEYRING) -> list[bytes]:
    payload = msgpack.packb(obj, use_bin_type=True)
    return [payload, keyring.sign(payload)]


INFER_BODY: dict[str, Any] = {
    "model": "m",
    "prompt": "hi",
    "messages": None,
    "tensors": None,
    "params": {"max_tokens": 1, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": 0},
    "timeout_s": 10.0,
}


def bad_peer_message(rng: random.Random, dst: str, taken: list[list[bytes]]) -> list[bytes]:
    """Return the frames of one random, mutated, re-signed, stale, misdirected or replayed peer
    message for node `dst`; `taken` holds frames it accepted (the replays are drawn from it)."""
    op, body = rng.choice(
        [(Op.PING, None), (Op.INFER, INFER_BODY), (Op.STREAM, INFER_BODY), (Op.PLACE, "m"),
         (Op.LOAD, {"name": "m"}), (Op.CANCEL, None)]
    )  # fmt: skip
    payload, tag = sealed(op, body, dst=dst)
    now = time.time()
    kind = rng.choice(["random", "mutated_payload", "mutated_payload", "mutated_tag", "no_tag",
                       "extra_frames", "unsigned", "wrong_key", "stale", "future", "version",
                       "signed_garbage", "signed_shape", "unknown_op", "bad_body", "replay_ping",
                       "replay_cancel", "misdirected", "replay", "replay"])  # fmt: skip
    if kind == "replay" and taken:
        return rng.choice(taken[-BATCH:])  # recent: well within the skew window
    if kind == "misdirected":
        other = rng.choice([n for n in (*NAMES, "node-x") if n != dst])
        return sealed(op, body, dst=other)
    if kind == "random":
        return [rng.randbytes(rng.randint(0, 200)) for _ in range(rng.randint(1, 4))]
    if kind == "mutated_payload":
        return [mutate(rng, payload), tag]
    if kind == "mutated_tag":
        return [payload, mutate(rng, tag)]
    if kind == "no_tag":
        return [payload]
    if kind == "extra_frames":
        return [
            payload,
            tag,
            *(rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(1, 2))),
        ]
    if kind == "unsigned":
        return [payload, b""]
    if kind == "wrong_key":
        return [payload, WRONG.sign(payload)]
    if kind == "stale":
        return sealed(op, body, dst=dst, ts_offset=-rng.uniform(60, 3600))
    if kind == "future":
        return sealed(op, body, dst=dst, ts_offset=rng.uniform(60, 3600))
    if kind == "version":
        old = {"v": 1, "c": 1, "id": "x", "ts": now, "b": None, "t": None}  # version 1's shape
        return signed_payload(
            rng.choice([old, {"v": rng.choice([0, 3, 99, "2", None]), "c": 1, "id": "x",
                              "ts": now, "s": FUZZ, "d": dst}])
        )  # fmt: skip
    if kind == "signed_garbage":
        garbage = rng.randbytes(rng.randint(0, 200))
        return [garbage, KEYRING.sign(garbage)]
    if kind == "signed_shape":
        return signed_payload(
            rng.choice(
                [
                    [],
                    "x",
                    1,
                    None,
                    {"v": PEER_PROTOCOL},
                    {"v": PEER_PROTOCOL, "c": "ping", "id": "x", "ts": now, "s": FUZZ, "d": dst},
                    {"v": PEER_PROTOCOL, "c": 1, "id": 5, "ts": now, "s": FUZZ, "d": dst},
                    {"v": PEER_PROTOCOL, "c": 1, "id": "x", "ts": "now", "s": FUZZ, "d": dst},
                    {"v": PEER_PROTOCOL, "c": 1, "id": "x", "ts": now, "t": "term", "s": FUZZ,
                     "d": dst},
                    {"v": PEER_PROTOCOL, "c": 1, "id": "x", "ts": now, "d": dst},
                    {"v": PEER_PROTOCOL, "c": 1, "id": "x", "ts": now, "s": 5, "d": dst},
                ]
            )  # fmt: skip
        )
    if kind == "unknown_op":
        return signed_payload({"v": PEER_PROTOCOL, "c": rng.choice([0, max(Op) + 1, 99, 1000, -1]),
                               "id": f"u-{next(_request_ids)}", "ts": now, "b": None, "t": None,
                               "s": FUZZ, "d": dst})  # fmt: skip
    if kind == "bad_body":
        # Signed and well formed, but the inference body is nonsense: accepted, answered ERROR.
        junk: Any = rng.choice([None, 5, "m", {"model": "m"}, {"params": {}}, [INFER_BODY]])
        return sealed(rng.choice([Op.INFER, Op.STREAM]), junk, dst=dst)
    if kind == "replay_ping":
        return sealed(Op.PING, None, dst=dst)
    return sealed(Op.CANCEL, None, dst=dst)  # of nothing: accepted, no answer


def peer_verdict(
    frames: list[bytes], dst: str, seen: set[tuple[str, str, int]]
) -> tuple[str, Envelope | None]:
    """Return (drop reason, None) or ("accepted", envelope), as the peer server `dst` decides;
    `seen` holds the request keys its replay window took (a frame that passes adds its own)."""
    try:
        env = open_frames(KEYRING, frames, time.time(), dst=dst)
    except PeerWireError as exc:
        return exc.reason, None
    key = (env.src, env.request_id, env.code)
    if key in seen:
        return "replay", None
    seen.add(key)
    if env.code not in {int(op) for op in Op}:
        return "unknown_op", None
    return "accepted", env


FINAL = (Kind.PONG, Kind.RESULT, Kind.ERROR)


def well_ordered(kinds: list[int]) -> bool:
    """Tell whether replies are: at most one ACK, first; tokens; one final answer, last."""
    acks = kinds.count(Kind.ACK)
    return (
        acks <= 1
        and (acks == 0 or kinds[0] == Kind.ACK)
        and kinds[-1] in FINAL
        and all(k == Kind.TOKEN for k in kinds[acks:-1])
    )


def forward(node: NodeProc) -> int:
    """Complete through `node`, which forwards to the holder; return the retries it took.

    Only "the holder did not answer within the ack timeout" (0.5 s here) is retried: on a busy
    machine a member's loop can stall that long whatever the fuzz does. Any other refusal fails.
    """
    deadline = time.monotonic() + WAIT_S
    retries = 0
    while True:
        status, body = complete(node)
        if status == 200:
            return retries
        unavailable = status == 503 and body["error"]["code"] == "peer_unavailable"
        assert unavailable and time.monotonic() < deadline, (status, body)
        retries += 1


class PeerCaller:
    """A DEALER that sends sealed requests and waits for their replies (the good requests)."""

    def __init__(self, ctx: zmq.Context[Any], port: int, dst: str) -> None:
        self.dst = dst
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    def call(self, op: Op, body: Any) -> Envelope:
        frames = sealed(op, body, dst=self.dst)
        rid = open_frames(KEYRING, frames, time.time(), dst=self.dst).request_id
        self.sock.send_multipart(frames)
        kinds: list[int] = []
        deadline = time.monotonic() + WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000)):
                break
            env = open_frames(KEYRING, self.sock.recv_multipart(), time.time(), dst=FUZZ)
            if env.request_id != rid:
                continue
            kinds.append(env.code)
            if env.code not in (Kind.ACK, Kind.TOKEN):
                assert well_ordered(kinds), kinds
                return env
        raise AssertionError(f"no answer to {op.name} (got {kinds})")


def test_random_and_mutated_peer_frames_are_dropped_by_reason_and_good_requests_keep_succeeding(
    cluster: Cluster,
) -> None:
    rng = random.Random(SEED + 1)
    target = cluster.members[cluster.holder]
    forwarder = next(m for n, m in cluster.members.items() if n != cluster.holder)
    pid = worker_pid(target.node)
    before = scrape(target.node)
    expected: Counter[str] = Counter()
    answered: dict[str, list[int]] = {}
    accepted_ids: set[str] = set()
    accepted_ops: Counter[Op] = Counter()
    answers_expected = 0
    good_pings = good_infers = forwarded_retries = 0
    ctx: zmq.Context[Any] = zmq.Context()
    fuzz = ctx.socket(zmq.DEALER)
    fuzz.setsockopt(zmq.LINGER, 0)
    fuzz.setsockopt(zmq.RCVHWM, 0)
    fuzz.connect(f"tcp://127.0.0.1:{target.peer}")
    caller = PeerCaller(ctx, target.peer, target.name)
    seen: set[tuple[str, str, int]] = set()
    taken: list[list[bytes]] = []

    def drain() -> None:
        while fuzz.poll(0):
            env = open_frames(KEYRING, fuzz.recv_multipart(), time.time(), dst=FUZZ)
            answered.setdefault(env.request_id, []).append(env.code)

    def caught_up() -> bool:
        drain()
        now = by_label(scrape(target.node), "moc_peer_messages_dropped_total")
        delta = now - by_label(before, "moc_peer_messages_dropped_total")
        assert not {r for r in delta if delta[r] > expected[r]}, (delta, expected)
        return delta == +expected

    try:
        # Two payloads over the peer limit, read and refused by the server's own check.
        for _ in range(2):
            frames = [b"\x80" + b"\x00" * MAX_FRAME_BYTES, b"t" * TAG_BYTES]
            expected[peer_verdict(frames, target.name, seen)[0]] += 1
            fuzz.send_multipart(frames)
        for start in range(0, PEER_MESSAGES, BATCH):
            for _ in range(min(BATCH, PEER_MESSAGES - start)):
                frames = bad_peer_message(rng, target.name, taken)
                reason, env = peer_verdict(frames, target.name, seen)
                if env is None:
                    expected[reason] += 1
                else:
                    taken.append(frames)
                    accepted_ids.add(env.request_id)
                    accepted_ops[Op(env.code)] += 1
                    answers_expected += env.code != Op.CANCEL  # a cancel of nothing: silence
                fuzz.send_multipart(frames)
            until(caught_up, f"peer drop counters after {start + BATCH} messages")
            pong = caller.call(Op.PING, None)
            assert pong.code == Kind.PONG
            good_pings += 1
            if start % (BATCH * 6) == 0:
                result = caller.call(
                    Op.INFER, {**INFER_BODY, "params": {**INFER_BODY["params"], "max_tokens": 2}}
                )
                assert result.code == Kind.RESULT and result.body["tokens_generated"] == 2, result
                forwarded_retries += forward(forwarder.node)  # over the fuzzed port
                good_infers += 1

        def all_answered() -> bool:
            drain()
            return sum(codes[-1] in FINAL for codes in answered.values()) >= answers_expected

        until(all_answered, "answers to the accepted replays")
    finally:
        caller.sock.close(0)
        fuzz.close(0)
        ctx.term()

    after = scrape(target.node)
    drops = by_label(after, "moc_peer_messages_dropped_total") - by_label(
        before, "moc_peer_messages_dropped_total"
    )
    served = by_label2(after, "moc_peer_requests_total") - by_label2(
        before, "moc_peer_requests_total"
    )
    print(f"peer fuzz: {PEER_MESSAGES + 2} messages, accepted {dict(accepted_ops)}, "
          f"dropped {dict(drops)}, good: {good_pings} pings, {good_infers} x (direct + forwarded "
          f"infer, {forwarded_retries} forwards retried); served {dict(served)}")  # fmt: skip
    assert drops == +expected
    assert sum(drops.values()) > PEER_MESSAGES // 2
    assert {"malformed", "unauthenticated", "stale", "version", "oversized", "unknown_op",
            "misdirected", "replay"} <= set(drops)  # fmt: skip
    # Refused frames are never answered; every accepted request got one answer (maybe an ACK first).
    assert set(answered) <= accepted_ids
    assert served[("ping", "success")] == good_pings + accepted_ops[Op.PING]
    assert served[("infer", "success")] >= 2 * good_infers
    # The accepted inference requests of the stream all carried a nonsense body: refused.
    refused = sum(n for (op, outcome), n in served.items() if op in ("infer", "stream")
                  and outcome != "success")  # fmt: skip
    assert refused == accepted_ops[Op.INFER] + accepted_ops[Op.STREAM]
    for rid, codes in answered.items():
        assert well_ordered(codes), (rid, codes)
    assert target.node.running() and worker_pid(target.node) == pid
    assert no_failures_logged(target.node) == []
    until(lambda: healthy(cluster), "all alive, one agreed primary")

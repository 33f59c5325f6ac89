"""Fenced primary election by majority leases, sans-I/O.

Gossip only proposes: the lowest-named healthy non-witness voter in this node's membership view
stands as candidate. It asks every voter for a lease on term t+1; a voter grants one lease at a
time and nothing else until that grant expires; a majority of grants makes the candidate
primary until `sent + lease_s - lease_margin_s` (measured from when it *sent* the request, so
it stops before any voter's grant, counted from *receipt*, can expire). The primary renews every
`lease_renew_s`. Terms are fencing tokens: `Fence` refuses commands carrying an older term.

Safety: two candidates' majorities share a voter, and that voter's grants never overlap in
time, so two primaries never act at once (given clocks whose rates agree within the margin).
A voter that restarts waits one lease before granting, since it forgot its last grant.

Two voters: the majority is both of them, so any partition or either crash leaves no primary
anywhere (safe, unavailable for placement; models already loaded keep serving). List a third,
witness-only voter (`witnesses`) to survive the loss of one host.

Term persistence is the caller's: `TermStore.save` must be durable before it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from cluster.config import ClusterConfig
from cluster.membership import MemberView, Outbound, Rng
from cluster.messages import Address, LeaseReply, LeaseRequest, MemberState, Message

__all__ = [
    "WINDOWS_KEPT",
    "Election",
    "ElectionCounters",
    "Fence",
    "majority",
    "MembershipView",
    "MemoryTermStore",
    "TermStore",
]


class TermStore(Protocol):
    """Durable storage of the highest term this node has seen (SQLite in the node)."""

    def load(self) -> int:
        """Return the stored highest term (0 if none)."""
        ...

    def save(self, term: int) -> None:
        """Durably store `term` before returning."""
        ...


class MemoryTermStore:
    """A TermStore in memory, for tests and for nodes that vote in no election."""

    def __init__(self, term: int = 0) -> None:
        self.term = term

    def load(self) -> int:
        """Return the stored term."""
        return self.term

    def save(self, term: int) -> None:
        """Store the term."""
        self.term = term


class MembershipView(Protocol):
    """What the election reads from membership."""

    def member(self, name: str) -> MemberView | None:
        """Return one member's snapshot."""
        ...


@dataclass(slots=True)
class _Grant:
    candidate: str
    term: int
    expires: float


@dataclass(slots=True)
class _Round:
    term: int
    seq: int
    sent: float
    until: float
    grants: set[str]
    heard: set[str] = field(default_factory=set)  # other voters that answered at all


@dataclass(slots=True)
class ElectionCounters:
    """Monotonic counts for metrics."""

    elections_started: int = 0
    elections_won: int = 0
    grants_given: int = 0
    renewals_failed: int = 0


WINDOWS_KEPT = 1000
"""Acting windows remembered for audits and tests (one per renewal, so bounded)."""


def majority(n_voters: int) -> int:
    """Return how many voters make a majority."""
    return n_voters // 2 + 1


class Election:
    """One node's part in electing the primary: as candidate and, if listed, as voter."""

    def __init__(
        self,
        config: ClusterConfig,
        name: str,
        store: TermStore,
        view: MembershipView,
        rng: Rng,
        now: float,
    ) -> None:
        self.config = config
        self.name = name
        self.store = store
        self.view = view
        self.rng = rng
        self.voters = tuple(sorted(config.voters))
        self.is_voter = name in self.voters
        self.counters = ElectionCounters()
        self._highest = store.load()
        self._grant: _Grant | None = None
        # We may have granted a lease just before a restart and forgotten it: grant nothing
        # until any such lease must have expired.
        self._no_grant_until = now + config.lease_s if self.is_voter else 0.0
        self._round: _Round | None = None
        self._seq = 0
        self._term = 0  # term we are primary (or candidate) for
        self._lease_until = 0.0  # end of our acting window
        self._next_attempt = now + rng.random() * config.election_retry_s
        self._next_renew = float("inf")
        self._won_term = False
        self._heard_last_round = False
        self.windows: list[tuple[float, float, int]] = []
        """(start, end, term) of every acting window obtained, for tests and audits."""

    # ------------------------------------------------------------------ queries

    @property
    def highest_term(self) -> int:
        """Return the highest term seen (persisted)."""
        return self._highest

    @property
    def term(self) -> int:
        """Return the term this node is (or last was) primary for; 0 if never."""
        return self._term

    def is_primary(self, now: float) -> bool:
        """Return whether this node may act as primary now (its lease minus the margin holds)."""
        return now < self._lease_until

    def lease_until(self) -> float:
        """Return the end of this node's acting window (past if not primary)."""
        return self._lease_until

    def granted_to(self, now: float) -> tuple[str, int] | None:
        """Return (candidate, term) of this voter's unexpired grant, if any."""
        g = self._grant
        if g is not None and now < g.expires:
            return g.candidate, g.term
        return None

    def candidate(self) -> str | None:
        """Return the voter this node's gossip view says should stand (lowest healthy name)."""
        witnesses = set(self.config.witnesses)
        for v in self.voters:
            if v in witnesses:
                continue
            if v == self.name:
                return v
            m = self.view.member(v)
            if m is not None and m.state == MemberState.ALIVE:
                return v
        return None

    def accepts(self, msg: Message) -> bool:
        """Return whether `msg` is an election message."""
        return isinstance(msg, LeaseRequest | LeaseReply)

    # ------------------------------------------------------------------ machine

    def handle(self, msg: Message, src: Address, now: float) -> list[Outbound]:
        """Process a LeaseRequest (as voter) or a LeaseReply (as candidate)."""
        if isinstance(msg, LeaseRequest):
            reply = self._vote(msg, now)
            return [] if reply is None else [Outbound(src, (reply,))]
        if isinstance(msg, LeaseReply):
            self._on_reply(msg, now)
        return []

    def tick(self, now: float) -> list[Outbound]:
        """Start or renew a lease when due."""
        out: list[Outbound] = []
        if self._round is not None and now >= self._round.until:
            self._heard_last_round = bool(self._round.heard)
            self._round = None  # replies this late are not worth acting on
        if self.is_primary(now):
            if now >= self._next_renew:
                self._next_renew = now + self.config.lease_renew_s
                self._send_round(self._term, now, out)
            return out
        self._next_renew = float("inf")
        if self._round is not None or now < self._next_attempt:
            return out
        self._next_attempt = now + self.config.election_retry_s * (1 + self.rng.random())
        if self.candidate() != self.name:
            return out
        # Our own vote (cast first, in _send_round) records the new term durably. A round no
        # other voter answered is retried with the same term, so a candidate cut off from the
        # voters does not inflate the term on every retry (safe: a voter grants one term to one
        # candidate only). A refused round goes one higher, or two candidates that split the
        # vote on one term would retry it forever.
        retry_same = (
            self._term > 0
            and self._term == self._highest
            and not self._won_term
            and not self._heard_last_round  # refused by a voter: maybe a split vote, go higher
        )
        term = self._term if retry_same else self._highest + 1
        self._term = term
        self._won_term = False
        self.counters.elections_started += 1
        self._send_round(term, now, out)
        return out

    def next_deadline(self) -> float:
        """Return the earliest time `tick` has work to do."""
        round_end = float("inf")
        if self._round is not None:
            round_end = self._round.until
        if self._next_renew < float("inf"):
            return min(self._next_renew, self._lease_until, round_end)
        if self._round is not None:
            return round_end  # nothing else happens while a round collects replies
        return self._next_attempt

    # ------------------------------------------------------------------ internals

    def _send_round(self, term: int, now: float, out: list[Outbound]) -> None:
        self._seq += 1
        self._round = _Round(term, self._seq, now, now + self.config.lease_renew_s, set())
        req = LeaseRequest(term, self.name, self._seq)
        for v in self.voters:
            if v == self.name:
                reply = self._vote(req, now)
                if reply is not None:
                    self._on_reply(reply, now)
                continue
            m = self.view.member(v)
            if m is not None and m.state in (MemberState.ALIVE, MemberState.SUSPECT):
                out.append(Outbound(m.addr, (req,)))

    def _vote(self, req: LeaseRequest, now: float) -> LeaseReply | None:
        if not self.is_voter:
            return None
        g = self._grant
        busy = g is not None and now < g.expires and g.candidate != req.candidate
        same_term_other = g is not None and g.term == req.term and g.candidate != req.candidate
        ok = (
            now >= self._no_grant_until
            and not busy
            and not same_term_other
            and (req.term > self._highest or (g is not None and g.term == req.term))
        )
        if ok:
            self._observe(req.term)
            self._grant = _Grant(req.candidate, req.term, now + self.config.lease_s)
            self.counters.grants_given += 1
        return LeaseReply(self._highest, self.name, req.candidate, req.seq, ok)

    def _on_reply(self, rep: LeaseReply, now: float) -> None:
        if rep.term > self._term:
            # A newer term exists. Fences everywhere will refuse our older term, so acting on it
            # is useless: stop now, and stand again (above it) at the next tick.
            self._observe(rep.term)
            if self.is_primary(now):
                self._lease_until = now
                self._next_renew = float("inf")
                self._next_attempt = now
            self._round = None
            return
        r = self._round
        if r is None or rep.candidate != self.name or rep.seq != r.seq:
            return
        if rep.voter != self.name:
            r.heard.add(rep.voter)
        if not rep.granted:
            return
        if rep.voter not in self.voters:
            return
        r.grants.add(rep.voter)
        if len(r.grants) == majority(len(self.voters)):
            end = r.sent + self.config.lease_s - self.config.lease_margin_s
            if end <= now:
                return  # the replies came too late to act on
            if not self.is_primary(now):
                self.counters.elections_won += 1
                self._next_renew = r.sent + self.config.lease_renew_s
            self._lease_until = end
            self._won_term = True
            self.windows.append((now, end, r.term))
            del self.windows[:-WINDOWS_KEPT]

    def _observe(self, term: int) -> None:
        if term > self._highest:
            self._highest = term
            self.store.save(term)


class Fence:
    """Refuse commands stamped with a term older than the highest seen (a fencing token)."""

    def __init__(self, store: TermStore, on_new: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.highest = store.load()
        self.on_new = on_new

    def admit(self, term: int) -> bool:
        """Return whether a command of `term` may run; remember (durably) a newer term."""
        if term < self.highest:
            return False
        if term > self.highest:
            self.highest = term
            self.store.save(term)
            if self.on_new is not None:
                self.on_new(term)
        return True

"""Prometheus metrics of the transports (names are a contract: legacy dashboards query them).

Defined once on the default registry, which every package shares; `/metrics` renders it whole.
Labels are bounded: routes are route templates, actions are table names or "unknown", outcomes are
error codes from a fixed set.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = [
    "HTTP_CONNECTIONS_REFUSED",
    "GRPC_REQUESTS",
    "GrpcRecorder",
    "IN_FLIGHT",
    "PEER_DROPPED",
    "PEER_REQUESTS",
    "REQUEST_DURATION",
    "REST_REQUESTS",
    "STREAMS_CLOSED_BY_CLIENT",
    "ZAP_DENIED",
    "ZMQ_CONNECTIONS_DROPPED",
    "ZMQ_REQUESTS",
    "record_http",
    "render",
    "ZmqRecorder",
]

# Latency buckets from a 0.5 ms health check to a multi-minute generation.
_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

REST_REQUESTS = Counter(
    "moc_rest_requests_total",
    "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"],
)
ZMQ_REQUESTS = Counter(
    "moc_zmq_requests_total",
    "Legacy ZeroMQ requests answered or dropped, by action and outcome (ok or an error code).",
    ["action", "outcome"],
)
GRPC_REQUESTS = Counter(
    "moc_grpc_requests_total",
    "gRPC calls answered, by method (ModelOps method, or Health/Check and Health/Watch) and "
    "outcome (ok, or an error code as moc_zmq_requests_total names it).",
    ["method", "outcome"],
)
REQUEST_DURATION = Histogram(
    "moc_request_duration_seconds",
    "Time from receiving a request to its last reply byte, by transport, action and outcome.",
    ["transport", "action", "outcome"],
    buckets=_BUCKETS,
)
IN_FLIGHT = Gauge(
    "moc_transport_in_flight_requests",
    "Requests being handled now, by transport.",
    ["transport"],
)
ZAP_DENIED = Counter(
    "moc_zmq_auth_denied_total",
    "ZeroMQ connections refused during the handshake by the ZAP handler, by reason (address, "
    "mechanism, curve_key, malformed).",
    ["reason"],
)
ZMQ_CONNECTIONS_DROPPED = Counter(
    "moc_zmq_connections_dropped_total",
    "ZeroMQ connections libzmq dropped during the handshake, by reason (handshake_failed: not "
    "finished in time or closed midway; protocol_error: a bad greeting or mechanism, such as a "
    "plain client on a CURVE port). ZAP denials are counted in moc_zmq_auth_denied_total.",
    ["reason"],
)
HTTP_CONNECTIONS_REFUSED = Counter(
    "moc_http_connections_refused_total",
    "HTTP connections closed before a request was served, by reason (too_many_connections: "
    "over the per-address cap; header_timeout: no complete request head in time).",
    ["reason"],
)
STREAMS_CLOSED_BY_CLIENT = Counter(
    "moc_http_streams_closed_by_client_total",
    "Streaming responses the client closed before the end (generation cancelled).",
)


def render() -> tuple[bytes, str]:
    """Return the exposition text of the default registry and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class ZmqRecorder:
    """Count and time ZMQ requests, caching label children (this path runs per request)."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str], Counter] = {}
        self._histograms: dict[tuple[str, str], Histogram] = {}

    def record(self, action: str, outcome: str, seconds: float) -> None:
        """Count one request and observe its duration."""
        key = (action, outcome)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = ZMQ_REQUESTS.labels(action=action, outcome=outcome)
            self._histograms[key] = REQUEST_DURATION.labels(
                transport="zmq", action=action, outcome="ok" if outcome == "ok" else "error"
            )
        counter.inc()
        self._histograms[key].observe(seconds)


class GrpcRecorder:
    """Count and time gRPC calls, caching label children (this path runs per call)."""

    def __init__(self) -> None:
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def record(self, method: str, outcome: str, seconds: float) -> None:
        """Count one call and observe its duration."""
        key = (method, outcome)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                GRPC_REQUESTS.labels(method=method, outcome=outcome),
                REQUEST_DURATION.labels(
                    transport="grpc", action=method, outcome="ok" if outcome == "ok" else "error"
                ),
            )
        counter, histogram = children
        counter.inc()
        histogram.observe(seconds)


_http_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}


def record_http(method: str, route: str, status: int, seconds: float) -> None:
    """Count one HTTP request and observe its duration (label children cached per key: routes
    are the app's templates and methods a fixed set, so the keys are few)."""
    key = (method, route, status)
    children = _http_children.get(key)
    if children is None:
        children = _http_children[key] = (
            REST_REQUESTS.labels(method=method, route=route, status=str(status)),
            REQUEST_DURATION.labels(
                transport="http",
                action=f"{method} {route}",
                outcome="ok" if status < 400 else "error",
            ),
        )
    counter, histogram = children
    counter.inc()
    histogram.observe(seconds)


PEER_REQUESTS = Counter(
    "moc_peer_requests_total",
    "Peer RPC requests served, by operation and outcome",
    ["op", "outcome"],
)
PEER_DROPPED = Counter(
    "moc_peer_messages_dropped_total", "Peer RPC frames refused, by reason", ["reason"]
)

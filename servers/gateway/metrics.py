"""The gateway's Prometheus metrics: requests, fallbacks, upstream failures, routing and upstream latency, tokens.

Each gateway app has its own registry, so several can live in one process (the tests run a few).
"""

from __future__ import annotations

# Routing takes milliseconds in process; the upstream buckets reach the minutes a long answer takes.
ROUTING_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOTAL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        kw = {"registry": self.registry}
        self.requests = Counter(
            "zooter_gateway_requests", "Requests by endpoint, the candidate that answered ('' when none did) and "
            "HTTP status; a stream that broke mid-answer counts here as 200 and in upstream_failures",
            ["endpoint", "candidate", "status"], **kw)
        self.fallbacks = Counter(
            "zooter_gateway_fallbacks", "Requests answered by a candidate other than the router's first choice, "
            "by the candidate that answered", ["candidate"], **kw)
        self.failures = Counter(
            "zooter_gateway_upstream_failures", "Upstream failures by candidate, stage (before_first_token: the next "
            "candidate took over; mid_stream: the stream ended with an error event) and reason",
            ["candidate", "stage", "reason"], **kw)
        self.routing = Histogram("zooter_gateway_routing_seconds", "Time to route a request in process (thread "
                                 "hand-off included), by router (the first 12 hex of its bundle's manifest sha256)",
                                 ["router"], buckets=ROUTING_BUCKETS, **kw)
        self.routed = Counter("zooter_gateway_routed", "Requests routed, by router and the candidate it chose",
                              ["router", "candidate"], **kw)
        self.router = Gauge("zooter_gateway_router", "1 for the router serving new requests, 0 for one it replaced "
                            "(SIGHUP)", ["router"], **kw)
        self.reloads = Counter("zooter_gateway_reloads", "Router reloads (SIGHUP) by result: done or refused",
                               ["result"], **kw)
        self.ttft = Histogram("zooter_gateway_upstream_ttft_seconds", "From sending a request upstream to its first "
                              "token, by candidate", ["candidate"], buckets=TTFT_BUCKETS, **kw)
        self.upstream = Histogram("zooter_gateway_upstream_seconds", "From sending a request upstream to its last "
                                  "byte, by candidate", ["candidate"], buckets=TOTAL_BUCKETS, **kw)
        self.tokens = Counter("zooter_gateway_tokens", "Tokens by candidate and kind (prompt, completion): the "
                              "upstream's usage when it reports one, else one per streamed chunk",
                              ["candidate", "kind"], **kw)
        self.in_flight = Gauge("zooter_gateway_in_flight_requests", "Requests being answered now", **kw)

    def failure(self, candidate: str, stage: str, reason: str) -> None:
        self.failures.labels(candidate, stage, reason).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

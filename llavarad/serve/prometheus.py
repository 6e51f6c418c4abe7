"""The server's Prometheus metrics, in a registry of their own (GET /metrics)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llavarad_requests", "Chat completion requests by outcome", ["outcome"], registry=r)
        self.queue = Gauge("llavarad_queue_length", "Requests waiting for a cache row", registry=r)
        self.active = Gauge("llavarad_active_rows", "Cache rows generating a report", registry=r)
        self.tokens = Counter("llavarad_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("llavarad_time_to_first_token_seconds", "Arrival to first token", buckets=_SECONDS, registry=r)
        self.latency = Histogram("llavarad_request_latency_seconds", "Arrival to last token", buckets=_SECONDS, registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)

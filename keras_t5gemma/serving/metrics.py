"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""

from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """Requests by route and status, queue depth, batch size, time to first token, generated tokens."""

    def __init__(self):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "t5gemma_requests", "HTTP requests by route and status", ["route", "status"], registry=registry
        )
        self.request_seconds = Histogram(
            "t5gemma_request_seconds", "request latency", ["route"], buckets=LATENCY_BUCKETS, registry=registry
        )
        self.queue_depth = Gauge("t5gemma_queue_depth", "rows waiting for a batch", ["model"], registry=registry)
        self.batch_size = Histogram(
            "t5gemma_batch_size", "rows per decoded batch", ["model"], buckets=BATCH_BUCKETS, registry=registry
        )
        self.time_to_first_token = Histogram(
            "t5gemma_time_to_first_token_seconds",
            "from queueing to the first generated token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.generated_tokens = Counter("t5gemma_generated_tokens", "generated tokens", ["model"], registry=registry)
        self.decode_seconds = Histogram(
            "t5gemma_batch_decode_seconds", "time of one batch's decode loop", ["model"], registry=registry
        )
        self.loaded_models = Gauge("t5gemma_loaded_models", "models in memory", registry=registry)

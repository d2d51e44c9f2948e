"""The server's Prometheus metrics (prometheus-client), in a registry of its own (two servers in one process,
as in the tests, do not share counters).

What an operator needs to size and watch a MASS endpoint: requests by endpoint and status, inputs answered,
how full batches are (inputs and requests per model call), how deep the queue is, latency (whole request and
model call), and the task sets the router chose: a shift in traffic shows there first.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from massmerge.server.batcher import BatchReport

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counters, gauges and histograms of one server, under the ``massmerge_`` prefix."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("massmerge_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.latency = Histogram("massmerge_request_seconds", "time from request to answer, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.inputs = Counter("massmerge_inputs", "inputs answered", registry=r)
        self.batch_inputs = Histogram("massmerge_batch_inputs", "inputs per model call", buckets=SIZE_BUCKETS,
                                      registry=r)
        self.batch_requests = Histogram("massmerge_batch_requests", "requests per model call",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.batch_seconds = Histogram("massmerge_batch_seconds", "seconds per model call (prepare, route, "
                                       "second passes)", buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("massmerge_queue_inputs", "inputs waiting for a batch", registry=r)
        self.task_sets = Counter("massmerge_routed_inputs", "inputs answered, by the task set the router chose",
                                 ["task_set"], registry=r)
        self.ready = Gauge("massmerge_ready", "1 while the server takes new requests", registry=r)

    def observe_batch(self, report: BatchReport) -> None:
        self.inputs.inc(report.inputs)
        self.batch_inputs.observe(report.inputs)
        self.batch_requests.observe(report.requests)
        self.batch_seconds.observe(report.seconds)
        counts: dict[str, int] = {}
        for task_set in report.task_sets:
            name = "+".join(task_set)
            counts[name] = counts.get(name, 0) + 1
        for name, count in counts.items():
            self.task_sets.labels(task_set=name).inc(count)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)


__all__ = ["Metrics"]

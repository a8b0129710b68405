"""Prometheus metrics of one server (its own registry, so two apps in a process do not clash), and
the page that shows several replicas' metrics side by side."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, queue_depth, active) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("apd_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.generated_tokens = Counter("apd_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("apd_prompt_tokens", "Prompt tokens read", registry=r)
        self.cancelled = Counter("apd_cancelled_requests", "Requests whose client went away before the end",
                                 registry=r)
        Gauge("apd_queue_depth", "Requests waiting for a slot", registry=r).set_function(queue_depth)
        Gauge("apd_active_requests", "Requests holding a slot (decoding)", registry=r).set_function(active)
        self.batch_size = Histogram("apd_batch_size", "Requests per scheduler iteration", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.step_latency = Histogram("apd_step_latency_seconds", "Seconds per scheduler iteration (one step of "
                                      "every active request)", registry=r, buckets=LATENCY_BUCKETS)
        self.tokens_per_step = Histogram("apd_tokens_per_step", "Tokens a request committed per step, per request",
                                         registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.time_to_first_token = Histogram("apd_time_to_first_token_seconds", "Seconds from arrival to the first "
                                             "committed tokens", registry=r, buckets=LATENCY_BUCKETS)
        self.request_latency = Histogram("apd_request_latency_seconds", "Seconds from arrival to the end",
                                         registry=r, buckets=LATENCY_BUCKETS)

    def iteration(self, seconds: float, batch: int) -> None:
        self.step_latency.observe(seconds)
        self.batch_size.observe(batch)

    def finished(self, result, prompt_tokens: int) -> None:
        self.generated_tokens.inc(len(result.token_ids))
        self.prompt_tokens.inc(prompt_tokens)
        if result.steps:
            self.tokens_per_step.observe(len(result.token_ids) / result.steps)
        if result.first_chunk_seconds is not None:
            self.time_to_first_token.observe(result.first_chunk_seconds)
        self.request_latency.observe(result.seconds)


def labelled_page(snapshots: dict[str, tuple[dict[str, str], list[Metric]]]) -> bytes:
    """One Prometheus page from several replicas' collected metrics (`registry.collect()`, keyed
    by replica id, each with the labels that name the replica): every sample gets its replica's
    labels, so `sum by (replica)` shows how the load spread. `apd_replicas` counts the replicas."""
    families: dict[str, Metric] = {}
    for labels, collected in snapshots.values():
        for family in collected:
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            merged.samples.extend(s._replace(labels={**s.labels, **labels}) for s in family.samples)
    count = Metric("apd_replicas", "Replicas whose metrics this page shows", "gauge")
    count.add_sample("apd_replicas", {}, len(snapshots))
    return generate_latest(_Fixed([count, *families.values()]))  # a Collector: all generate_latest reads


class _Fixed:
    """A collector of metrics already collected."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families

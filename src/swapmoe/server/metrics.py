"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own.

Each app gets its own :class:`~prometheus_client.CollectorRegistry` (no module-level state: two
servers in one process, as in the tests, never mix counts). Request-side metrics are updated as
requests run; the swapmoe counters (hit rate, swaps, bytes copied, resident bytes per layer) are read
at scrape time from the engine worker's snapshot (see :meth:`EngineWorker.stats`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Buckets in seconds. Time to first token spans a tiny CPU model (ms) to a long prompt on a
# large offloaded model (tens of s); per-token latency spans GPU decode (ms) to CPU decode (s).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _RuntimeCollector(Collector):
    """swapmoe counters of the served model, per layer and in total."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if not stats:
            return
        total, layers = stats["total"], stats["layers"]
        if total["hit_rate"] is not None:  # None before the first lookup: no rate to report
            yield GaugeMetricFamily("swapmoe_expert_hit_rate",
                                    "share of the router's unmasked top-k choices that were resident",
                                    value=total["hit_rate"])
        yield CounterMetricFamily("swapmoe_expert_lookups", "top-k expert choices seen by the router",
                                  value=total["lookups"])
        yield CounterMetricFamily("swapmoe_expert_hits", "top-k expert choices that were resident",
                                  value=total["hits"])
        yield CounterMetricFamily("swapmoe_expert_swaps", "experts swapped into the device pool",
                                  value=total["swaps"])
        yield CounterMetricFamily("swapmoe_expert_bytes_copied", "bytes of expert weights copied in",
                                  value=total["bytes_copied"])
        yield GaugeMetricFamily("swapmoe_expert_budget_bytes", "device budget for expert weights",
                                value=total["budget_bytes"])
        yield GaugeMetricFamily("swapmoe_expert_total_bytes", "bytes of all experts of the model",
                                value=total["total_expert_bytes"])
        per_layer = {
            "swapmoe_resident_expert_bytes": ("bytes of expert weights resident on the device",
                                              "resident_bytes", GaugeMetricFamily),
            "swapmoe_resident_experts": ("experts resident on the device", "resident_experts", GaugeMetricFamily),
            "swapmoe_layer_hit_rate": ("hit rate of one MoE layer", "hit_rate", GaugeMetricFamily),
            "swapmoe_layer_swaps": ("experts swapped in, per MoE layer", "swaps", CounterMetricFamily),
        }
        for name, (doc, key, kind) in per_layer.items():
            family = kind(name, doc, labels=["layer"])
            for la in layers:
                if la[key] is not None:  # a layer's hit rate before its first lookup
                    family.add_metric([str(la["layer"])], la[key])
            yield family


class ServerMetrics:
    """The metrics of one server; ``registry`` is what ``/metrics`` renders."""

    def __init__(self, queue_length: Callable[[], int], running: Callable[[], bool],
                 runtime_stats: Callable[[], dict[str, Any] | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter("swapmoe_http_requests", "HTTP requests answered, by endpoint and status",
                                     ["endpoint", "status"], registry=r)
        self.finished = Counter("swapmoe_generations", "generations finished, by endpoint and finish reason "
                                "(stop, length, timeout, cancelled, error)", ["endpoint", "reason"], registry=r)
        self.prompt_tokens = Counter("swapmoe_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("swapmoe_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("swapmoe_time_to_first_token_seconds",
                              "from a request's arrival to its first generated token (queue wait included)",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("swapmoe_time_per_output_token_seconds",
                              "time between consecutive generated tokens of a request", buckets=TPOT_BUCKETS,
                              registry=r)
        self.queue_wait = Histogram("swapmoe_queue_wait_seconds", "time a request waited for the engine",
                                    buckets=DURATION_BUCKETS, registry=r)
        self.duration = Histogram("swapmoe_request_duration_seconds", "from arrival to the last token",
                                  buckets=DURATION_BUCKETS, registry=r)
        queue_gauge = Gauge("swapmoe_queue_length", "requests waiting for the engine", registry=r)
        queue_gauge.set_function(lambda: float(queue_length()))
        running_gauge = Gauge("swapmoe_requests_running", "requests on the engine (0 or 1)", registry=r)
        running_gauge.set_function(lambda: float(running()))
        r.register(_RuntimeCollector(runtime_stats))

"""Prometheus metrics of the server: HTTP answers and request timings observed here, the
Engine's counters and gauges read at each scrape."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .engine import Engine, Request
    from .server import ResponseStore

# Time to first token and between tokens: from a few ms (a GPU) to a minute (a long
# prompt on a CPU driver).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ENGINE_COUNTERS = {
    "requests_submitted": "Requests submitted to the engine",
    "requests_refused": "Requests refused because the queue was full",
    "requests_failed": "Requests that ended with an error",
    "prompt_tokens": "Prompt tokens of finished requests",
    "prompt_tokens_cached": "Prompt tokens not fed: states from the prefix cache or from a request reading the same prompt",
    "prompt_reads_shared": "Requests that waited for another with the same prompt to read it, instead of reading it too",
    "generated_tokens": "Tokens generated and handed out",
    "prefix_cache_store_failures": "Prefix-cache entries not kept for want of device memory",
    "steps": "Engine steps (one forward call over the running batch each)",
}


class _EngineCollector:
    def __init__(self, engine: Engine, responses: ResponseStore) -> None:
        self.engine, self.responses = engine, responses

    def collect(self) -> Iterator[Any]:
        stats = self.engine.stats()
        for key, doc in _ENGINE_COUNTERS.items():
            yield CounterMetricFamily(f"rwkv_{key}", doc, value=stats.get(key, 0))
        finished = CounterMetricFamily("rwkv_requests_finished", "Requests finished, by reason", labels=["reason"])
        for key, value in stats.items():
            if key.startswith("requests_finished_"):
                finished.add_metric([key.removeprefix("requests_finished_")], value)
        yield finished
        yield GaugeMetricFamily("rwkv_queue_length", "Requests waiting for a slot", value=stats["queue_length"])
        yield GaugeMetricFamily("rwkv_running_requests", "Requests in the running batch", value=stats["running"])
        yield GaugeMetricFamily("rwkv_batch_occupancy", "Running requests / max_batch",
                                value=stats["running"] / stats["max_batch"])
        steps = stats.get("steps", 0)
        yield GaugeMetricFamily("rwkv_mean_batch_size", "Mean requests per engine step so far",
                                value=stats.get("batch_occupancy_sum", 0) / steps if steps else 0.0)
        yield CounterMetricFamily("rwkv_prefix_cache_hits", "Prompts that started from a cached prefix",
                                  value=stats.get("prefix_cache_hits", 0))
        yield CounterMetricFamily("rwkv_prefix_cache_misses", "Prompts with no cached prefix",
                                  value=stats.get("prefix_cache_misses", 0))
        yield GaugeMetricFamily("rwkv_prefix_cache_bytes", "Device bytes held by the prefix cache",
                                value=stats.get("prefix_cache_bytes", 0))
        yield GaugeMetricFamily("rwkv_stored_responses", "Response states kept for previous_response_id",
                                value=len(self.responses))
        yield CounterMetricFamily("rwkv_stored_responses_evicted", "Response states evicted (oldest first)",
                                  value=self.responses.evicted)


class Metrics:
    def __init__(self, engine: Engine, responses: ResponseStore) -> None:
        self.paths: frozenset[str] = frozenset()  # the app's routes, set once they are made
        self.registry = CollectorRegistry()
        self._http = Counter("rwkv_http_requests", "HTTP requests answered, by path and status",
                             ["path", "status"], registry=self.registry)
        self._ttft = Histogram("rwkv_time_to_first_token_seconds", "From submission to the first token",
                               buckets=_BUCKETS, registry=self.registry)
        self._tbt = Histogram("rwkv_time_per_output_token_seconds", "Mean time between a request's tokens",
                              buckets=_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine, responses))  # type: ignore[arg-type]

    def http(self, path: str, status: int) -> None:
        # The label set is fixed: the app's own paths (ids such as /v1/models/NAME
        # collapse), anything else "other", so that no client can grow it.
        label = "/v1/models/{name}" if path.startswith("/v1/models/") else path if path in self.paths else "other"
        self._http.labels(label, str(status)).inc()

    def finished(self, request: Request) -> None:
        if request.first_token_at is None:
            return
        self._ttft.observe(request.first_token_at - request.submitted_at)
        if request.finished_at is not None and len(request.tokens) > 1:
            self._tbt.observe((request.finished_at - request.first_token_at) / (len(request.tokens) - 1))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

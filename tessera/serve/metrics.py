"""Prometheus metrics of the server (`GET /metrics`), named like vLLM's with a `tessera:` prefix.

Gauges and token counters are read at scrape time from the snapshot the engine thread publishes;
latency histograms are observed by the HTTP handlers when a request finishes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tessera.serve.async_engine import AsyncEngine

disable_created_metrics()  # no `*_created` series: they only add noise to every scrape

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class _EngineCollector:
    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        s = self.engine.snapshot
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"tessera:{name}", doc, labels=labels)
            g.add_metric([self.model_name], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"tessera:{name}", doc, labels=labels)
            c.add_metric([self.model_name], value)
            return c

        yield gauge("num_requests_running", "Requests in the running batch.", s.running)
        yield gauge(
            "num_requests_waiting",
            "Requests waiting to be scheduled (incl. not yet admitted).",
            self.engine.num_waiting,
        )
        yield gauge("kv_cache_blocks_used", "KV-cache blocks held by requests.", s.kv_blocks_used)
        yield gauge("kv_cache_blocks_total", "KV-cache blocks in the pool.", s.kv_blocks_total)
        yield gauge(
            "kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use.",
            s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0,
        )
        yield gauge(
            "prefix_cache_hit_rate", "Prefix-cache hit rate (blocks found / blocks looked up).", s.prefix_hit_rate
        )
        yield gauge("engine_alive", "1 while the engine loop runs.", 1.0 if self.engine.alive else 0.0)
        yield counter("prompt_tokens", "Prompt tokens computed (prefill).", s.prompt_tokens)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens)
        yield counter("engine_steps", "Engine iterations.", s.steps)
        yield counter(
            "engine_step_failures", "Engine steps that raised (their requests failed).", self.engine.step_failures
        )


class ServerMetrics:
    """One registry per app, so that several servers can live in one process (tests)."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineCollector(engine, model_name))
        labels = ["model_name"]
        self.ttft = Histogram(
            "tessera:time_to_first_token_seconds",
            "Time to first token (from HTTP arrival).",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "tessera:time_per_output_token_seconds",
            "Time per output token after the first.",
            labels,
            buckets=_TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "tessera:e2e_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "tessera:request_success",
            "Finished requests by finish reason.",
            labels + ["finished_reason"],
            registry=self.registry,
        )
        self.http_errors = Counter(
            "tessera:request_errors",
            "Requests refused with an HTTP error, by status.",
            labels + ["status"],
            registry=self.registry,
        )

    def observe(self, arrival: float, out) -> None:
        """Record one finished engine request (`out` a RequestOutput; times are time.monotonic())."""
        m = out.metrics or {}
        first, finish = m.get("first_token_time"), m.get("finish_time")
        for c in out.outputs:
            self.finished.labels(self.model_name, c.finish_reason or "unknown").inc()
        if finish is not None:
            self.e2e.labels(self.model_name).observe(max(0.0, finish - arrival))
        if first is not None:
            self.ttft.labels(self.model_name).observe(max(0.0, first - arrival))
            n = max((len(c.token_ids) for c in out.outputs), default=0)
            if finish is not None and n > 1:
                self.tpot.labels(self.model_name).observe(max(0.0, (finish - first) / (n - 1)))

    def error(self, status: int) -> None:
        self.http_errors.labels(self.model_name, str(status)).inc()

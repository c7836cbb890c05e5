"""GET /metrics: the engine's figures in Prometheus' text format (prometheus-client).

Gauges and token counters are read from the engine's stats at scrape time (a collector); the
latency histograms are filled by the engine thread as each request ends.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# seconds; TTFT spans a queued long prompt, ITL one decode step of a batch
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class _EngineCollector:
    def __init__(self, stats):
        self.stats = stats              # () -> the engine's stats dict

    def collect(self):
        s = self.stats()
        for name, key, doc in (
                ("minfer_requests_running", "running", "Sequences in the running batch"),
                ("minfer_requests_waiting", "waiting", "Sequences queued, not yet running"),
                ("minfer_kv_blocks_used", "blocks_used", "KV-cache blocks held by sequences"),
                ("minfer_kv_blocks_free", "blocks_free",
                 "KV-cache blocks free (including cached blocks no sequence holds)"),
                ("minfer_kv_blocks_total", "blocks_total", "KV-cache blocks in the pool"),
                ("minfer_kv_blocks_cached", "cached_blocks",
                 "KV-cache blocks named in the prefix cache (held or free)")):
            yield GaugeMetricFamily(name, doc, value=s[key])
        rate = s["cached_prompt_tokens"] / s["prompt_tokens"] if s["prompt_tokens"] else 0.0
        yield GaugeMetricFamily("minfer_prefix_cache_hit_rate",
                                "Share of admitted prompt tokens found in the prefix cache", value=rate)
        for name, key, doc in (
                ("minfer_prompt_tokens", "prompt_tokens", "Prompt tokens of admitted requests"),
                ("minfer_prompt_tokens_cached", "cached_prompt_tokens",
                 "Prompt tokens found in the prefix cache (not computed)"),
                ("minfer_generation_tokens", "generated_tokens", "Tokens sampled"),
                ("minfer_computed_tokens", "computed_tokens",
                 "Tokens run through the model (prompts, chunks, decodes, guesses, recomputation)"),
                ("minfer_preemptions", "preemptions", "Sequences preempted for lack of KV blocks"),
                ("minfer_engine_steps", "steps", "Engine steps (forward passes)")):
            yield CounterMetricFamily(name, doc, value=s[key])
        if "spec_proposed" in s:          # a server started with --speculative
            for name, key, doc in (
                    ("minfer_spec_verify_steps", "spec_verify_steps",
                     "Sequence steps that verified guessed tokens"),
                    ("minfer_spec_proposed_tokens", "spec_proposed", "Tokens guessed"),
                    ("minfer_spec_accepted_tokens", "spec_accepted",
                     "Guessed tokens the model accepted")):
                yield CounterMetricFamily(name, doc, value=s[key])
        if "draft_blocks_total" in s:     # --speculative draft: the draft model's own KV pool
            yield GaugeMetricFamily("minfer_draft_kv_blocks_used",
                                    "The draft model's KV-cache blocks held by sequences",
                                    value=s["draft_blocks_used"])
            yield GaugeMetricFamily("minfer_draft_kv_blocks_total",
                                    "KV-cache blocks in the draft model's pool",
                                    value=s["draft_blocks_total"])


class Metrics:
    def __init__(self, stats):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.ttft = Histogram("minfer_time_to_first_token_seconds",
                              "From the request's arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("minfer_inter_token_latency_seconds",
                             "Between consecutive tokens of one sequence",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("minfer_request_latency_seconds",
                             "From the request's arrival to its last token",
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.finished = Counter("minfer_requests", "Sequences ended, by finish reason",
                                ["finish_reason"], registry=self.registry)
        self.http_errors = Counter("minfer_http_errors", "Requests refused, by HTTP status",
                                   ["status"], registry=self.registry)

    def observe(self, seq) -> None:
        """A sequence ended (called by the engine thread)."""
        m = seq.metrics
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        for dt in m.inter_token_latencies:
            self.itl.observe(dt)
        if m.finished is not None:
            self.e2e.observe(m.finished - m.arrival)
        self.finished.labels(seq.finish_reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

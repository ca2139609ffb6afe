"""The server's Prometheus metrics (prometheus_client, one registry per app): the engine's state read
when scraped, token counters, and latency histograms observed as requests stream. Names follow the
ones vLLM users know, under a codegen_ prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_GAP = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class _EngineCollector:
    """Gauges and counters read from Engine.stats() at each scrape."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        yield GaugeMetricFamily("codegen_num_requests_running", "Requests with samples decoding in KV slots",
                                value=s.running_requests)
        yield GaugeMetricFamily("codegen_num_requests_waiting", "Requests waiting for their prompt to be "
                                "prefilled or for free slots", value=s.waiting)
        yield GaugeMetricFamily("codegen_kv_slots_used", "KV cache slots holding a running sample", value=s.running)
        yield GaugeMetricFamily("codegen_kv_slots_total", "KV cache slots (--max-batch)", value=s.slots)
        yield GaugeMetricFamily("codegen_kv_cache_usage_perc", "Fraction of KV slots in use",
                                value=s.running / s.slots if s.slots else 0.0)
        yield CounterMetricFamily("codegen_engine_steps", "Engine steps run", value=s.steps)
        yield CounterMetricFamily("codegen_prefill_computed_tokens", "Prompt tokens computed (not from the prefix "
                                  "cache)", value=s.prefill_tokens)
        p = s.prefix_cache
        if p is not None:
            yield CounterMetricFamily("codegen_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      value=p.lookup_tokens)
            yield CounterMetricFamily("codegen_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                      value=p.hit_tokens)
            yield GaugeMetricFamily("codegen_prefix_cache_bytes", "Memory held by the prefix cache", value=p.bytes)
        yield CounterMetricFamily("codegen_spec_decode_draft_tokens", "Speculative guesses checked",
                                  value=s.speculative.proposed)
        yield CounterMetricFamily("codegen_spec_decode_accepted_tokens", "Speculative guesses accepted",
                                  value=s.speculative.accepted)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.prompt_tokens = Counter("codegen_prompt_tokens", "Prompt tokens of requests served", registry=r)
        self.generation_tokens = Counter("codegen_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("codegen_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.finished = Counter("codegen_request_success", "Samples finished, by finish reason",
                                ["finished_reason"], registry=r)
        self.time_to_first_token = Histogram("codegen_time_to_first_token_seconds", "From the request's arrival to "
                                             "its first token", buckets=_LATENCY, registry=r)
        self.inter_token_latency = Histogram("codegen_inter_token_latency_seconds", "Between consecutive tokens of "
                                             "a sample", buckets=_TOKEN_GAP, registry=r)
        self.e2e_latency = Histogram("codegen_e2e_request_latency_seconds", "From the request's arrival to its "
                                     "last token", buckets=_LATENCY, registry=r)
        self.queue_time = Histogram("codegen_request_queue_time_seconds", "From submission to the start of the "
                                    "prompt's prefill", buckets=_LATENCY, registry=r)

    def watch(self, engine) -> None:
        self.registry.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""`GET /metrics`: the server's counters in Prometheus' text exposition format (version 0.0.4).

Why not ``prometheus_client``: a dozen series need no dependency and no process-global registry (tests
build several apps in one process; a global registry would refuse the second one's names). Every
update runs on the HTTP event loop's thread, so nothing here locks; engine gauges (queue, in-flight,
KV use) are read from ``EngineLoop.stats`` when scraped.

Latency histograms: time to first token and inter-token latency are measured on streamed choices
(the engine loop reports tokens as they come only for streams); end-to-end latency on every
successful request.
"""
from __future__ import annotations

import math

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _labels(pairs) -> str:
    if not pairs:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, esc)) + "}"


def _num(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help, self.values = name, help, {}

    def inc(self, amount: float = 1, **labels) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0) + amount

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        values = self.values or {(): 0}
        out += [f"{self.name}{_labels(k)} {_num(v)}" for k, v in sorted(values.items())]
        return out


class Gauge:
    """A value read when scraped (``read``: a function of nothing); ``kind`` "counter" for one that
    only grows (the engine's step count)."""

    def __init__(self, name: str, help: str, read, kind: str = "gauge"):
        self.name, self.help, self.read, self.kind = name, help, read, kind

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}",
                f"{self.name} {_num(self.read())}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total, self.count = 0.0, 0

    def observe(self, value: float, times: int = 1) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += times
        self.total += value * times
        self.count += times

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        out += [f'{self.name}_bucket{{le="{_num(e)}"}} {c}' for e, c in zip(self.buckets, self.counts)]
        out += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {_num(self.total)}",
                f"{self.name}_count {self.count}"]
        return out


class ServerMetrics:
    """Everything `/metrics` shows. ``stats``: the engine loop's live dict; ``in_progress``: a
    function giving the HTTP requests being answered now."""

    def __init__(self, stats: dict, in_progress):
        self.requests = Counter("tanuki_requests_total", "HTTP requests answered, by endpoint and status code.")
        self.prompt_tokens = Counter("tanuki_prompt_tokens_total", "Prompt tokens of completed requests.")
        self.generation_tokens = Counter("tanuki_generation_tokens_total", "Tokens generated for completed choices.")
        self.ttft = Histogram("tanuki_time_to_first_token_seconds",
                              "Request start to a streamed choice's first token.", LATENCY_BUCKETS)
        self.itl = Histogram("tanuki_inter_token_latency_seconds",
                             "Time between a streamed choice's tokens.", TOKEN_BUCKETS)
        self.e2e = Histogram("tanuki_e2e_request_latency_seconds",
                             "Request start to its last token (successful requests).", LATENCY_BUCKETS)
        self._all = [
            self.requests, self.prompt_tokens, self.generation_tokens,
            Gauge("tanuki_requests_in_progress", "HTTP generation requests being answered.", in_progress),
            Gauge("tanuki_engine_requests_running", "Engine requests (choices) in flight.",
                  lambda: stats.get("in_flight", 0)),
            Gauge("tanuki_engine_requests_waiting", "Engine requests queued for KV space or a batch slot.",
                  lambda: stats.get("waiting", 0)),
            Gauge("tanuki_kv_cache_usage_ratio", "Fraction of the paged KV cache's blocks in use.",
                  lambda: stats.get("kv_usage", 0.0)),
            Gauge("tanuki_engine_steps_total", "Engine steps taken since start.", lambda: stats.get("steps", 0),
                  "counter"),
            self.ttft, self.itl, self.e2e,
        ]

    def render(self) -> str:
        return "\n".join(line for m in self._all for line in m.render()) + "\n"

"""Prometheus metrics (vLLM's dashboard names under ``framework:``) and the periodic stats line.

``ServerMetrics`` is a ``StepObserver``: the engine thread calls
``observe`` after every loop iteration with the outputs of that iteration
and the scheduler's gauges. It also reads the engine's ``EngineStats``
(prefix-cache queries and hits, preemptions, KV slots, swapped requests
and CPU swap usage): at most every
``STATS_PERIOD`` seconds while the engine is busy (a snapshot walks the
running sequences) and after every iteration that leaves it idle, so the
counters are exact whenever nothing runs. Each server has its own
``CollectorRegistry``, so several servers (or tests) in one process never
clash.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from framework.engine.stats import EngineStats
from framework.outputs import RequestOutput

logger = logging.getLogger(__name__)

PREFIX = "framework:"
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0]
TPOT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
STATS_PERIOD = 0.25  # seconds between two EngineStats snapshots while the engine is busy
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0]


@dataclass
class _RequestState:
    num_tokens: int = 0  # generated tokens seen so far (all choices)
    last_token_time: float = 0.0


class ServerMetrics:
    """The server's metrics; ``render()`` is the /metrics body.

    Args:
        model_name: the ``model_name`` label.
        stats: the engine's ``stats`` method, called on the engine thread
            (None: no prefix-cache, preemption or slot figures).
    """

    def __init__(self, model_name: str, stats: Optional[Callable[[], EngineStats]] = None):
        self.registry = CollectorRegistry()
        labels, r = ["model_name"], self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r).labels(model_name)

        self.running = gauge("num_requests_running", "Sequences running on the engine.")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV-cache usage: 1 means every block is in use.")
        # from EngineStats snapshots (see _observe_stats)
        self.swapped = gauge("num_requests_swapped", "Requests preempted by swap, their KV blocks in CPU memory.")
        self.cpu_kv_usage = gauge("cpu_cache_usage_perc", "CPU swap-space usage: 1 means every CPU block is in use.")
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prefilled prompt tokens.", labels, registry=r).labels(
            model_name
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Generated tokens.", labels, registry=r
        ).labels(model_name)
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time to first token.", labels, buckets=TTFT_BUCKETS, registry=r
        ).labels(model_name)
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds", "Time between output tokens.", labels, buckets=TPOT_BUCKETS,
            registry=r,
        ).labels(model_name)  # fmt: skip
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Request latency, arrival to finish.", labels,
            buckets=E2E_BUCKETS, registry=r,
        ).labels(model_name)  # fmt: skip
        self._success = Counter(
            PREFIX + "request_success", "Finished requests by finish reason.", labels + ["finished_reason"], registry=r
        )

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r).labels(model_name)

        self.prefix_queries = counter("prefix_cache_queries", "Prefix cache queries, in prompt tokens looked up.")
        self.prefix_hits = counter("prefix_cache_hits", "Prefix cache hits, in prompt tokens found cached.")
        self.preemptions = counter("num_preemptions", "Requests preempted by the scheduler.")
        self._stats_source = stats
        self._next_stats = 0.0
        self._engine_stats: Optional[EngineStats] = None  # the last snapshot (engine thread writes, log reads)
        self.model_name = model_name
        self._requests: dict[str, _RequestState] = {}  # engine thread only
        # totals for the log line (engine thread writes, the log task reads)
        self._totals = [0, 0]  # prompt tokens, generation tokens
        self._last_log = (time.monotonic(), 0, 0)
        self._gauges = (0, 0, 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- engine thread ------------------------------------------------------------------

    def observe(self, outputs: list[RequestOutput], running: int, waiting: int, kv_usage: float) -> None:
        now = time.monotonic()
        for out in outputs:
            self._observe_request(out, now)
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
        self._gauges = (running, waiting, kv_usage)
        if self._stats_source is not None and (now >= self._next_stats or not (running or waiting)):
            self._next_stats = now + STATS_PERIOD
            self._observe_stats(self._stats_source())

    def _observe_stats(self, stats: EngineStats) -> None:
        last = self._engine_stats
        self.prefix_queries.inc(stats.prefix_cache_queries - (last.prefix_cache_queries if last else 0))
        self.prefix_hits.inc(stats.prefix_cache_hits - (last.prefix_cache_hits if last else 0))
        self.preemptions.inc(stats.num_preemptions - (last.num_preemptions if last else 0))
        self.swapped.set(stats.num_swapped)
        self.cpu_kv_usage.set(stats.cpu_kv_cache_usage)
        self._engine_stats = stats

    def _observe_request(self, out: RequestOutput, now: float) -> None:
        state = self._requests.setdefault(out.request_id, _RequestState())
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        new = num_tokens - state.num_tokens
        if new > 0:
            if state.num_tokens == 0:  # first token: the prompt is prefilled
                self.prompt_tokens.inc(len(out.prompt_token_ids))
                self._totals[0] += len(out.prompt_token_ids)
                metrics = out.metrics
                start = metrics.arrival_time if metrics else now
                first = metrics.first_token_time if metrics and metrics.first_token_time else now
                self.ttft.observe(max(0.0, first - start))
            else:
                gap = (now - state.last_token_time) / new
                for _ in range(new):
                    self.tpot.observe(gap)
            self.generation_tokens.inc(new)
            self._totals[1] += new
            state.num_tokens, state.last_token_time = num_tokens, now
        if out.finished:
            self._requests.pop(out.request_id, None)
            reason = out.outputs[0].finish_reason if out.outputs else "abort"
            self._success.labels(self.model_name, reason or "abort").inc()
            if out.metrics is not None:
                end = out.metrics.finished_time or now
                self.e2e.observe(max(0.0, end - out.metrics.arrival_time))

    # -- the periodic log line (event loop) ------------------------------------------

    def stats_line(self) -> str | None:
        """Throughput since the last call, running/waiting, KV usage and engine counters; None when idle."""
        now = time.monotonic()
        last_time, last_prompt, last_gen = self._last_log
        prompt, gen = self._totals
        running, waiting, kv = self._gauges
        self._last_log = (now, prompt, gen)
        if prompt == last_prompt and gen == last_gen and not running and not waiting:
            return None
        elapsed = max(now - last_time, 1e-9)
        line = (
            f"Avg prompt throughput: {(prompt - last_prompt) / elapsed:.1f} tokens/s, "
            f"Avg generation throughput: {(gen - last_gen) / elapsed:.1f} tokens/s, "
            f"Running: {running} reqs, Waiting: {waiting} reqs, KV cache usage: {kv * 100:.1f}%"
        )
        stats = self._engine_stats
        if stats is not None:
            line += (
                f", Swapped: {stats.num_swapped} reqs, CPU KV cache usage: {stats.cpu_kv_cache_usage * 100:.1f}%"
                f", KV slots used: {stats.used_slots}/{stats.allocated_slots} allocated, "
                f"Prefix cache hit rate: {stats.prefix_cache_hit_rate * 100:.1f}%, "
                f"Preemptions: {stats.num_preemptions} ({stats.num_swap_preemptions} by swap)"
            )
        return line

    async def log_periodically(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            line = self.stats_line()
            if line:
                logger.info(line)

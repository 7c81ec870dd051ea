"""``LLMEngine``: requests in, ``RequestOutput``s out, one step at a time.

A step is three moves: the scheduler picks the batch, the model runner runs
it, and each request's decoding strategy applies its sampled tokens (through
the output processor's stop rules).

With pipeline stages, the engine has one virtual engine per stage
(``virtual_engine.py``) and keeps up to that many batches in flight: a step
schedules on the next virtual engine, submits the batch to the pipeline and
applies the results of the oldest batch in flight once the pipeline is full
(or when there is nothing to submit).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from pathlib import Path
from typing import Optional, Union

import torch

from framework.config import EngineConfig
from framework.distributed.executor import make_executor
from framework.engine import continuation
from framework.engine.input_batch import prepare_continuation
from framework.engine.output_processor import OutputProcessor
from framework.engine.request_params import check_params, seed_generators
from framework.engine.scheduler import ScheduledBatch
from framework.engine.sequence_group import SequenceGroup
from framework.engine.sequence_ops import GroupOps
from framework.engine.stats import EngineStats
from framework.engine.step_results import LaunchedStep, SampledToken, StepResult
from framework.engine.virtual_engine import VirtualEngine, make_virtual_engines
from framework.model_config import (
    HFConfig,
    ModelConfig,
    checkpoint_dtype,
    derive_max_model_len,
    load_generation_eos,
    resolve_dtype,
)
from framework.outputs import RequestOutput
from framework.quantization import resolve_quant_config
from framework.registry import Registries, load_registries
from framework.sampling_params import SamplingParams
from framework.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 4 << 30

PromptInput = Union[str, list[int]]


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.registries: Registries = load_registries(config.plugins.disable)
        self.device = _resolve_device(config.device)
        free_before = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 0
        self.async_scheduling = self._async_scheduling_wanted()  # before any worker starts: it may refuse
        self.model_config = self._model_config()
        self.tokenizer = load_tokenizer(config.tokenizer or self.model_config.path)
        torch.manual_seed(config.seed)  # the random state of requests without a seed
        quant = resolve_quant_config(self.registries, config.quantization, self.model_config.hf_config)
        # a ModelRunner, or with tensor/pipeline parallelism the executor that drives every rank's runner
        self.runner = make_executor(config, self.model_config, self.registries, self.device, quant)
        self.num_blocks = self._num_kv_blocks(free_before)
        self.num_cpu_blocks = self._num_cpu_blocks()
        self.runner.init_kv_cache(self.num_blocks, self.num_cpu_blocks)
        # one per pipeline stage, each with its scheduler and its share of the KV pool (virtual_engine.py)
        self.virtual_engines: list[VirtualEngine] = make_virtual_engines(
            config.pipeline_parallel_size, self.num_blocks, self.num_cpu_blocks, config
        )
        # the first virtual engine's (the only one without pipeline stages)
        self.kv, self.scheduler = self.virtual_engines[0].kv, self.virtual_engines[0].scheduler
        self._in_flight: deque[tuple[VirtualEngine, ScheduledBatch, object]] = deque()  # oldest first
        self._pending: tuple[ScheduledBatch, LaunchedStep] | None = None  # async: the step in flight
        self._num_steps = 0
        self.outputs = OutputProcessor(self.tokenizer, self.model_config.eos_token_ids, self.model_config.max_model_len)
        self._groups: dict[str, SequenceGroup] = {}
        self._request_counter = itertools.count()

    # -- construction --------------------------------------------------------

    def _model_config(self) -> ModelConfig:
        config = self.config
        path = Path(config.model) if config.model else _demo_model()
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"model {str(path)!r} is not a Hugging Face model directory (no config.json)")
        hf_config = HFConfig.from_file(config_file)
        architectures = hf_config.get("architectures") or []
        known = self.registries.models
        arch = next((a for a in architectures if a in known), None)
        if arch is None:
            raise ValueError(
                f"model architecture {architectures or 'unknown'} is not supported by the installed plugins; "
                f"installed architectures: {', '.join(known.names()) or 'none'}"
            )
        max_model_len = derive_max_model_len(hf_config, config.max_model_len)
        hf_config["max_model_len"] = max_model_len
        return ModelConfig(
            path=path,
            hf_config=hf_config,
            architecture=arch,
            dtype=resolve_dtype(config.dtype, checkpoint_dtype(hf_config)),
            max_model_len=max_model_len,
            block_size=config.block_size,
            kv_cache_dtype=config.kv_cache_dtype,
            eos_token_ids=load_generation_eos(path, hf_config),
        )

    def _async_scheduling_wanted(self) -> bool:
        config = self.config
        one_process = config.tensor_parallel_size == 1 and config.pipeline_parallel_size == 1
        if config.async_scheduling is None:
            wanted = one_process and self.device.type == "cuda"
        elif config.async_scheduling and not one_process:
            raise ValueError(
                "async_scheduling=True needs tensor_parallel_size=1 and pipeline_parallel_size=1 (got "
                f"{config.tensor_parallel_size} and {config.pipeline_parallel_size}): with several ranks the "
                "sampled tokens would have to reach every rank first"
            )
        else:
            wanted = config.async_scheduling
        logger.info("async scheduling %s", "on" if wanted else "off")
        return wanted

    def _num_kv_blocks(self, free_before: int) -> int:
        config, mc = self.config, self.model_config
        block_bytes = self.runner.kv_block_bytes()
        blocks_per_seq = -(-mc.max_model_len // config.block_size)
        if config.kv_cache_memory is not None:
            budget, source = config.kv_cache_memory, f"kv_cache_memory={config.kv_cache_memory}"
        elif self.device.type == "cuda":
            total = torch.cuda.mem_get_info(self.device)[1]
            tokens = min(config.max_num_batched_tokens, config.max_num_seqs * mc.max_model_len)
            peak = self.runner.profile_peak_memory(tokens, min(config.max_num_seqs, tokens))
            budget = int(total * config.gpu_memory_utilization) - (total - free_before) - peak
            source = f"gpu_memory_utilization={config.gpu_memory_utilization} (peak {peak / 2**30:.2f} GiB)"
        else:
            budget, source = DEFAULT_CPU_KV_BYTES, "the CPU default KV-cache size"
        # Never more blocks than max_num_seqs sequences of max_model_len can use (per virtual engine).
        pp = config.pipeline_parallel_size
        num_blocks = max(0, min(budget // block_bytes, pp * config.max_num_seqs * blocks_per_seq))
        capacity = num_blocks * config.block_size
        if capacity < mc.max_model_len:
            raise ValueError(
                f"max_model_len={mc.max_model_len} is larger than the KV cache can hold: {num_blocks} blocks of "
                f"{config.block_size} tokens = {capacity} tokens ({block_bytes} bytes per block, from {source}). "
                f"Raise kv_cache_memory or gpu_memory_utilization, or lower max_model_len."
            )
        if pp > 1 and (num_blocks // pp) * config.block_size < mc.max_model_len:
            raise ValueError(
                f"max_model_len={mc.max_model_len} is larger than a virtual engine's share of the KV cache: "
                f"pipeline_parallel_size={pp} splits {num_blocks} blocks into {num_blocks // pp} of "
                f"{config.block_size} tokens = {num_blocks // pp * config.block_size} tokens each. "
                f"Raise kv_cache_memory or gpu_memory_utilization, or lower max_model_len."
            )
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB); max concurrency at max_model_len %d: %.2fx",
            num_blocks, config.block_size, num_blocks * block_bytes / 2**30, mc.max_model_len,
            capacity / mc.max_model_len,
        )  # fmt: skip
        return num_blocks

    def _num_cpu_blocks(self) -> int:
        """Blocks of the CPU swap pool: ``swap_space`` GiB / bytes per block (0: swapping off)."""
        config = self.config
        block_bytes = self.runner.kv_block_bytes()
        num = int(config.swap_space * 2**30) // block_bytes
        if config.preemption_mode == "swap" and num == 0:
            logger.warning("preemption_mode='swap' with swap_space=%s GiB: no CPU block fits, every preemption "
                           "recomputes", config.swap_space)  # fmt: skip
        elif num:
            mode = config.preemption_mode or "swap requests of several sequences, recompute the others"
            logger.info("CPU swap space: %d blocks (%.2f GiB); preemption: %s", num, num * block_bytes / 2**30, mode)
        return num

    # -- requests --------------------------------------------------------------

    def add_request(
        self,
        prompt: PromptInput,
        params: Optional[SamplingParams] = None,
        request_id: Optional[str] = None,
        arrival_time: Optional[float] = None,
    ) -> str:
        """Queue a prompt (text or token ids); returns the request id."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, not {type(params).__name__}")
        request_id = str(next(self._request_counter)) if request_id is None else request_id
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        strategy_cls = check_params(params, self.config, self.model_config, self.registries)
        text, token_ids = self._tokenize(prompt)
        group = SequenceGroup(request_id, text, token_ids, params, arrival_time, seed_generators(params, self.device))
        ve = min(self.virtual_engines, key=VirtualEngine.num_unfinished)  # the first of the least busy
        ops = GroupOps(group, ve.kv, self.outputs, self.model_config.max_model_len)
        group.attach(strategy_cls(params, ops))
        if group.max_width > self.config.max_num_seqs:
            raise ValueError(
                f"SamplingParams.best_of={params.best_of}: strategy {params.strategy_name!r} needs {group.max_width} "
                f"sequences at once, more than max_num_seqs={self.config.max_num_seqs}"
            )
        self._groups[request_id] = group
        ve.scheduler.add(group)
        return request_id

    def _tokenize(self, prompt: PromptInput) -> tuple[Optional[str], list[int]]:
        max_len, vocab = self.model_config.max_model_len, self.model_config.vocab_size
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            text, token_ids = None, list(prompt)
            bad = [t for t in token_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is out of range: the vocabulary has {vocab} tokens")
        else:
            raise TypeError("a prompt is a string or a list of token ids")
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) >= max_len:
            raise ValueError(
                f"the prompt is {len(token_ids)} tokens long, but max_model_len is {max_len}: "
                f"it must leave room for at least one generated token"
            )
        return text, token_ids

    def abort_request(self, request_ids: Union[str, list[str]]) -> list[RequestOutput]:
        """Stop requests now and free their KV blocks; returns their final outputs."""
        ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
        outputs = []
        for ve in self.virtual_engines:  # a batch in flight keeps going; its results are then ignored
            for group in ve.scheduler.abort(ids):
                self.outputs.abort(group)
                outputs.append(self._release(group))
        if self._pending is not None and not any(self._groups.get(g.request_id) is g for g in self._pending[0].groups):
            # Async scheduling: the step in flight now belongs to no request; wait for it and drop its
            # results here rather than leave it for a step() that may never come (a server shutting down).
            _, launched = self._pending
            self._pending = None
            self._guarded(self.runner.fetch, launched)
        return outputs

    def has_unfinished_requests(self) -> bool:
        """Requests not finished, or batches still in the pipeline or in flight (``step`` collects them)."""
        return (
            bool(self._in_flight)
            or self._pending is not None
            or any(ve.scheduler.has_unfinished() for ve in self.virtual_engines)
        )

    def get_num_unfinished_requests(self) -> int:
        return sum(ve.num_unfinished() for ve in self.virtual_engines)

    def running_groups(self) -> list[SequenceGroup]:
        """The running requests of every virtual engine."""
        return [group for ve in self.virtual_engines for group in ve.scheduler.running]

    def num_waiting_requests(self) -> int:
        return sum(len(ve.scheduler.waiting) for ve in self.virtual_engines)

    def kv_cache_usage(self) -> float:
        """Fraction of the GPU KV blocks in use, over every virtual engine (0..1)."""
        if len(self.virtual_engines) == 1:
            return self.kv.pool.usage()
        pools = [ve.kv.pool for ve in self.virtual_engines]
        return 1.0 - sum(p.num_free for p in pools) / sum(p.num_blocks for p in pools)

    # -- the step ---------------------------------------------------------------

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Run one step; return the outputs of every request that got a token.

        With ``final_only``, only those of the requests that finished (offline
        generation needs no more, and building an output per running request
        per step is the largest host cost of a large batch).
        """
        if len(self.virtual_engines) > 1:
            return self._pipelined_step(final_only)
        if self.async_scheduling:
            return self._async_step(final_only)
        batch, dropped = self._schedule()
        if batch is None:
            return dropped
        result = self._guarded(self.runner.execute, batch)
        return dropped + self._apply(self.scheduler, batch, result, final_only)

    def _schedule(self) -> tuple[ScheduledBatch | None, list[RequestOutput]]:
        """The next batch (None: nothing to run), and the outputs of requests dropped as unfittable."""
        batch = self.scheduler.schedule()
        dropped = [self._drop_unfittable(self.kv, group) for group in batch.unfittable]
        if not batch.seqs:
            if batch.swap_out:  # a request alone swapped itself out: its blocks still move
                self.runner.execute(batch)
            return None, dropped
        _mark_scheduled(batch)
        return batch, dropped

    # -- async scheduling ----------------------------------------------------------

    def _async_step(self, final_only: bool) -> list[RequestOutput]:
        """One step with the next decode step queued before this one's tokens reach the host.

        With a step S in flight, the next step S' -- the same sequences, one
        token further -- is launched first (its input tokens are S's samples,
        read on the device), and only then does the host wait for S's results
        and apply them, while the GPU runs S'. A sequence that S ends (EOS, a
        stop string) has one token computed in S' for nothing: it is dropped.
        Sequences that reach max_tokens or max_model_len with S's token are
        left out of S'. The pipeline stops (S is applied and the next call
        schedules normally) whenever the scheduler has other work: a request
        waiting or swapped out, a request that is not decoding, or one that
        needs the host between steps (logits processors, penalties, a
        strategy without ``supports_async_scheduling``), or the pool has no
        room for S'. Outputs therefore come one call later than without it.
        """
        if self._pending is None:
            batch, dropped = self._schedule()
            if batch is None:
                return dropped
            launched = self._guarded(self.runner.launch, batch)
            if continuation.continuable(self.scheduler, batch):
                self._pending = (batch, launched)
                return dropped
            return dropped + self._apply(self.scheduler, batch, self._guarded(self.runner.fetch, launched), final_only)
        batch, launched = self._pending
        self._pending = None
        following = self._launch_continuation(batch, launched)
        result = self._guarded(self.runner.fetch, launched)
        outputs = self._apply(self.scheduler, batch, result, final_only, skip_aborted=True)
        if following is not None:
            self._pending = following
            continuation.name_filled_blocks(self.kv, following[0])
        return outputs

    def _guarded(self, fn, *args):
        """``fn(*args)`` for a step's device work. When it fails, the blocks the step was to fill are named in
        the prefix cache already and their K/V may be garbage: the cache is reset."""
        try:
            return fn(*args)
        except BaseException:
            self.kv.reset_prefix_cache()
            raise

    def _launch_continuation(self, batch: ScheduledBatch, launched) -> tuple[ScheduledBatch, object] | None:
        """Launch the step after ``batch`` (in flight) when the scheduler has nothing else to do."""
        if not continuation.continuable(self.scheduler, batch):
            return None
        following = continuation.plan(self.scheduler, self.kv, self._groups, self.model_config.max_model_len)
        if following is None:
            return None
        prepared = prepare_continuation(following.seqs, self.kv.block_size)
        rows = continuation.sample_rows(launched.prepared.sample_seqs, following.seqs)
        return following, self._guarded(
            self.runner.launch_continuation, prepared, following.block_copies, launched, rows
        )

    def _pipelined_step(self, final_only: bool) -> list[RequestOutput]:
        """Schedule on the next virtual engine and submit; apply the oldest batch once M are in flight."""
        engines = self.virtual_engines
        ve = engines[self._num_steps % len(engines)]
        self._num_steps += 1
        outputs = []
        while ve.in_flight:  # only when a virtual engine had nothing to submit: its last batch first
            outputs += self._collect_oldest(final_only)
        batch = ve.scheduler.schedule()
        outputs += [self._drop_unfittable(ve.kv, group) for group in batch.unfittable]
        if batch.seqs or batch.swap_out:
            _mark_scheduled(batch)
            try:
                step = self.runner.submit(batch, ve.block_offset, ve.cpu_block_offset)
            except BaseException:
                self._reset_prefix_caches()
                raise
            ve.in_flight = True
            self._in_flight.append((ve, batch, step))
            if len(self._in_flight) < len(engines):
                return outputs
        if self._in_flight:  # the pipeline is full, or this virtual engine had nothing to run
            outputs += self._collect_oldest(final_only)
        return outputs

    def _collect_oldest(self, final_only: bool) -> list[RequestOutput]:
        ve, batch, step = self._in_flight.popleft()
        try:
            result = self.runner.collect(step)
        except BaseException:
            self._reset_prefix_caches()
            raise
        ve.in_flight = False
        return self._apply(ve.scheduler, batch, result, final_only, skip_aborted=True)

    def _reset_prefix_caches(self) -> None:
        for ve in self.virtual_engines:
            ve.kv.reset_prefix_cache()

    def _apply(self, scheduler, batch: ScheduledBatch, result: StepResult, final_only: bool,
               skip_aborted: bool = False) -> list[RequestOutput]:  # fmt: skip
        """Account a step's computed tokens and apply its samples; outputs of the requests that got one.

        ``skip_aborted``: the batch was in flight, so a request may have been
        aborted since; its results are dropped.
        """
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        groups = self._groups
        for group, entries in result.prompt_logprobs:
            if not skip_aborted or groups.get(group.request_id) is group:
                self.outputs.prompt_logprobs(group, entries)
        outputs, finished = [], []
        samples = result.samples
        if skip_aborted and any(sample.seq.is_finished for sample in samples):
            samples = [sample for sample in samples if not sample.seq.is_finished]  # stopped while in flight
        for group, samples in _by_request(samples):
            if skip_aborted and groups.get(group.request_id) is not group:
                continue
            if group.first_token_time is None:
                group.first_token_time = time.monotonic()
            group.sampled = True
            group.strategy.step(samples)
            if group.is_finished():
                finished.append(group)
            elif not final_only:
                outputs.append(self.outputs.request_output(group))
        scheduler.finish(finished)
        outputs += [self._release(group) for group in finished]
        return outputs

    def _drop_unfittable(self, kv, group: SequenceGroup) -> RequestOutput:
        """A request the whole KV pool cannot hold (its sequences together): finished where it is, "length"."""
        logger.warning(
            "request %s: its %d sequences need more KV-cache blocks than the pool's %d; finished early "
            "(finish_reason 'length'). Lower n/best_of or max_tokens, or give the cache more memory.",
            group.request_id, group.num_live_seqs(), kv.pool.num_blocks,
        )  # fmt: skip
        for seq in group.live_seqs():
            self.outputs.finish(seq, "length", None)
        return self._release(group)

    def _release(self, group: SequenceGroup) -> RequestOutput:
        self._groups.pop(group.request_id, None)
        if group.finished_time is None:
            group.finished_time = time.monotonic()
        for seq in group.seqs:
            self.outputs.drop(seq)
        return self.outputs.request_output(group)

    @property
    def num_preemptions(self) -> int:
        return sum(ve.scheduler.num_preemptions for ve in self.virtual_engines)

    # -- stats and admin ---------------------------------------------------------

    def stats(self) -> EngineStats:
        """Requests, KV-cache slots, prefix-cache counters and preemptions, as of now (between steps).

        With pipeline stages: sums over the virtual engines (usage over their pools together).
        """
        engines = self.virtual_engines
        kvs, scheds = [ve.kv for ve in engines], [ve.scheduler for ve in engines]
        allocated = used = 0
        for kv, sched in zip(kvs, scheds):
            a, u = kv.slot_usage(seq for group in sched.running for seq in group.live_seqs())
            allocated, used = allocated + a, used + u
        caches = [kv.cache for kv in kvs if kv.cache is not None]
        cpu_pools = [kv.cpu_pool for kv in kvs if kv.cpu_pool is not None]
        num_cpu_blocks = sum(p.num_blocks for p in cpu_pools)
        return EngineStats(
            num_running=sum(len(s.running) for s in scheds),
            num_waiting=sum(len(s.waiting) for s in scheds),
            kv_cache_usage=self.kv_cache_usage(),
            num_blocks=sum(kv.pool.num_blocks for kv in kvs),
            block_size=self.kv.block_size,
            allocated_slots=allocated,
            used_slots=used,
            cached_free_blocks=sum(kv.pool.num_evictable for kv in kvs),
            prefix_cache_queries=sum(c.queries for c in caches),
            prefix_cache_hits=sum(c.hits for c in caches),
            num_preemptions=sum(s.num_preemptions for s in scheds),
            num_swapped=sum(len(s.swapped) for s in scheds),
            num_cpu_blocks=num_cpu_blocks,
            cpu_kv_cache_usage=1.0 - sum(p.num_free for p in cpu_pools) / num_cpu_blocks if num_cpu_blocks else 0.0,
            num_swap_preemptions=sum(s.num_swap_preemptions for s in scheds),
            num_recompute_preemptions=sum(s.num_recompute_preemptions for s in scheds),
            swapped_out_blocks=sum(kv.num_swapped_out_blocks for kv in kvs),
            swapped_in_blocks=sum(kv.num_swapped_in_blocks for kv in kvs),
        )

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (e.g. between benchmark runs); True when done.

        Requests in flight keep their blocks; later requests find nothing
        cached from before the reset. The counters are not reset.
        """
        dropped = sum(ve.kv.reset_prefix_cache() for ve in self.virtual_engines)
        if self.kv.caching:
            logger.info("prefix cache reset: %d cached blocks forgotten", dropped)
        return True

    # -- lifecycle ---------------------------------------------------------------

    @property
    def dead_error(self) -> Optional[BaseException]:
        """Why the engine cannot run steps any more (a worker rank died), or None while it can."""
        return getattr(self.runner, "dead", None)

    def shutdown(self) -> None:
        """Stop the worker processes of a tensor/pipeline-parallel engine (nothing to do on one process)."""
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()


def _mark_scheduled(batch: ScheduledBatch) -> None:
    now = time.monotonic()
    for group in batch.groups:
        if group.first_scheduled_time is None:
            group.first_scheduled_time = now


def _by_request(samples: list[SampledToken]) -> list[tuple[SequenceGroup, list[SampledToken]]]:
    """The step's samples per request, each list in the order of the request's ``seqs``."""
    groups: dict[int, tuple[SequenceGroup, list[SampledToken]]] = {}
    for sample in samples:
        group = sample.seq.group
        groups.setdefault(id(group), (group, []))[1].append(sample)
    for group, group_samples in groups.values():
        if len(group_samples) > 1:
            order = {id(seq): i for i, seq in enumerate(group.seqs)}
            group_samples.sort(key=lambda s: order[id(s.seq)])
    return list(groups.values())


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    return torch.device(name)


def _demo_model() -> Path:
    from framework.testing import demo_model_path

    logger.info("no model given: using the built-in demo model (tiny, random weights)")
    return demo_model_path()

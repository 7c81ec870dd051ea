"""The model runner: the only place where a step's batch becomes tensors.

It owns the model, the KV cache, the decode CUDA graphs and the samplers.
``execute`` takes a ``ScheduledBatch``, performs its copy-on-write block
copies, flattens it (``input_batch.prepare_batch``), runs the model on the
new tokens only -- a pure-decode step by replaying the CUDA graph of its
batch-size bucket (``cuda_graphs``), any other step eagerly on persistent
input buffers (``device_inputs``) -- computes logits only at the sampled rows
(and at the prompt positions of requests that asked for ``prompt_logprobs``),
samples on the device -- each row with the sampler its request names -- and
copies the results to the host once (``step_results``).

``execute`` is ``launch`` (queue all of that, including the copy into pinned
memory) then ``fetch`` (wait for the copy, unpack). Async scheduling
(``LLMEngine``) puts ``launch_continuation`` in between: the next decode
step, whose input ids are the launched step's samples, read on the device.

CUDA graphs are used on CUDA devices unless ``enforce_eager`` is set or the
attention backend lacks ``supports_cuda_graphs``. They are captured by
``init_kv_cache`` (they bake in the cache's address); ``profile_peak_memory``
adds an estimate of their memory pool so that the KV cache leaves room.
"""

from __future__ import annotations

import gc
import logging
import os

import numpy as np
import torch

from framework.config import EngineConfig
from framework.engine.backend_selection import select_attention_backend
from framework.engine.cuda_graphs import DecodeGraphs, capture_sizes
from framework.engine.device_inputs import StepInputs
from framework.engine.input_batch import PreparedBatch, PromptLogprobRows, prepare_batch
from framework.engine.sampling_inputs import TokenCounts, build_sampling_metadata
from framework.engine.scheduler import ScheduledBatch
from framework.engine.sequence import Sequence
from framework.engine.step_results import LaunchedStep, StepResult, pack_rows, start_copy_to_host, unpack
from framework.forward_context import set_forward_context
from framework.interfaces import Sampler
from framework.layers.attention import Attention
from framework.layers.context import LayerContext
from framework.model_config import ModelConfig
from framework.model_loader import init_dummy_weights, load_weights
from framework.registry import Registries

logger = logging.getLogger(__name__)

GRAPH_POOL_SLACK = 256 << 20  # bytes beyond the measured estimate (split-K buffers, cuBLAS workspaces)


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        registries: Registries,
        device: torch.device,
        quant_config=None,
        parallel=None,
    ):
        self.config = config
        self.parallel = parallel  # framework.distributed.ParallelState of this rank; None: one process
        self.model_config = model_config
        self.device = device
        self.block_size = model_config.block_size
        self.backend = select_attention_backend(registries, device, model_config, config.attention_backend)
        ctx = LayerContext(
            dtype=model_config.dtype, device=device, attention_backend=self.backend, quant_config=quant_config,
            **(parallel.layer_context_fields() if parallel is not None else {}),
        )  # fmt: skip
        model_cls = registries.models.get(model_config.architecture)
        with torch.device(device):
            self.model = model_cls(model_config.hf_config, ctx)
        if config.load_format == "dummy":
            init_dummy_weights(self.model, seed=config.seed)
        else:
            load_weights(self.model, model_config.path)
        self.model.eval()
        self.registries = registries
        self.samplers: dict[str, Sampler] = {}  # by name, made on first use
        self._last_metadata = None  # (rows key, SamplingMetadata) of the last step, when reusable
        self.token_counts = TokenCounts(model_config.vocab_size, device)  # penalty counts kept on the device
        self.eos_token_ids = frozenset(model_config.eos_token_ids)
        self.block_dim = _block_dim(self.backend, model_config)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        # KV heads of this rank's shard (tensor parallelism splits or replicates them)
        self.num_kv_heads = self.attn_layers[0].num_kv_heads if self.attn_layers else model_config.num_kv_heads
        self.kv_cache: torch.Tensor | None = None
        blocks_per_seq = -(-model_config.max_model_len // self.block_size)
        self.inputs = StepInputs(
            config.max_num_batched_tokens, config.max_num_seqs, blocks_per_seq, self.block_size, device
        )
        self.graphs: DecodeGraphs | None = None
        self.use_cuda_graphs = self._cuda_graphs_wanted()
        logger.info("model %s loaded on %s; attention backend %r", model_config.architecture, device, self.backend.name)

    def _cuda_graphs_wanted(self) -> bool:
        if self.device.type != "cuda":
            return False
        reason = None
        if self.config.enforce_eager:
            reason = "enforce_eager is set"
        elif not getattr(self.backend, "supports_cuda_graphs", False):
            reason = f"attention backend {self.backend.name!r} does not support them"
        elif self.parallel is not None and self.parallel.pp_size > 1 and not _pp_graphs_wanted():
            reason = "pipeline stages run eagerly unless FRAMEWORK_PP_CUDA_GRAPHS=1 (not yet checked on GPUs)"
        if reason:
            logger.info("CUDA graphs off: %s", reason)
        return reason is None

    # -- KV cache ------------------------------------------------------------

    def kv_block_bytes(self) -> int:
        mc = self.model_config
        per_layer = self.backend.kv_cache_shape(1, self.block_size, self.num_kv_heads, mc.head_dim)
        elem = torch.empty((), dtype=mc.kv_torch_dtype).element_size()
        return len(self.attn_layers) * int(np.prod(per_layer)) * elem

    def init_kv_cache(self, num_blocks: int, num_cpu_blocks: int = 0) -> None:
        """Allocate the KV cache, and its CPU swap copy of ``num_cpu_blocks`` blocks (same layout; pinned on CUDA)."""
        mc = self.model_config
        shape = self.backend.kv_cache_shape(num_blocks, self.block_size, self.num_kv_heads, mc.head_dim)
        self.kv_cache = torch.zeros((len(self.attn_layers), *shape), dtype=mc.kv_torch_dtype, device=self.device)
        self.cpu_kv_cache = None
        if num_cpu_blocks:
            cpu_shape = self.backend.kv_cache_shape(num_cpu_blocks, self.block_size, self.num_kv_heads, mc.head_dim)
            # empty: a CPU block is always written (swap-out) before it is read (swap-in)
            self.cpu_kv_cache = torch.empty(
                (len(self.attn_layers), *cpu_shape), dtype=mc.kv_torch_dtype, device="cpu",
                pin_memory=self.device.type == "cuda",
            )  # fmt: skip
        for layer, cache in zip(self.attn_layers, self.kv_cache):
            layer.kv_cache = cache
        if self.use_cuda_graphs:
            self.enable_decode_graphs()
        for layer in self.attn_layers:  # after capture: scales come from the first real prefill
            layer.calculate_kv_scales = bool(getattr(self.config, "calculate_kv_scales", False))

    def release_graphs(self) -> None:
        """Drop the decode graphs and their memory pool (before leaving NCCL process groups)."""
        if self.graphs is None:
            return
        self.graphs = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def enable_decode_graphs(self) -> None:
        """Capture the decode graphs (on a CPU device: replay runs eagerly on the static buffers)."""
        mc = self.model_config
        pipeline = self.parallel.pipeline if self.parallel is not None else None
        self.graphs = DecodeGraphs(
            self.model, self.backend, self.config.max_num_seqs, mc.max_model_len, self.block_size, self.device,
            pipeline,
        )  # fmt: skip
        self.graphs.capture()
        sizes = self.graphs.sizes
        if self.device.type != "cuda":
            logger.info("decode graphs: %d bucket sizes, run eagerly on static buffers (no capture on %s)",
                        len(sizes), self.device.type)  # fmt: skip
            return
        logger.info(
            "CUDA graphs: captured %d decode batch sizes (%s) in %.1f s, using %.2f GiB of GPU memory",
            len(sizes), f"{sizes[0]}..{sizes[-1]}", self.graphs.capture_seconds, self.graphs.memory_bytes / 2**30,
        )  # fmt: skip

    @torch.inference_mode()
    def profile_peak_memory(self, num_tokens: int, num_seqs: int) -> int:
        """Device bytes the engine needs besides the KV cache.

        The peak of a forward over ``num_tokens`` tokens (no KV cache) and
        sampling, weights included; plus, when CUDA graphs will be captured,
        an estimate of their private memory pool (which the eager steps cannot
        reuse): the activations of a forward at the largest bucket, the
        hidden states every graph keeps, and ``GRAPH_POOL_SLACK``.
        """
        peak = self._forward_peak(num_tokens, num_seqs)
        # penalty token counts (int32) and prompt masks (bool) of up to twice max_num_seqs sequences
        peak += 2 * self.config.max_num_seqs * self.model_config.vocab_size * 5
        if self.use_cuda_graphs:
            sizes = capture_sizes(self.config.max_num_seqs)
            weights = torch.cuda.memory_allocated(self.device)
            activations = self._forward_peak(sizes[-1], sizes[-1]) - weights
            hidden_bytes = sum(sizes) * self.model_config.hf_config.hidden_size * self.model_config.dtype.itemsize
            reserve = activations + hidden_bytes + GRAPH_POOL_SLACK
            logger.info("memory profile: forward peak %.2f GiB; CUDA-graph pool reserve %.2f GiB",
                        peak / 2**30, reserve / 2**30)  # fmt: skip
            peak += reserve
        return peak

    def _forward_peak(self, num_tokens: int, num_seqs: int) -> int:
        torch.cuda.reset_peak_memory_stats(self.device)
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(num_tokens, device=self.device) % self.model_config.max_model_len
        with set_forward_context(None):
            hidden = self.model(input_ids, positions)
            rows = torch.linspace(0, num_tokens - 1, num_seqs, device=self.device).long()
            logits = self._compute_logits(hidden[rows])
            if logits is not None:  # None: a pipeline stage that neither computes nor receives logits
                torch.softmax(logits, dim=-1)
        torch.cuda.synchronize(self.device)
        del hidden, logits
        return torch.cuda.max_memory_allocated(self.device)

    # -- one step ------------------------------------------------------------

    def _logits(self, prepared: PreparedBatch, input_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run the model; logits at the sampled rows, then at the prompt-logprob rows (None: nothing to sample).

        ``input_ids``: the step's token ids as a device tensor (a continuation step, whose tokens were
        sampled by the step before it and never reached the host); None: ``prepared.input_ids``.
        """
        wanted = bool(prepared.sample_seqs) or prepared.prompt_logprobs is not None
        if self.graphs is not None and prepared.prompt_logprobs is None and self.graphs.fits(prepared):
            hidden = self.graphs.run(prepared, input_ids)  # row i = sequence i
            if not wanted:
                return None
            rows = prepared.logits_indices  # the decodes that sample, in order: all of them but for 1-token chunks
            if len(rows) < len(hidden):
                hidden = hidden[torch.from_numpy(rows).to(self.device, non_blocking=True)]
            return self._compute_logits(hidden)
        inputs, ids, rows = self.inputs.load(prepared)
        if input_ids is not None:
            ids.copy_(input_ids)
        metadata = self.backend.build_metadata(inputs)
        with set_forward_context(metadata):
            hidden = self.model(ids, inputs.positions)
        return self._compute_logits(hidden[rows]) if wanted else None

    def _compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits of ``hidden``'s rows; with several ranks, on the driver (None on ranks that get none)."""
        if self.parallel is None:
            return self.model.compute_logits(hidden)
        return self.parallel.compute_logits(self.model, hidden, self.model_config.vocab_size)

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: ``kv_cache[..., dst, ...] = kv_cache[..., src, ...]`` in every layer, all at once."""
        if not copies:
            return
        dim = self.block_dim + 1  # the cache tensor stacks the layers in front
        src = torch.tensor([s for s, _ in copies], dtype=torch.int64).to(self.device, non_blocking=True)
        dst = torch.tensor([d for _, d in copies], dtype=torch.int64).to(self.device, non_blocking=True)
        cache = _raw(self.kv_cache)  # fp8: CPU torch has no fp8 index_copy_
        cache.index_copy_(dim, dst, cache.index_select(dim, src))  # reads before writes

    def _swap_blocks(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Swap-outs (device -> CPU cache), then swap-ins (CPU -> device): one gather and one scatter each way.

        In this order because a swap-in may reuse a device block that a
        swap-out of the same step freed.
        """
        if not (swap_out or swap_in):
            return
        dim = self.block_dim + 1  # the cache tensors stack the layers in front
        device_cache, cpu_cache = _raw(self.kv_cache), _raw(self.cpu_kv_cache)
        pinned = self.device.type == "cuda"  # staging buffers: pinned, so the copies run at full speed

        def staging(num_blocks: int) -> torch.Tensor:
            shape = list(cpu_cache.shape)
            shape[dim] = num_blocks
            return torch.empty(shape, dtype=cpu_cache.dtype, pin_memory=pinned)

        if swap_out:
            src = torch.tensor([s for s, _ in swap_out], dtype=torch.int64).to(self.device, non_blocking=True)
            dst = torch.tensor([d for _, d in swap_out], dtype=torch.int64)
            host = staging(len(swap_out))
            host.copy_(device_cache.index_select(dim, src))  # synchronous: the CPU reads it next
            cpu_cache.index_copy_(dim, dst, host)
        if swap_in:
            src = torch.tensor([s for s, _ in swap_in], dtype=torch.int64)
            dst = torch.tensor([d for _, d in swap_in], dtype=torch.int64).to(self.device, non_blocking=True)
            host = torch.index_select(cpu_cache, dim, src, out=staging(len(swap_in)))
            device_cache.index_copy_(dim, dst, host.to(self.device, non_blocking=True))

    def sampler(self, name: str) -> Sampler:
        if name not in self.samplers:
            self.samplers[name] = self.registries.samplers.get(name)()
        return self.samplers[name]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        """Run one step and return its results on the host (``launch`` then ``fetch``)."""
        return self.fetch(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> LaunchedStep:
        """Queue a step's device work -- block moves, forward, sampling, the copy of its results to the
        host -- without waiting for it; ``fetch`` waits and unpacks."""
        prepared = prepare_batch(batch, self.block_size) if batch.seqs else None
        if self.parallel is not None:  # the driver: the workers run the same step
            self.parallel.publish_step(prepared, batch)
        self._swap_blocks(batch.swap_out, batch.swap_in)
        self._copy_blocks(batch.block_copies)
        if prepared is None:
            return LaunchedStep(None)
        return self._launch_sampling(prepared, self._logits(prepared))

    @torch.inference_mode()
    def launch_continuation(
        self, prepared: PreparedBatch, block_copies: list[tuple[int, int]], previous: LaunchedStep,
        rows: np.ndarray | None,
    ) -> LaunchedStep:  # fmt: skip
        """Queue a pure-decode step (``input_batch.prepare_continuation``) behind ``previous``, still in
        flight: sequence i's input token is the one ``previous`` sampled in its row ``rows[i]`` (None:
        row i), read on the device. One process only (workers would need the tokens too)."""
        if self.parallel is not None:
            raise RuntimeError("async scheduling runs on one process only")
        sampled = previous.device[:, 0]  # float64 token ids, sampled rows first
        sampled = sampled[: len(prepared.seqs)] if rows is None else sampled[_upload_index(rows, self.device)]
        self._copy_blocks(block_copies)
        return self._launch_sampling(prepared, self._logits(prepared, sampled.to(torch.int64)))

    def fetch(self, step: LaunchedStep) -> StepResult:
        """Wait for a launched step's results and split them per sequence (the step's only sync)."""
        if step.prepared is None or step.device is None:
            return StepResult()
        return unpack(step.host, step.width, step.prepared.sample_seqs, step.num_top, step.prepared.prompt_logprobs,
                      ready=step.ready)  # fmt: skip

    @torch.inference_mode()
    def results(self, prepared: PreparedBatch, logits: torch.Tensor | None) -> StepResult:
        """Sample a step's logits and bring the results to the host. The pipelined driver calls it when a
        step's logits come back from the last pipeline stage."""
        return self.fetch(self._launch_sampling(prepared, logits))

    def _launch_sampling(self, prepared: PreparedBatch, logits: torch.Tensor | None) -> LaunchedStep:
        """Sample a step's logits (sampled rows first, then prompt-logprob rows) into one packed tensor and
        start its copy to the host."""
        if logits is None:
            return LaunchedStep(prepared)
        prompt = prepared.prompt_logprobs
        num_sampled = len(prepared.logits_indices)
        vocab = logits.shape[-1]
        num_top = min(vocab, max((s.group.num_top_logprobs for s in prepared.sample_seqs), default=0))
        width = max(num_top, prompt.num_top if prompt is not None else 0)
        blocks = []
        if prepared.sample_seqs:
            blocks.append(self._sample(logits[:num_sampled], prepared, num_top, width))
        if prompt is not None:
            blocks.append(_prompt_logprobs(logits[num_sampled:], prompt, width, self.device))
        packed = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        host, ready = start_copy_to_host(packed)
        return LaunchedStep(prepared, packed, host, ready, width, num_top)

    @torch.inference_mode()
    def execute_worker_step(self, prepared: PreparedBatch | None, copies, swap_out, swap_in) -> None:
        """A worker rank's part of a step (see ``framework.distributed.worker``): block moves and the
        forward with its collectives; sampling is the driver's."""
        self._swap_blocks(swap_out, swap_in)
        self._copy_blocks(copies)
        if prepared is not None:
            self._logits(prepared)

    def _sample(self, logits: torch.Tensor, prepared: PreparedBatch, num_top: int, width: int) -> torch.Tensor:
        """Packed rows of every sampled sequence; rows are split by the sampler their request names."""
        seqs = prepared.sample_seqs
        if prepared.sample_rows is not None:  # children forked this step share their parent's row
            logits = logits[torch.from_numpy(prepared.sample_rows).to(self.device, non_blocking=True)]
        names = [s.params.sampler for s in seqs]
        if len(set(names)) == 1:
            return self._sample_with(names[0], logits, seqs, num_top, width)
        block = torch.empty(len(seqs), 3 + 2 * width, dtype=torch.float64, device=self.device)
        for name in dict.fromkeys(names):
            index = [i for i, n in enumerate(names) if n == name]
            rows = torch.tensor(index, dtype=torch.int64).to(self.device, non_blocking=True)
            block[rows] = self._sample_with(name, logits[rows], [seqs[i] for i in index], num_top, width)
        return block

    def _sample_with(self, name: str, logits: torch.Tensor, seqs: list[Sequence], num_top: int, width: int):
        out = self.sampler(name)(logits, self._sampling_metadata(name, seqs, logits.shape[-1], num_top))
        return pack_rows(out.token_ids, out.logprobs, out.ranks, out.top_token_ids, out.top_logprobs, width)

    def _sampling_metadata(self, name: str, seqs: list[Sequence], vocab_size: int, num_top: int):
        """The step's ``SamplingMetadata``; the last one again when the rows are the same sequences.

        Reuse is safe only without logits processing: every other field is a
        function of the sequences' fixed parameters (penalty counts and
        ``min_tokens`` bans change every step). In steady decoding the batch
        is often unchanged, and rebuilding costs a Python pass over every row
        and four host-to-device copies.
        """
        key = (name, num_top, vocab_size, tuple(s.seq_id for s in seqs))
        if self._last_metadata is not None and self._last_metadata[0] == key:
            return self._last_metadata[1]
        metadata = build_sampling_metadata(
            seqs, vocab_size, self.device, self.eos_token_ids, num_top, counts=self.token_counts
        )
        self._last_metadata = (key, metadata) if metadata.no_logits_processing else None
        return metadata


def _upload_index(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """``rows`` as an int64 device tensor, copied from pinned memory (a pageable copy may wait for the GPU)."""
    index = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
    if device.type == "cuda":
        index = index.pin_memory()
    return index.to(device, non_blocking=True)


def _prompt_logprobs(logits: torch.Tensor, prompt: PromptLogprobRows, width: int, device) -> torch.Tensor:
    """Packed rows: the raw logprob and rank of each next prompt token, and the top ``prompt.num_top``."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.from_numpy(prompt.targets).to(device, non_blocking=True)
    chosen = logprobs.gather(1, targets.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_logprobs = top_ids = None
    if prompt.num_top:
        top_logprobs, top_ids = logprobs.topk(prompt.num_top, dim=-1)
    return pack_rows(targets, chosen.squeeze(1), ranks, top_ids, top_logprobs, width)


def _raw(cache: torch.Tensor) -> torch.Tensor:
    """The cache as plain bytes when its dtype has one byte (fp8: not every copy kernel takes it)."""
    return cache.view(torch.uint8) if cache.element_size() == 1 else cache


def _block_dim(backend: type, mc: ModelConfig) -> int:
    """The axis of one layer's KV cache that indexes blocks (the one that changes with num_blocks)."""
    a = backend.kv_cache_shape(2, mc.block_size, mc.num_kv_heads, mc.head_dim)
    b = backend.kv_cache_shape(3, mc.block_size, mc.num_kv_heads, mc.head_dim)
    dims = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(dims) != 1:
        raise ValueError(f"attention backend {backend.name!r}: kv_cache_shape has no single block axis ({a} vs {b})")
    return dims[0]


def _pp_graphs_wanted() -> bool:
    """Decode graphs on pipeline stages (``cuda_graphs.py``, "Pipeline stages"): opt-in until checked on GPUs."""
    return os.environ.get("FRAMEWORK_PP_CUDA_GRAPHS") == "1"

"""Small, capability-declaring interfaces that plugins implement.

* model architectures: ``CausalLM`` (a protocol; any ``nn.Module`` with these
  methods works);
* samplers: ``Sampler`` (token level) and ``DecodingStrategy`` (request
  level, with the ``SequenceOps`` the engine gives it);
* quantizers: ``QuantConfig`` and the ``LinearMethod`` it hands to layers;
* attention backends: ``framework.attention.AttentionBackend``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from framework.sampling_metadata import SamplerOutput, SamplingMetadata


@runtime_checkable
class CausalLM(Protocol):
    """What a model plugin's class provides (constructed as ``Class(hf_config, ctx)``)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flattened batch in, hidden states out.

        Args:
            input_ids: ``[num_tokens]`` int64, the new tokens of every sequence.
            positions: ``[num_tokens]`` int64, each token's position.
        Returns:
            ``[num_tokens, hidden_size]`` final hidden states (after the norm).
        """

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, hidden_size]`` -> ``[n, vocab_size]`` float32 logits (only sampled rows)."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load checkpoint tensors; return the names of the parameters filled.

        Maps checkpoint names onto fused parameters (``q/k/v_proj`` ->
        ``qkv_proj``; ``gate/up_proj`` -> ``gate_up_proj``) and keeps only this
        rank's shard through each parameter's ``weight_loader``.
        """


class Sampler:
    """Turns one step's logits into tokens (registered via ``register_samplers``).

    Token level and batched: one call samples every row of the step whose
    request names this sampler (``SamplingParams.sampler``, default
    ``"standard"``). Constructed once per engine with no arguments.
    """

    name: ClassVar[str] = ""

    def __call__(self, logits: torch.Tensor, metadata: "SamplingMetadata") -> "SamplerOutput":
        """Sample one token per row.

        Args:
            logits: ``[N, vocab]`` float32 raw logits of the rows that sample
                (not to be modified in place).
            metadata: per-row parameters as device tensors: temperature and
                the filters, per-request generators, penalties, logit bias,
                ``min_tokens`` bans and how many top logprobs to return.
        Returns:
            ``SamplerOutput`` on the device; no host sync inside (no
            ``.item()``, ``.tolist()``, ``.cpu()``).
        """
        raise NotImplementedError


class SequenceOps(Protocol):
    """What the engine lets a ``DecodingStrategy`` do to its request's sequences.

    A sequence is a ``framework.engine.sequence.Sequence``: ``token_ids``
    (prompt + generated), ``output_token_ids``, ``cumulative_logprob``,
    ``index``, ``is_finished``. Live sequences hold KV-cache blocks.
    """

    seqs: list  # the request's sequences, in the strategy's order
    stop_token_ids: frozenset[int]  # EOS (unless ignore_eos) and SamplingParams.stop_token_ids
    max_output_tokens: int  # max_tokens, capped by max_model_len - prompt length

    def fork(self, seq) -> Any:
        """A new live sequence with ``seq``'s tokens; it shares ``seq``'s KV blocks (copy on write)."""

    def copy(self, seq) -> Any:
        """A detached copy of ``seq`` (no KV blocks, never scheduled): e.g. a finished beam hypothesis."""

    def keep(self, seqs: list) -> None:
        """Make ``seqs`` the request's sequences, in this order; free every other live one."""

    def append(self, seq, token_id: int, logprob: float, sample=None, check_stop: bool = True) -> None:
        """Append a token. With ``check_stop`` the standard stop rules run (EOS, stop ids and strings,
        max_tokens, max_model_len) and may finish ``seq``; ``sample`` (its row's ``SampledToken``)
        supplies the top logprobs when the request asked for them."""

    def finish(self, seq, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark ``seq`` finished ("stop" / "length") and free its KV blocks."""

    def decode(self, seq) -> str:
        """The text of ``seq``'s generated tokens."""


class DecodingStrategy:
    """How one request turns each step's samples into its output sequences.

    Registered through ``register_samplers`` like a ``Sampler`` and chosen per
    request by ``SamplingParams.strategy_name`` (built in: ``"parallel"`` for
    n / best_of sampling, ``"beam_search"``). One instance per request,
    constructed as ``Strategy(params, ops)`` with the request's
    ``SamplingParams`` and its ``SequenceOps``. Life of a request:

    1. the prompt is computed once, as one sequence;
    2. at the step that samples its first token, ``fanout`` sequences sample
       from the prompt's last logits row: the engine forks ``fanout - 1``
       children sharing the prompt's KV blocks, each with its own seed;
    3. every later step, all live sequences of the request sample together
       (the scheduler never samples part of a request) and ``step`` gets
       one ``SampledToken`` per live sequence, in ``ops.seqs`` order;
    4. when ``is_finished()``, the engine frees what is left and reports
       ``outputs()``.

    Class or instance attributes the engine reads after construction:
    ``fanout``; ``max_width`` (the most live sequences at once, counted
    against ``max_num_seqs``); ``num_top_logprobs`` (top logprobs each of its
    rows needs from the sampler); ``uses_processed_logprobs`` (its rows'
    logprobs come from the processed logits, see ``SamplingMetadata``);
    ``supports_async_scheduling``: after the first sample, ``step`` only
    appends one token to each sequence (``ops.append``: no fork, ``keep`` or
    ``finish``), so the engine may run the next decode step before ``step``
    has seen this one's tokens (``EngineConfig.async_scheduling``: the tokens
    of a sequence that stopped meanwhile are dropped, never passed to
    ``step``).
    """

    name: ClassVar[str] = ""
    fanout: int = 1
    max_width: int = 1
    num_top_logprobs: int = 0
    uses_processed_logprobs: bool = False
    supports_async_scheduling: bool = False

    def __init__(self, params: Any, ops: SequenceOps):
        self.params = params
        self.ops = ops

    def step(self, samples: list) -> None:
        """Apply one step's samples (``framework.engine.step_results.SampledToken``: ``seq``,
        ``token_id``, ``logprob``, ``rank``, ``top`` = [(token id, logprob)], most likely first)."""
        raise NotImplementedError

    def is_finished(self) -> bool:
        raise NotImplementedError

    def outputs(self) -> list:
        """The sequences to report, best first; ``CompletionOutput.index`` is the position here."""
        raise NotImplementedError


class LinearMethod:
    """How a linear layer stores and applies its weight (unquantized, GPTQ, AWQ...)."""

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        params_dtype: torch.dtype,
    ) -> None:
        """Register the layer's parameters; each gets a ``weight_loader`` attribute."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack loaded weights for the kernels (optional)."""

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def apply_silu_and_mul(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """For a merged gate/up projection the model marked ``gated_silu`` (before its weights are loaded):
        ``silu(gate) * up`` of ``apply``'s output, computed in one kernel, or None where the method has no such
        kernel for this step (the caller then runs ``apply`` and SiluAndMul). Optional."""
        return None

    def fuses_silu_and_mul(self, layer: torch.nn.Module, rows: int) -> bool:
        """Whether ``apply_silu_and_mul`` has its kernel for a step of ``rows`` rows of ``layer`` (the model then
        runs the norm before the projection on its own, not fused with the projection). Optional."""
        return False


class QuantConfig:
    """A quantization method (registered via ``register_quantizers``)."""

    name: ClassVar[str] = ""

    @classmethod
    def from_config(cls, quantization_config: dict[str, Any]) -> "QuantConfig":
        """Build from a checkpoint's ``quantization_config`` (may be empty)."""
        return cls()

    def get_linear_method(self, layer: torch.nn.Module, prefix: str) -> LinearMethod | None:
        """The method for one linear layer, or None to leave it unquantized."""
        return None

    @classmethod
    def quantize_checkpoint(cls, model_dir: Path, out_dir: Path, **options: Any) -> dict[str, Any]:
        """Quantize an unquantized checkpoint into this method's format (``framework quantize``).

        Args:
            model_dir: a Hugging Face model directory (config.json, safetensors, tokenizer).
            out_dir: where the quantized checkpoint is written.
            **options: method options given on the command line (``bits``,
                ``group_size``, ``desc_act``, ``sym``, ``damp_percent``,
                ``calibration``, ``num_samples``, ``seq_len``, ``device``); a
                method rejects the ones it does not support with a ValueError.

        Returns:
            A JSON-serialisable summary (layers quantized, time, per-layer
            relative output error, perplexity before/after when measured).
        """
        raise ValueError(f"quantization method {cls.name or cls.__name__!r} cannot quantize checkpoints")

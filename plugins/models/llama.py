"""Llama-family decoder (Llama 1-3, Mistral, Qwen2) on the framework's layers.

One class serves the three architectures; they differ only in config:

* Llama: ``attention_bias`` (q/k/v/o, default False) and ``mlp_bias``;
* Mistral: no biases; ``sliding_window`` (see ``_check_sliding_window``);
* Qwen2: bias on q/k/v (``attention_bias``, default True), none on o_proj.

Module names follow the Hugging Face checkpoints, with q/k/v and gate/up
fused (``load_weights`` maps them)::

    model.embed_tokens
    model.layers.N.input_layernorm
    model.layers.N.self_attn.{qkv_proj, o_proj, rotary_emb, attn}
    model.layers.N.post_attention_layernorm
    model.layers.N.mlp.{gate_up_proj, down_proj}
    model.norm
    lm_head                       (shares embed_tokens' weight when tied)
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from framework.layers import (
    Attention,
    LayerContext,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
    get_rope,
)
from framework.model_config import HFConfig
from plugins.quant.fp8_kv import load_kv_scale

# checkpoint name fragment -> (fused parameter fragment, shard id)
_STACKED = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}
# every shard a fused parameter needs before it counts as loaded
_REQUIRED_SHARDS = {"qkv_proj": {"q", "k", "v"}, "gate_up_proj": {0, 1}}
# checkpoint tensors that are not parameters here (rotary tables are recomputed)
_IGNORED = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def _biases(hf_config: HFConfig) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o_proj bias, MLP bias) for the config's architecture."""
    arch = (hf_config.get("architectures") or ["LlamaForCausalLM"])[0]
    qwen2 = arch == "Qwen2ForCausalLM"
    attention_bias = hf_config.get("attention_bias")
    if attention_bias is None:
        attention_bias = qwen2
    return bool(attention_bias), bool(attention_bias) and not qwen2, bool(hf_config.get("mlp_bias") or False)


def _max_model_len(hf_config: HFConfig) -> int:
    """The engine writes the resolved ``max_model_len`` into the config before building the model."""
    return int(hf_config.get("max_model_len") or hf_config.max_position_embeddings)


def _check_sliding_window(hf_config: HFConfig) -> None:
    """Refuse configs whose sliding window would change attention within ``max_model_len``.

    As in vLLM, a window at least as long as every sequence is plain causal
    attention, so it is ignored. Qwen2 only slides when ``use_sliding_window``
    is set (its ``layer_types`` then name "sliding_attention" layers).
    """
    window = hf_config.attention_window()
    max_len = _max_model_len(hf_config)
    if window is not None and window < max_len:
        raise ValueError(
            f"sliding_window={window} is smaller than max_model_len={max_len}; sliding-window attention "
            f"is not supported yet: set max_model_len <= {window}"
        )


def _required(param_name: str) -> set:
    """Shards a parameter needs: a fused q/k/v or gate/up weight is loaded once all its parts are."""
    module = param_name.rsplit(".", 2)[-2]
    return _REQUIRED_SHARDS.get(module, {None})


class LlamaAttention(nn.Module):
    def __init__(self, hf_config: HFConfig, ctx: LayerContext, rotary_emb: RotaryEmbedding, prefix: str):
        super().__init__()
        hidden = hf_config.hidden_size
        num_heads = hf_config.num_attention_heads
        num_kv_heads = hf_config.get("num_key_value_heads") or num_heads
        head_dim = hf_config.get("head_dim") or hidden // num_heads
        qkv_bias, o_bias, _ = _biases(hf_config)
        self.qkv_proj = QKVParallelLinear(
            hidden, head_dim, num_heads, num_kv_heads, qkv_bias, ctx, prefix=f"{prefix}.qkv_proj"
        )
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden, o_bias, ctx, prefix=f"{prefix}.o_proj")
        self.rotary_emb = rotary_emb  # one table shared by every layer
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.attn = Attention(
            self.qkv_proj.num_heads, head_dim, head_dim**-0.5, self.qkv_proj.num_kv_heads, ctx, prefix=f"{prefix}.attn"
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.attend(positions, self.qkv_proj(hidden))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """The block after the q/k/v projection (the decoder layer fuses that one with its norm)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # The attention layer rotates q and k (or its backend does, fused into the KV-cache write).
        return self.o_proj(self.attn(q, k, v, positions=positions, rotary=self.rotary_emb))


class LlamaMLP(nn.Module):
    def __init__(self, hf_config: HFConfig, ctx: LayerContext, prefix: str):
        super().__init__()
        act = hf_config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported (only 'silu')")
        hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
        bias = _biases(hf_config)[2]
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias, ctx, f"{prefix}.gate_up_proj")
        self.gate_up_proj.gated_silu = True  # its halves feed SiluAndMul: a quant method may fuse the two
        self.down_proj = RowParallelLinear(inter, hidden, bias, ctx, f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_gate_up(self.gate_up_proj(x))

    def from_gate_up(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The MLP after the gate/up projection (the decoder layer fuses that one with its norm)."""
        return self.act_fn.then_linear(gate_up, self.down_proj)

    def after_norm(self, norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None):
        """``(mlp(norm(hidden + residual)), hidden + residual)``: where the gate/up projection's method computes
        ``silu(gate) * up`` in one kernel for this step (``fuses_silu_and_mul``: int4 decode steps with the fused
        gate), the norm, then that kernel; else the norm runs with the projection (``RMSNorm.then_linear``) and
        SiLU-and-mul with the down projection."""
        method = self.gate_up_proj.linear_method
        if method.fuses_silu_and_mul(self.gate_up_proj, hidden.shape[:-1].numel()):
            normed, summed = norm(hidden, residual) if residual is not None else (norm(hidden), hidden)
            act = method.apply_silu_and_mul(self.gate_up_proj, normed, self.gate_up_proj.bias)
            if act is not None:
                return self.down_proj(act), summed
            return self.from_gate_up(self.gate_up_proj(normed)), summed
        gate_up, summed = norm.then_linear(hidden, residual, self.gate_up_proj)
        return self.from_gate_up(gate_up), summed


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hf_config: HFConfig, ctx: LayerContext, rotary_emb: RotaryEmbedding, prefix: str):
        super().__init__()
        eps = hf_config.get("rms_norm_eps", 1e-6)
        self.self_attn = LlamaAttention(hf_config, ctx, rotary_emb, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(hf_config, ctx, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(hf_config.hidden_size, eps, ctx)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, eps, ctx)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, residual stream before it): the next norm adds them.

        Each norm runs with the projection after it (``RMSNorm.then_linear``: one kernel at decode sizes);
        the first layer has no residual yet (its input is the stream).
        """
        qkv, residual = self.input_layernorm.then_linear(hidden, residual, self.self_attn.qkv_proj)
        hidden = self.self_attn.attend(positions, qkv)
        return self.mlp.after_norm(self.post_attention_layernorm, hidden, residual)


class LlamaModel(nn.Module):
    def __init__(self, hf_config: HFConfig, ctx: LayerContext, prefix: str = "model"):
        super().__init__()
        hidden, num_heads = hf_config.hidden_size, hf_config.num_attention_heads
        head_dim = hf_config.get("head_dim") or hidden // num_heads
        rope_parameters = hf_config.rope_settings()
        if hf_config.get("partial_rotary_factor") is not None:  # older configs keep it at top level
            rope_parameters.setdefault("partial_rotary_factor", hf_config.partial_rotary_factor)
        rotary_emb = get_rope(
            head_dim,
            hf_config.max_position_embeddings,
            rope_parameters,
            dtype=ctx.dtype,
            device=ctx.device,
            max_model_len=_max_model_len(hf_config),
        )
        # Pipeline parallelism: this stage builds layers [start, end) (the others are empty
        # placeholders, so names keep their indices), the embedding on the first stage and the
        # final norm on the last.
        num_layers, pp = hf_config.num_hidden_layers, ctx.pipeline
        self.pipeline, self.hidden_size, self.dtype = pp, hidden, ctx.dtype
        self.start, self.end = pp.layer_range(num_layers) if pp is not None else (0, num_layers)
        self.embed_tokens = None
        if pp is None or pp.is_first:
            vocab = hf_config.vocab_size
            self.embed_tokens = VocabParallelEmbedding(vocab, hidden, ctx, prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hf_config, ctx, rotary_emb, f"{prefix}.layers.{i}") if self.start <= i < self.end
            else nn.Identity()  # on another pipeline stage
            for i in range(num_layers)
        )  # fmt: skip
        self.norm = RMSNorm(hidden, hf_config.get("rms_norm_eps", 1e-6), ctx) if pp is None or pp.is_last else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            hidden, residual = self.embed_tokens(input_ids), None
        else:  # a later pipeline stage: the previous stage's hidden states and residual stream
            hidden, residual = self.pipeline.recv((2, input_ids.shape[0], self.hidden_size), self.dtype).unbind(0)
        for layer in self.layers[self.start : self.end]:
            hidden, residual = layer(positions, hidden, residual)
        if self.norm is None:  # an earlier pipeline stage: hand both on
            self.pipeline.send(torch.stack([hidden, residual]))
            return hidden
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def on_this_stage(self, name: str) -> bool:
        """Whether checkpoint tensor ``name`` (``model.`` prefix) belongs to a module this stage builds."""
        if name.startswith("model.embed_tokens."):
            return self.embed_tokens is not None
        if name.startswith("model.norm."):
            return self.norm is not None
        if name.startswith("model.layers."):
            return self.start <= int(name.split(".")[2]) < self.end
        return True


class LlamaForCausalLM(nn.Module):
    """Llama / Mistral / Qwen2 causal LM (implements ``framework.interfaces.CausalLM``).

    Args:
        hf_config: config.json; the engine adds the resolved ``max_model_len``
            (the rotary table's length; default ``max_position_embeddings``).
        ctx: dtype, device, attention backend, quantization, TP rank and
            pipeline stage (``ctx.pipeline``: only this stage's layers are built
            and loaded; the embedding on the first stage, norm and head on the last).
    Raises:
        ValueError: for a sliding window shorter than ``max_model_len`` or an
            activation other than SiLU.
    """

    def __init__(self, hf_config: HFConfig, ctx: LayerContext):
        super().__init__()
        if not hf_config.get("architectures"):  # the registered name decides the biases
            hf_config = HFConfig(hf_config, architectures=[type(self).__name__])
        _check_sliding_window(hf_config)
        self.hf_config = hf_config
        self.quantized = ctx.quant_config is not None
        self.model = LlamaModel(hf_config, ctx)
        self.tie_word_embeddings = bool(hf_config.get("tie_word_embeddings", False))
        self.lm_head = None  # not on the stages before the last
        if ctx.pipeline is None or ctx.pipeline.is_last:
            self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, ctx, prefix="lm_head")
        # tied on one stage: the head is the embedding; on a last stage without the embedding,
        # the head loads the embedding's checkpoint tensor
        has_both = self.lm_head is not None and self.model.embed_tokens is not None
        self.head_is_embedding = self.tie_word_embeddings and has_both
        self._head_loads_embedding = self.tie_word_embeddings and self.lm_head is not None and not has_both
        if self.head_is_embedding:
            self.lm_head.tie_weights(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[T]`` ids and positions -> ``[T, hidden_size]`` final hidden states."""
        return self.model(input_ids, positions)

    def _on_this_stage(self, ckpt_name: str) -> bool:
        if ckpt_name.startswith("lm_head."):
            return self.lm_head is not None
        return self.model.on_this_stage(ckpt_name)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, hidden_size]`` -> ``[n, vocab_size]`` float32 logits."""
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face checkpoint tensors; returns the parameter names filled.

        Raises:
            ValueError: for a checkpoint name with no parameter here, or a
                tensor of the wrong shape (naming both).
        """
        params = dict(self.named_parameters())
        shards: dict[str, set] = {}
        for ckpt_name, tensor in weights:
            if any(part in ckpt_name for part in _IGNORED):
                continue
            if self.tie_word_embeddings and ckpt_name.startswith("lm_head."):
                continue  # the head is the embedding
            if self._head_loads_embedding and ckpt_name.startswith("model.embed_tokens."):
                ckpt_name = "lm_head." + ckpt_name[len("model.embed_tokens.") :]  # tied, on the last of several stages
            if not self._on_this_stage(ckpt_name):
                continue  # pipeline parallelism: another stage loads it
            if load_kv_scale(self, ckpt_name, tensor):
                continue  # fp8 KV-cache scale (k_scale / v_scale / kv_scale / k_proj.output_scale)
            name, shard_id = ckpt_name, None
            for part, (fused, sid) in _STACKED.items():
                if part in ckpt_name:
                    name, shard_id = ckpt_name.replace(part, fused), sid
                    break
            if name not in params:
                if self.quantized and name.endswith(".bias"):
                    continue  # GPTQ exports may carry zero biases the layers do not have
                raise ValueError(f"checkpoint tensor {ckpt_name!r} has no matching parameter in {type(self).__name__}")
            param = params[name]
            args = (param, tensor) if shard_id is None else (param, tensor, shard_id)
            try:
                param.weight_loader(*args)
            except ValueError as err:
                raise ValueError(f"checkpoint tensor {ckpt_name!r}: {err}") from None
            shards.setdefault(name, set()).add(shard_id)
        return {name for name, got in shards.items() if None in got or got >= _required(name)}


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama without biases (same class; the config decides)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: Llama with q/k/v bias (same class; ``architectures`` in config.json decides)."""

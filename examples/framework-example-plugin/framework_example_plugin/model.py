"""``ExampleForCausalLM``: a decoder written only with ``framework.layers``.

It has the Llama computation (pre-norm, rotary attention with grouped KV
heads, SiLU-gated MLP) under a name of its own, so its checkpoints use the
Hugging Face Llama tensor names and can be checked against transformers. A
real plugin would change the blocks it needs; the engine-facing contract is
the three methods at the bottom: ``forward``, ``compute_logits`` and
``load_weights``.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from framework.layers import (
    Attention,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
    get_rope,
)


class ExampleBlock(nn.Module):
    def __init__(self, cfg, ctx, rope, prefix: str):
        super().__init__()
        hidden, heads = cfg.hidden_size, cfg.num_attention_heads
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = hidden // heads
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(hidden, eps, ctx)
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, heads, kv_heads, False, ctx, prefix=f"{prefix}.qkv")
        self.attn = Attention(self.qkv_proj.num_heads, head_dim, head_dim**-0.5, self.qkv_proj.num_kv_heads, ctx)
        self.o_proj = RowParallelLinear(heads * head_dim, hidden, False, ctx, prefix=f"{prefix}.o_proj")
        self.post_attention_layernorm = RMSNorm(hidden, eps, ctx)
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], False, ctx, prefix=f"{prefix}.gate_up")
        self.down_proj = RowParallelLinear(inter, hidden, False, ctx, prefix=f"{prefix}.down_proj")
        self.act = SiluAndMul()
        self.rope = rope
        self.sizes = [self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size]

    def forward(self, positions, x):
        q, k, v = self.qkv_proj(self.input_layernorm(x)).split(self.sizes, dim=-1)
        q, k = self.rope(positions, q, k)
        x = x + self.o_proj(self.attn(q, k, v))
        return x + self.down_proj(self.act(self.gate_up_proj(self.post_attention_layernorm(x))))


class ExampleForCausalLM(nn.Module):
    # checkpoint name -> (parameter name, shard id) for the fused projections
    _FUSED = {
        "self_attn.q_proj": ("qkv_proj", "q"),
        "self_attn.k_proj": ("qkv_proj", "k"),
        "self_attn.v_proj": ("qkv_proj", "v"),
        "self_attn.o_proj": ("o_proj", None),
        "mlp.gate_proj": ("gate_up_proj", 0),
        "mlp.up_proj": ("gate_up_proj", 1),
        "mlp.down_proj": ("down_proj", None),
    }

    def __init__(self, cfg, ctx):
        super().__init__()
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        max_len = cfg.get("max_model_len") or cfg.max_position_embeddings
        rope = get_rope(
            head_dim, cfg.max_position_embeddings, cfg.rope_settings(),
            dtype=ctx.dtype, device=ctx.device, max_model_len=max_len,
        )  # fmt: skip
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx)
        self.layers = nn.ModuleList(ExampleBlock(cfg, ctx, rope, f"layers.{i}") for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.get("rms_norm_eps", 1e-6), ctx)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ctx)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(positions, x)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for ckpt_name, tensor in weights:
            name, shard = ckpt_name.removeprefix("model."), None
            for ckpt_part, (part, shard_id) in self._FUSED.items():
                if ckpt_part in name:
                    name, shard = name.replace(ckpt_part, part), shard_id
            if name not in params:
                raise ValueError(f"checkpoint tensor {ckpt_name!r} has no parameter in ExampleForCausalLM")
            loader = params[name].weight_loader
            loader(params[name], tensor) if shard is None else loader(params[name], tensor, shard)
            loaded.add(name)
        return loaded

"""Vocabulary-parallel token embedding and LM head.

The vocabulary is padded to a multiple of ``tp_size`` and split along dim 0::

    padded_vocab = ceil(vocab / tp) * tp,   per_rank = padded_vocab / tp
    rank r holds rows [r * per_rank, (r + 1) * per_rank); rows >= vocab are zero padding

The embedding looks up the ids that fall in this rank's rows, writes zeros
for the others, and sums across ranks with ``ctx.all_reduce``. The LM head
computes its rows' logits and concatenates the ranks' shards with
``ctx.all_gather`` (rank order = vocabulary order), so every rank of the
group holds the full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from framework.layers.context import LayerContext
from framework.layers.weight_loading import check_shape, copy_into, tag_parameters


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across tensor-parallel ranks.

    Args:
        num_embeddings: vocabulary size (unpadded, as in config.json).
        embedding_dim: hidden size.
        ctx: the layer context (dtype, device, tp_rank, tp_size, all_reduce).
        prefix: the module's name in the model (for error messages).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, ctx: LayerContext | None = None, prefix: str = ""):
        super().__init__()
        ctx = ctx or LayerContext()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_rank, self.tp_size = ctx.tp_rank, ctx.tp_size
        self.all_reduce = ctx.all_reduce
        self.num_embeddings_padded = -(-num_embeddings // self.tp_size) * self.tp_size
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = self.vocab_start + self.num_embeddings_per_partition  # exclusive, may include padding
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=ctx.dtype, device=ctx.device),
            requires_grad=False,
        )
        self.weight.output_dim = 0
        self.weight.weight_loader = self.weight_loader
        tag_parameters(self, prefix)

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        """Copy this rank's vocabulary rows of the full ``[vocab, ...]`` tensor; zero the padding rows."""
        expected = (self.num_embeddings, *param.shape[1:])
        check_shape(param, loaded_weight, expected, shard_id)
        real = max(0, min(self.vocab_end, self.num_embeddings) - self.vocab_start)
        with torch.no_grad():
            param.data[real:].zero_()
        copy_into(param.data[:real], loaded_weight.narrow(0, self.vocab_start, real))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[T]`` token ids -> ``[T, embedding_dim]`` embeddings."""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_shard, input_ids - self.vocab_start, torch.zeros_like(input_ids))
        out = F.embedding(local_ids, self.weight)
        out = out.masked_fill(~in_shard.unsqueeze(-1), 0)
        return self.all_reduce(out)

    def extra_repr(self) -> str:
        return (
            f"vocab={self.num_embeddings} (padded {self.num_embeddings_padded}), dim={self.embedding_dim}, "
            f"tp={self.tp_rank}/{self.tp_size}"
        )


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection ``hidden -> logits``, vocabulary-sharded like the embedding.

    Call it on the hidden states of the rows that sample; it returns float32
    logits over the real (unpadded) vocabulary.

    Args:
        num_embeddings: vocabulary size.
        embedding_dim: hidden size.
        ctx: the layer context.
        bias: whether the head has a bias (sharded like the vocabulary).
        prefix: the module's name in the model.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        ctx: LayerContext | None = None,
        bias: bool = False,
        prefix: str = "",
    ):
        super().__init__(num_embeddings, embedding_dim, ctx, prefix)
        ctx = ctx or LayerContext()
        self.all_gather = ctx.all_gather
        if bias:
            self.bias = nn.Parameter(
                torch.empty(self.num_embeddings_per_partition, dtype=ctx.dtype, device=ctx.device), requires_grad=False
            )
            self.bias.output_dim = 0
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        tag_parameters(self, prefix)

    def tie_weights(self, embedding: VocabParallelEmbedding) -> "ParallelLMHead":
        """Share ``embedding``'s weight (tie_word_embeddings); the head then has no weight of its own."""
        if embedding.weight.shape != self.weight.shape:
            raise ValueError(
                f"cannot tie LM head {tuple(self.weight.shape)} to embedding {tuple(embedding.weight.shape)}"
            )
        self.weight = embedding.weight
        return self

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, hidden]`` -> ``[n, vocab]`` float32 logits."""
        from framework.layers.linear import dense_linear

        logits = dense_linear(hidden, self.weight, self.bias)
        return self._gather(logits)[..., : self.num_embeddings].float()

    def _gather(self, logits: torch.Tensor) -> torch.Tensor:
        """``[n, padded_vocab / tp]`` on each rank -> ``[n, padded_vocab]`` on every rank."""
        if self.tp_size == 1:
            return logits
        return self.all_gather(logits.contiguous())

"""Building blocks for model plugins: tensor-parallel linear layers that ask the
quantization method for their weights, vocabulary-parallel embeddings and LM
head, RMSNorm, rotary embedding, and the attention layer that calls the
selected backend.

Every parameter carries ``weight_loader(param, loaded_weight, shard_id=None)``
that keeps this rank's shard of the full checkpoint tensor.
"""

from framework.layers.activation import SiluAndMul
from framework.layers.attention import Attention
from framework.layers.context import LayerContext
from framework.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from framework.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from framework.layers.norm import RMSNorm
from framework.layers.rotary import RotaryEmbedding, get_rope
from framework.layers.weight_loading import default_weight_loader

__all__ = [
    "Attention",
    "ColumnParallelLinear",
    "LayerContext",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "RowParallelLinear",
    "SiluAndMul",
    "UnquantizedLinearMethod",
    "VocabParallelEmbedding",
    "default_weight_loader",
    "get_rope",
]

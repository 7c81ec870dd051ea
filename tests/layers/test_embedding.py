"""Vocabulary-parallel embedding and LM head."""

import pytest
import torch
import torch.nn.functional as F

from framework.layers import LayerContext, ParallelLMHead, VocabParallelEmbedding


def load(layer, tensor):
    layer.weight.weight_loader(layer.weight, tensor)


@pytest.mark.parametrize("rank", [0, 1])
def test_embedding_rank_holds_its_vocab_rows_and_zero_padding(rank):
    full = torch.randn(7, 4)  # vocab 7 on 2 ranks: padded to 8, 4 rows each
    emb = VocabParallelEmbedding(7, 4, LayerContext(tp_rank=rank, tp_size=2))
    emb.weight.data.fill_(float("nan"))
    load(emb, full)
    expected = full[:4] if rank == 0 else torch.cat([full[4:], torch.zeros(1, 4)])
    assert torch.equal(emb.weight, expected)


def test_embedding_ranks_sum_to_full_lookup():
    full, ids = torch.randn(7, 4), torch.tensor([0, 3, 4, 6, 6, 1])
    outs = []
    for rank in range(2):
        emb = VocabParallelEmbedding(7, 4, LayerContext(tp_rank=rank, tp_size=2))
        load(emb, full)
        outs.append(emb(ids))  # all_reduce is the identity here: each output is the partial sum
    torch.testing.assert_close(outs[0] + outs[1], F.embedding(ids, full))
    assert torch.all(outs[0][2:5] == 0) and torch.all(outs[1][[0, 1, 5]] == 0)


def test_embedding_rejects_wrong_vocab():
    emb = VocabParallelEmbedding(7, 4, prefix="model.embed_tokens")
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight.*\(8, 4\).*\(7, 4\)"):
        load(emb, torch.randn(8, 4))


def test_lm_head_logits_are_float32_over_vocab():
    w, h = torch.randn(7, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    head = ParallelLMHead(7, 4, LayerContext(dtype=torch.float64))
    load(head, w)
    logits = head(h)
    assert logits.dtype == torch.float32 and logits.shape == (3, 7)
    torch.testing.assert_close(logits, (h @ w.T).float())


def test_lm_head_bias_and_tp_shard():
    w, b = torch.randn(7, 4), torch.randn(7)
    head = ParallelLMHead(7, 4, LayerContext(tp_rank=1, tp_size=2), bias=True)
    load(head, w)
    head.bias.weight_loader(head.bias, b)
    assert torch.equal(head.weight[:3], w[4:]) and torch.equal(head.bias[:3], b[4:])
    # the gather concatenates the ranks' shards in rank order; the padding row is cut off
    other = ParallelLMHead(7, 4, LayerContext(tp_rank=0, tp_size=2), bias=True)
    load(other, w)
    other.bias.weight_loader(other.bias, b)
    h = torch.randn(2, 4)
    head.all_gather = lambda shard: torch.cat([F.linear(h, other.weight, other.bias), shard], dim=-1)
    torch.testing.assert_close(head(h), h @ w.T + b)


def test_tied_head_shares_the_embedding_weight():
    emb, head = VocabParallelEmbedding(7, 4), ParallelLMHead(7, 4)
    head.tie_weights(emb)
    w = torch.randn(7, 4)
    load(emb, w)
    assert head.weight is emb.weight
    torch.testing.assert_close(head(torch.eye(4)), w.T)

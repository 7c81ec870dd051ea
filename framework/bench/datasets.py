"""Benchmark request sets: random token prompts (W1 and friends) or ShareGPT files."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class BenchRequest:
    prompt: list[int] | str
    prompt_len: int
    output_len: int


def random_lengths(num: int, input_range: tuple[int, int], output_range: tuple[int, int], seed: int = 0):
    """(prompt_len, output_len) pairs, each uniform in its inclusive range.

    W1 is ``random_lengths(1000, (64, 1024), (16, 512), seed=0)``.
    """
    rng = random.Random(seed)
    return [(rng.randint(*input_range), rng.randint(*output_range)) for _ in range(num)]


def random_requests(
    num: int, input_range: tuple[int, int], output_range: tuple[int, int], vocab_size: int, seed: int = 0
) -> list[BenchRequest]:
    """Prompts of random token ids (ids 10.. so special tokens are avoided)."""
    rng = random.Random(seed + 1)
    return [
        BenchRequest([rng.randrange(10, vocab_size) for _ in range(p)], p, o)
        for p, o in random_lengths(num, input_range, output_range, seed)
    ]


def sharegpt_requests(path: str | Path, num: int, tokenizer: Any, max_len: int, seed: int = 0) -> list[BenchRequest]:
    """First human turn as the prompt, the reply's token count as the output length.

    Conversations with fewer than two turns, or longer than ``max_len`` in
    all, are skipped; ``num`` are drawn in a seeded order.
    """
    data = json.loads(Path(path).read_text())
    rng = random.Random(seed)
    rng.shuffle(data)
    requests = []
    for item in data:
        turns = item.get("conversations") or item.get("conversation") or []
        if len(turns) < 2:
            continue
        prompt, reply = turns[0].get("value", ""), turns[1].get("value", "")
        prompt_len, output_len = len(tokenizer.encode(prompt)), len(tokenizer.encode(reply))
        if output_len < 4 or prompt_len + output_len > max_len:
            continue
        requests.append(BenchRequest(prompt, prompt_len, output_len))
        if len(requests) == num:
            break
    return requests

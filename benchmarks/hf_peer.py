"""The Hugging Face transformers peer on the same machine and workload.

Two ways transformers generates, on random bf16 weights of the same shape
(``generate_batch`` runs first, then the static sweep, each line printed as it
finishes, so that a time limit cuts the slowest part):
  * ``generate`` with a static cache (transformers compiles the forward
    automatically for it), over a sweep of batch sizes; prompts are
    left-padded to the longest in the batch and every request makes
    ``--new-tokens`` tokens;
  * ``generate_batch`` (transformers' continuous batching) over the first
    ``--requests`` W1 prompts, each making ``--new-tokens`` tokens (the API
    takes one max_new_tokens for the whole call).
Output tokens/s counts generated tokens only.

    python benchmarks/hf_peer.py --shape llama3-8b --batch-sizes 1 16 64 --requests 256
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dummy_model import SHAPES
from roofline import w1_requests


def build_model(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, tie_word_embeddings=False)
    config.eos_token_id = None  # random weights: never stop early
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def prompts(num: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab, (p,), generator=gen).tolist() for p, _ in w1_requests(num)]


def static_generate(model, batch: list[list[int]], new_tokens: int) -> float:
    """Seconds for one static-cache ``generate`` call over a left-padded batch."""
    longest = max(map(len, batch))
    ids = torch.zeros(len(batch), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(batch):
        ids[row, longest - len(p) :] = torch.tensor(p)
        mask[row, longest - len(p) :] = 1
    ids, mask = ids.cuda(), mask.cuda()
    kwargs = dict(
        attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        cache_implementation="static", pad_token_id=0,
    )  # fmt: skip
    model.generate(ids, **kwargs)  # compile and warm up at this shape
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def continuous_batching(model, batch: list[list[int]], new_tokens: int) -> tuple[float, int]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch(batch[:8], generation_config=config)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = model.generate_batch(batch, generation_config=config)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    generated = sum(len(o.generated_tokens) for o in outputs.values())
    return elapsed, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--skip-continuous", action="store_true")
    args = parser.parse_args()
    model = build_model(args.shape)
    data = prompts(args.requests, SHAPES[args.shape]["vocab_size"])
    print(json.dumps({"device": torch.cuda.get_device_name(), "transformers": _version()}), flush=True)
    # generate_batch first: the static sweep compiles per batch size and may use up a time limit.
    if not args.skip_continuous:
        seconds, generated = continuous_batching(model, data, args.new_tokens)
        print(json.dumps({"peer": "generate_batch", "requests": len(data), "seconds": round(seconds, 2),
                          "output_tok_s": round(generated / seconds, 1)}), flush=True)  # fmt: skip
    for bs in args.batch_sizes:
        seconds = static_generate(model, data[:bs], args.new_tokens)
        rate = bs * args.new_tokens / seconds
        print(json.dumps({"peer": "generate-static", "batch_size": bs, "seconds": round(seconds, 2),
                          "output_tok_s": round(rate, 1)}), flush=True)  # fmt: skip


def _version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    main()

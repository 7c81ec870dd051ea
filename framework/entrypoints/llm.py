"""The offline API: ``LLM.generate`` and ``LLM.chat`` (vLLM's names)."""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence, Union

from framework.config import ConfigLike, load_config
from framework.engine.llm_engine import LLMEngine
from framework.engine.stats import EngineStats
from framework.outputs import RequestOutput
from framework.sampling_params import SamplingParams

Prompts = Union[str, list[int], Sequence[str], Sequence[list[int]]]
Messages = list[dict[str, Any]]


class LLM:
    """An engine for offline batch generation.

    ``LLM("path/to/model", max_model_len=2048)`` or ``framework.build(config)``;
    keyword arguments are ``EngineConfig`` fields.
    """

    def __init__(self, model: Optional[str] = None, *, config: ConfigLike | None = None, **kwargs: Any):
        if model is not None:
            kwargs["model"] = model
        self.config = load_config(config, **kwargs)
        self.engine = LLMEngine(self.config)

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_stats(self) -> EngineStats:
        """The engine's counters and KV-cache accounting (prefix-cache hits, preemptions, slots)."""
        return self.engine.stats()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix (``enable_prefix_caching``); True when done."""
        return self.engine.reset_prefix_cache()

    def generate(
        self,
        prompts: Prompts,
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); results in input order.

        Each ``RequestOutput`` holds ``n`` completions (``outputs[i].index ==
        i``); with ``best_of > n`` or beam search
        (``SamplingParams(use_beam_search=True, n=k, temperature=0)``) they
        are ranked best first.
        """
        prompt_list = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompt_list))
        request_ids: list[str] = []
        try:
            for prompt, p in zip(prompt_list, params):
                request_ids.append(self.engine.add_request(prompt, p))
        except Exception:
            self.engine.abort_request(request_ids)  # all or nothing: the engine stays clean
            raise
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: Union[Messages, Sequence[Messages]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to conversations rendered with the tokenizer's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.engine.tokenizer
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; pass chat_template=")
        prompts = [
            tokenizer.apply_chat_template(
                conv, chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
            )
            for conv in conversations
        ]
        # The template already holds the BOS text, so encode without adding special tokens again.
        token_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outputs = self.generate(token_ids, sampling_params, use_tqdm)
        for out, prompt in zip(outputs, prompts):
            out.prompt = prompt
        return outputs

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = _progress_bar(len(request_ids)) if use_tqdm else None
        start, in_tokens, out_tokens = time.perf_counter(), 0, 0
        wanted = set(request_ids)
        try:
            while len(finished) < len(request_ids):
                for out in self.engine.step(final_only=True):
                    if out.finished and out.request_id in wanted:
                        finished[out.request_id] = out
                        if bar is not None:
                            in_tokens += len(out.prompt_token_ids)
                            out_tokens += sum(len(o.token_ids) for o in out.outputs)
                            elapsed = time.perf_counter() - start
                            bar.set_postfix_str(
                                f"est. speed input: {in_tokens / elapsed:.2f} toks/s, "
                                f"output: {out_tokens / elapsed:.2f} toks/s"
                            )
                            bar.update(1)
        except BaseException:
            self.engine.abort_request([r for r in request_ids if r not in finished])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[r] for r in request_ids]


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)


def _as_prompt_list(prompts: Prompts) -> list[Union[str, list[int]]]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single prompt given as token ids
    return prompts


def _as_params_list(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} SamplingParams for {count} prompts; give one, or one per prompt")
    return params

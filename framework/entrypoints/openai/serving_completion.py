"""``POST /v1/completions``: prompts of every shape, echo, logprobs, streaming."""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import Response
from fastapi.responses import JSONResponse

from framework.engine.async_engine import RequestStream
from framework.engine.llm_engine import PromptInput
from framework.entrypoints.openai.errors import invalid_request, unsupported
from framework.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    SamplingFields,
)
from framework.entrypoints.openai.sampling import build_sampling_params, supports
from framework.entrypoints.openai.serving_engine import (
    OpenAIServing,
    close_all,
    finite,
    iterate,
    new_id,
    now,
    stop_holdback,
    usage,
)
from framework.entrypoints.openai.streaming import DeltaTracker, sse_response
from framework.outputs import CompletionOutput, RequestOutput, SampleLogprobs
from framework.sampling_params import SamplingParams


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, request: CompletionRequest) -> Response:
        model = self.check_model(request.model)
        prompts = _prompt_list(request.prompt)
        params = self._sampling_params(request)
        streams = await self.submit(prompts, params)
        request_id, created = new_id("cmpl"), now()
        if request.stream:
            return sse_response(self._stream(streams, request, params, request_id, created, model))
        finals = await self.final_outputs(streams)
        choices = [
            self._choice(i * request.n + c.index, out, c, request, c.text, 0)
            for i, out in enumerate(finals)
            for c in out.outputs
        ]
        response = CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage(finals))
        return JSONResponse(response.model_dump())

    def _sampling_params(self, request: CompletionRequest) -> SamplingParams:
        if request.suffix:
            raise unsupported("suffix")
        if request.stream_options is not None and not request.stream:
            raise invalid_request("stream_options is only allowed with stream=true", "stream_options")
        if request.stream and request.best_of not in (None, request.n):
            raise invalid_request("best_of > n cannot be streamed: the best are known at the end", "best_of")
        if request.stream and request.use_beam_search:
            raise invalid_request("beam search cannot be streamed: beams change until the end", "use_beam_search")
        values = {name: getattr(request, name) for name in SamplingFields.model_fields}
        values.update(max_tokens=request.max_tokens, best_of=request.best_of, logprobs=request.logprobs)
        if request.echo and request.logprobs is not None:
            if not supports("prompt_logprobs"):
                raise unsupported("echo", "echo with logprobs needs prompt logprobs")
            values["prompt_logprobs"] = request.logprobs
        return build_sampling_params(values)

    def _choice(
        self, index: int, out: RequestOutput, c: CompletionOutput, request: CompletionRequest, text: str, start: int
    ) -> CompletionChoice:
        """A choice with ``text`` and the logprobs of ``c.token_ids[start:]`` (echo: the prompt first)."""
        prefix = self.prompt_text(out) if request.echo and start == 0 else ""
        logprobs = None
        if request.logprobs is not None:
            token_ids, entries = c.token_ids[start:], (c.logprobs or [])[start:]
            if prefix:
                prompt_entries = getattr(out, "prompt_logprobs", None) or [None] * len(out.prompt_token_ids)
                token_ids, entries = list(out.prompt_token_ids) + token_ids, list(prompt_entries) + entries
            logprobs = self._logprobs(token_ids, entries)
        return CompletionChoice(
            index=index, text=prefix + text, logprobs=logprobs, finish_reason=c.finish_reason, stop_reason=c.stop_reason
        )

    def _logprobs(self, token_ids: list[int], entries: SampleLogprobs) -> CompletionLogprobs:
        result, offset = CompletionLogprobs(), 0
        for token_id, entry in zip(token_ids, entries):
            chosen = entry.get(token_id) if entry else None
            token = chosen.decoded_token if chosen and chosen.decoded_token is not None else self._piece(token_id)
            result.tokens.append(token)
            result.token_logprobs.append(finite(chosen.logprob) if chosen else None)
            result.top_logprobs.append(
                {(lp.decoded_token or self._piece(t)): finite(lp.logprob) for t, lp in entry.items()} if entry else None
            )
            result.text_offset.append(offset)
            offset += len(token)
        return result

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    async def _stream(
        self,
        streams: list[RequestStream],
        request: CompletionRequest,
        params: SamplingParams,
        request_id: str,
        created: int,
        model: str,
    ) -> AsyncIterator[CompletionResponse]:
        tracker = DeltaTracker(holdback=stop_holdback(params))
        finals: dict[int, RequestOutput] = {}
        try:
            async for i, out in iterate(streams):
                choices = []
                for c in out.outputs:
                    delta = tracker.delta(i * request.n + c.index, c)
                    if delta is None:
                        continue
                    has_tokens = request.logprobs is not None and delta.token_end > delta.token_start
                    if delta.text or has_tokens or delta.finish_reason or (request.echo and delta.token_start == 0):
                        index = i * request.n + c.index
                        choices.append(self._choice(index, out, c, request, delta.text, delta.token_start))
                if choices:
                    yield CompletionResponse(id=request_id, created=created, model=model, choices=choices)  # usage: null
                if out.finished:
                    finals[i] = out
            if request.stream_options is not None and request.stream_options.include_usage:
                total = usage([finals[i] for i in sorted(finals)])
                yield CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=total)
        finally:
            close_all(streams)


def _prompt_list(prompt) -> list[PromptInput]:
    """The request's prompts: one string, strings, one token-id list, or token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise invalid_request("prompt must not be empty", "prompt")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)

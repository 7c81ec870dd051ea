"""``POST /v1/chat/completions``: messages through the chat template, logprobs, streaming."""

from __future__ import annotations

from typing import AsyncIterator, Optional

from fastapi import Response
from fastapi.responses import JSONResponse

from framework.engine.async_engine import RequestStream
from framework.entrypoints.openai.chat_template import render_chat
from framework.entrypoints.openai.errors import invalid_request, unsupported
from framework.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprob,
    ChatStreamChoice,
    SamplingFields,
    TopLogprob,
)
from framework.entrypoints.openai.sampling import build_sampling_params
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
from framework.outputs import CompletionOutput, Logprob, RequestOutput
from framework.sampling_params import SamplingParams


class OpenAIServingChat(OpenAIServing):
    async def create(self, request: ChatCompletionRequest) -> Response:
        model = self.check_model(request.model)
        params = self._sampling_params(request)
        text = render_chat(self.tokenizer, request.messages, self.chat_template, request.add_generation_prompt)
        # The template holds the BOS text: encode without adding special tokens again (as LLM.chat).
        prompt = self.tokenizer.encode(text, add_special_tokens=False)
        streams = await self.submit([prompt], params, prompt_param="messages")
        request_id, created = new_id("chatcmpl"), now()
        if request.stream:
            return sse_response(self._stream(streams, request, params, request_id, created, model))
        (final,) = await self.final_outputs(streams)
        choices = [
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=self._logprobs(c, 0, request.top_logprobs or 0) if request.logprobs else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in final.outputs
        ]
        response = ChatCompletionResponse(
            id=request_id, created=created, model=model, choices=choices, usage=usage([final])
        )
        return JSONResponse(response.model_dump())

    def _sampling_params(self, request: ChatCompletionRequest) -> SamplingParams:
        if request.tools:
            raise unsupported("tools")
        if request.tool_choice not in (None, "none", "auto"):
            raise unsupported("tool_choice")
        if request.response_format and request.response_format.get("type", "text") != "text":
            raise unsupported("response_format", "only {'type': 'text'}")
        if request.stream_options is not None and not request.stream:
            raise invalid_request("stream_options is only allowed with stream=true", "stream_options")
        if request.stream and request.use_beam_search:
            raise invalid_request("beam search cannot be streamed: beams change until the end", "use_beam_search")
        if request.top_logprobs is not None and not request.logprobs:
            raise invalid_request("top_logprobs requires logprobs=true", "top_logprobs")
        values = {name: getattr(request, name) for name in SamplingFields.model_fields}
        use_completion_tokens = request.max_completion_tokens is not None
        values["max_tokens"] = request.max_completion_tokens if use_completion_tokens else request.max_tokens
        values["logprobs"] = (request.top_logprobs or 0) if request.logprobs else None
        rename = {"logprobs": "top_logprobs", "max_tokens": "max_completion_tokens" if use_completion_tokens else "max_tokens"}
        return build_sampling_params(values, rename)

    def _logprobs(self, c: CompletionOutput, start: int, num_top: int) -> ChatChoiceLogprobs:
        """OpenAI's chat logprobs of ``c.token_ids[start:]``, each with its ``num_top`` best tokens."""
        content = []
        for token_id, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
            ranked = [(lp.rank, t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= num_top]
            top = [self._token(t, lp) for _, t, lp in sorted(ranked, key=lambda item: item[0])][:num_top]
            content.append(ChatLogprob(**self._token(token_id, entry.get(token_id)).model_dump(), top_logprobs=top))
        return ChatChoiceLogprobs(content=content)

    def _token(self, token_id: int, lp: Optional[Logprob]) -> TopLogprob:
        token = lp.decoded_token if lp and lp.decoded_token is not None else self.tokenizer.decode([token_id])
        return TopLogprob(token=token, logprob=finite(lp.logprob) if lp else -9999.0, bytes=list(token.encode()))

    async def _stream(
        self,
        streams: list[RequestStream],
        request: ChatCompletionRequest,
        params: SamplingParams,
        request_id: str,
        created: int,
        model: str,
    ) -> AsyncIterator[ChatCompletionChunk]:
        def chunk(choices: list[ChatStreamChoice], **extra) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, **extra)

        tracker = DeltaTracker(holdback=stop_holdback(params))
        final: Optional[RequestOutput] = None
        try:
            # The first delta of each choice names the role, as OpenAI's does.
            yield chunk([ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(request.n)])
            async for _, out in iterate(streams):
                choices = []
                for c in out.outputs:
                    delta = tracker.delta(c.index, c)
                    if delta is None:
                        continue
                    has_tokens = request.logprobs and delta.token_end > delta.token_start
                    if not (delta.text or has_tokens or delta.finish_reason):
                        continue
                    logprobs = self._logprobs(c, delta.token_start, request.top_logprobs or 0) if request.logprobs else None
                    choices.append(
                        ChatStreamChoice(
                            index=c.index, delta=ChatDelta(content=delta.text), logprobs=logprobs,
                            finish_reason=delta.finish_reason, stop_reason=delta.stop_reason,
                        )  # fmt: skip
                    )
                if choices:
                    yield chunk(choices)
                if out.finished:
                    final = out
            if request.stream_options is not None and request.stream_options.include_usage and final is not None:
                yield chunk([], usage=usage([final]))
        finally:
            close_all(streams)


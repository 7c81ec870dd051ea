"""``POST /generate``: the simple API of vLLM's old api_server.

``{"prompt": ..., "stream": false, <SamplingParams fields>}`` answers
``{"text": [prompt + completion, ...]}`` (one entry per output). With
``stream: true`` the body is a sequence of such objects, each followed by a
NUL byte, each holding the texts so far.
"""

from __future__ import annotations

import json
from typing import AsyncIterator

from fastapi import Response
from fastapi.responses import JSONResponse

from framework.engine.async_engine import RequestStream
from framework.entrypoints.openai.protocol import GenerateRequest, GenerateResponse
from framework.entrypoints.openai.sampling import build_sampling_params
from framework.entrypoints.openai.serving_engine import (
    OpenAIServing,
    close_all,
    iterate,
)
from framework.entrypoints.openai.streaming import (
    ClosingStreamingResponse,
    stream_error,
)
from framework.outputs import RequestOutput

_NOT_SAMPLING = {"prompt", "stream"}


class ServingGenerate(OpenAIServing):
    async def create(self, request: GenerateRequest) -> Response:
        # Declared fields and extra keys alike: any SamplingParams field; unknown keys are a 400.
        values = request.model_dump(exclude=_NOT_SAMPLING)
        params = build_sampling_params(values)
        prompt = list(request.prompt) if isinstance(request.prompt, list) else request.prompt
        streams = await self.submit([prompt], params)
        if request.stream:
            return ClosingStreamingResponse(self._stream(streams))
        (final,) = await self.final_outputs(streams)
        return JSONResponse(GenerateResponse(text=self._texts(final)).model_dump())

    def _texts(self, out: RequestOutput) -> list[str]:
        prompt = self.prompt_text(out)
        return [prompt + c.text for c in out.outputs]

    async def _stream(self, streams: list[RequestStream]) -> AsyncIterator[bytes]:
        try:
            async for _, out in iterate(streams):
                yield (json.dumps({"text": self._texts(out)}) + "\0").encode()
        except Exception as exc:  # reported in-band
            yield (json.dumps(stream_error(exc).body()) + "\0").encode()
        finally:
            close_all(streams)

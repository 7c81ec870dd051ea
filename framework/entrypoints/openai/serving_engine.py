"""What every endpoint shares: model names, submitting prompts, reading results.

A request with several prompts becomes one engine request per prompt; the
whole HTTP request is admitted or refused at once (queue bound, invalid
prompt), so it never half-runs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Sequence

from framework.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineStepError,
    QueueFullError,
    RequestStream,
)
from framework.engine.llm_engine import PromptInput
from framework.entrypoints.openai.errors import APIError, from_value_error
from framework.entrypoints.openai.protocol import UsageInfo
from framework.outputs import RequestOutput
from framework.sampling_params import SamplingParams

RETRY_AFTER_SECONDS = 1
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; OpenAI clients expect a number


@dataclass
class ServedModel:
    names: list[str]  # the first is the one responses name by default
    root: str  # the model directory
    max_model_len: int
    vocab_size: int


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, tokenizer: Any, model: ServedModel, chat_template: Optional[str] = None):
        self.engine = engine
        self.tokenizer = tokenizer  # the server's own instance: the engine thread has another
        self.model = model
        self.chat_template = chat_template

    # -- request checks -----------------------------------------------------------

    def check_model(self, name: Optional[str]) -> str:
        """The model name to answer with; 404 for a name this server does not serve."""
        if name is None or name == "":
            return self.model.names[0]
        if name not in self.model.names:
            raise APIError(
                404, f"The model `{name}` does not exist. Served: {', '.join(self.model.names)}",
                param="model", code="model_not_found",
            )  # fmt: skip
        return name

    # -- running requests -----------------------------------------------------------

    async def submit(
        self, prompts: Sequence[PromptInput], params: SamplingParams, prompt_param: str = "prompt"
    ) -> list[RequestStream]:
        """Add every prompt (all or none) and wait until the engine accepted them."""
        num_seqs = max(getattr(params, "n", 1) or 1, getattr(params, "best_of", None) or 1)
        base = uuid.uuid4().hex
        streams: list[RequestStream] = []
        admitted = False
        try:
            self.engine.check_capacity(num_seqs * len(prompts))
            arrival = time.monotonic()
            for i, prompt in enumerate(prompts):
                streams.append(self.engine.add_request(prompt, params, f"{base}-{i}", arrival, num_seqs))
            for stream in streams:
                await stream.admitted()
            admitted = True
            return streams
        except QueueFullError as exc:
            raise APIError(
                503, str(exc), code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
            ) from exc
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_unavailable") from exc
        except (ValueError, TypeError) as exc:
            raise from_value_error(exc, default_param=prompt_param) from exc
        finally:
            if not admitted:  # invalid, refused or cancelled: none of them runs
                close_all(streams)

    async def final_outputs(self, streams: list[RequestStream]) -> list[RequestOutput]:
        """Wait for every request to finish; their last outputs, in order."""
        finals: list[Optional[RequestOutput]] = [None] * len(streams)
        try:
            async for i, out in iterate(streams):
                finals[i] = out
        except (EngineStepError, EngineDeadError) as exc:
            raise APIError(500, str(exc), code="engine_error") from exc
        finally:
            close_all(streams)
        return [out for out in finals if out is not None]

    # -- helpers ---------------------------------------------------------------------

    def prompt_text(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        return self.tokenizer.decode(output.prompt_token_ids)


def close_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()


async def iterate(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from every stream as they come; errors propagate."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out, None))
        except Exception as exc:  # handed to the reader
            queue.put_nowait((i, None, exc))
        queue.put_nowait((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, out, exc = await queue.get()
            if exc is not None:
                raise exc
            if out is None:
                remaining -= 1
            else:
                yield i, out
    finally:
        for task in tasks:
            task.cancel()


def usage(outputs: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def stop_holdback(params: SamplingParams) -> int:
    """Characters a stream holds back: a stop string may still cut them off."""
    stops = getattr(params, "stop_strings", None) or []
    return max((len(s) for s in stops), default=1) - 1


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())

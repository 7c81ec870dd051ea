"""The OpenAI-compatible HTTP server (FastAPI + uvicorn): app, routes, auth, lifecycle.

``framework serve MODEL`` builds the engine, then ``run_server`` serves
until SIGTERM/SIGINT: uvicorn stops accepting connections, in-flight
requests run up to ``shutdown_timeout`` seconds, the rest are cancelled
(which aborts their engine requests), and the engine thread stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from typing import Optional

from fastapi import APIRouter, FastAPI, Request, Response

import framework
from framework.engine.async_engine import AsyncLLMEngine, EngineDeadError
from framework.engine.llm_engine import LLMEngine
from framework.entrypoints.openai.chat_template import load_chat_template
from framework.entrypoints.openai.cli_args import ServerConfig
from framework.entrypoints.openai.errors import APIError, install_error_handlers
from framework.entrypoints.openai.metrics import ServerMetrics
from framework.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from framework.entrypoints.openai.serving_chat import OpenAIServingChat
from framework.entrypoints.openai.serving_completion import OpenAIServingCompletion
from framework.entrypoints.openai.serving_engine import ServedModel
from framework.entrypoints.openai.serving_generate import ServingGenerate
from framework.entrypoints.openai.serving_tokenization import ServingTokenization
from framework.entrypoints.openai.streaming import until_disconnect
from framework.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/version", "/metrics"})
DEMO_MODEL_NAME = "demo-model"
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 500, 503)}

router = APIRouter()


@router.get("/health", responses=_ERRORS)
async def health(request: Request) -> Response:
    engine: AsyncLLMEngine = request.app.state.engine
    if not engine.is_running:
        raise APIError(503, f"the engine is not running: {engine.dead or 'stopped'}", code="engine_unavailable")
    return Response(status_code=200)


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=framework.__version__)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request) -> ModelList:
    model: ServedModel = request.app.state.model
    cards = [ModelCard(id=name, root=model.root, max_model_len=model.max_model_len) for name in model.names]
    return ModelList(data=cards)


@router.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    return await until_disconnect(request, request.app.state.completion.create(body))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    return await until_disconnect(request, request.app.state.chat.create(body))


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
async def generate(body: GenerateRequest, request: Request) -> Response:
    return await until_disconnect(request, request.app.state.generate.create(body))


@router.post("/reset_prefix_cache", responses=_ERRORS)
async def reset_prefix_cache(request: Request) -> Response:
    """Forget every cached prompt prefix (an admin call, behind the API key); 200 when done."""
    engine: AsyncLLMEngine = request.app.state.engine
    try:
        await engine.reset_prefix_cache()
    except EngineDeadError as exc:
        raise APIError(503, str(exc), code="engine_unavailable") from exc
    return Response(status_code=200)


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    return request.app.state.tokenization.tokenize(body)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return request.app.state.tokenization.detokenize(body)


class APIKeyMiddleware:
    """401 unless ``Authorization: Bearer <key>``; /health, /version and /metrics stay open."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS and not self._authorized(scope):
            error = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest: the time taken does not depend on where the keys differ.
        return hmac.compare_digest(token.strip(), self._key) and scheme.lower() == b"bearer"


class JSONBodyMiddleware:
    """``/generate`` reads its body as JSON whatever the Content-Type, as vLLM's simple API does:
    ``curl URL/generate -d '{...}'`` (what the tutorials type) sends
    ``application/x-www-form-urlencoded``. A missing or form Content-Type on ``POST /generate``
    is taken as ``application/json``; the OpenAI routes keep requiring JSON."""

    PATHS = frozenset({"/generate"})
    _AS_JSON = (b"", b"application/x-www-form-urlencoded")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.PATHS:
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            content_type = dict(scope["headers"]).get(b"content-type", b"")
            if content_type.split(b";")[0].strip().lower() in self._AS_JSON:
                scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


def build_app(llm_engine: LLMEngine, server: ServerConfig) -> FastAPI:
    """The ASGI app around one engine; the engine thread runs while the app's lifespan does."""
    mc = llm_engine.model_config
    names = server.served_model_name or [llm_engine.config.model or DEMO_MODEL_NAME]
    model = ServedModel(names=list(names), root=str(mc.path), max_model_len=mc.max_model_len, vocab_size=mc.vocab_size)
    metrics = ServerMetrics(model.names[0], stats=llm_engine.stats)
    engine = AsyncLLMEngine(llm_engine, server.max_queued_requests, observers=[metrics])
    tokenizer = load_tokenizer(llm_engine.config.tokenizer or mc.path)  # the engine thread keeps its own
    chat_template = load_chat_template(server.chat_template)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        stats: Optional[asyncio.Task] = None
        if server.log_stats_interval > 0:
            stats = asyncio.create_task(metrics.log_periodically(server.log_stats_interval))
        try:
            yield
        finally:
            if stats is not None:
                stats.cancel()
            await engine.shutdown()

    app = FastAPI(title="framework OpenAI-compatible server", version=framework.__version__, lifespan=lifespan)
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(JSONBodyMiddleware)
    if server.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=server.api_key)
    state = app.state
    state.engine, state.metrics, state.model = engine, metrics, model
    state.completion = OpenAIServingCompletion(engine, tokenizer, model, chat_template)
    state.chat = OpenAIServingChat(engine, tokenizer, model, chat_template)
    state.generate = ServingGenerate(engine, tokenizer, model, chat_template)
    state.tokenization = ServingTokenization(engine, tokenizer, model, chat_template)
    return app


def run_server(llm_engine: LLMEngine, server: ServerConfig) -> None:
    """Serve until SIGTERM/SIGINT (graceful: see the module docstring)."""
    import uvicorn

    app = build_app(llm_engine, server)
    logger.info(
        "serving %s on http://%s:%d (auth: %s)", ", ".join(app.state.model.names), server.host, server.port,
        "API key" if server.api_key else "none",
    )  # fmt: skip
    config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_level="info",
        timeout_graceful_shutdown=server.shutdown_timeout,
        timeout_keep_alive=5,
    )
    uvicorn.Server(config).run()

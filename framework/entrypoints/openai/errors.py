"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server returns goes through here: invalid requests are
400 (FastAPI's 422 is turned into 400 naming the parameter), an unknown
model 404, a bad API key 401, a full queue 503 with Retry-After.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}


class APIError(Exception):
    """An error response; raise it anywhere in a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: Optional[str] = None,
        code: Optional[str] = None,
        type: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_event(self) -> str:
        """The error as a server-sent event (a stream that fails midway)."""
        return f"data: {json.dumps(self.body())}\n\n"


def invalid_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, detail: str = "") -> APIError:
    message = f"parameter {param!r} is not supported yet by this engine"
    return APIError(400, message + (f": {detail}" if detail else ""), param=param, code="unsupported_parameter")


_PARAM_IN_MESSAGE = re.compile(r"SamplingParams\.(\w+)")


def from_value_error(exc: Exception, default_param: Optional[str] = None, rename: Optional[dict] = None) -> APIError:
    """A 400 for an engine ``ValueError``; the parameter is read from "SamplingParams.<name>"."""
    message = str(exc)
    match = _PARAM_IN_MESSAGE.search(message)
    param = match.group(1) if match else default_param
    param = (rename or {}).get(param, param)
    code = "context_length_exceeded" if "max_model_len" in message else "invalid_value"
    return APIError(400, message, param=param, code=code)


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    content_type = request.headers.get("content-type", "")
    if first.get("type") == "json_invalid":
        message, param = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "), None
    elif not loc and "json" not in content_type:
        message, param = f"send a JSON object with Content-Type: application/json (got {content_type!r})", None
    else:
        param = loc[0] if loc else None
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors[:5])
        message = f"invalid request: {details}"
    return APIError(400, message, param=param, code="invalid_value").response()


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    error = APIError(exc.status_code, str(exc.detail), code=None, headers=getattr(exc, "headers", None))
    return error.response()


def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return APIError(500, f"internal server error: {type(exc).__name__}: {exc}").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(Exception, _unexpected)

"""Error answers: `ApiError` and the handlers that turn every exception into
JSON `{"error": {"code": ..., "message": ...}}`, with the code and status from
service/error_codes.py.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from center_embed.service.error_codes import ErrorCode
from center_embed.service.middleware import loggable_path

log = logging.getLogger("center_embed.service")

# The code of an error the framework raises itself (no route, wrong method, ...), by status.
FRAMEWORK_CODES = {
    code.status: code
    for code in (
        ErrorCode.BAD_REQUEST,
        ErrorCode.UNAUTHORIZED,
        ErrorCode.NOT_FOUND,
        ErrorCode.METHOD_NOT_ALLOWED,
        ErrorCode.PAYLOAD_TOO_LARGE,
        ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        ErrorCode.VALIDATION_ERROR,
        ErrorCode.QUEUE_FULL,
        ErrorCode.INTERNAL,
        ErrorCode.NOT_READY,
        ErrorCode.TIMEOUT,
    )
}
UNLISTED_CODE = "error"  # a framework status outside the table (none is raised today)


class ApiError(Exception):
    """An error answer: a code from the table (which fixes the status) and a sentence for
    people."""

    def __init__(
        self, code: ErrorCode, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.headers = code, message, headers

    @property
    def status(self) -> int:
        return self.code.status


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": str(code), "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(errors: list[dict]) -> str:
    """Pydantic errors as one line: `query.top_k: Input should be greater than 0; ...`.

    The offending input is never echoed (it may be megabytes of base64)."""
    parts = []
    for error in errors[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", ""))
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    return "; ".join(parts) or "invalid request"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        code = ErrorCode.VALIDATION_ERROR
        return error_response(code.status, code, validation_message(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = FRAMEWORK_CODES.get(exc.status_code, UNLISTED_CODE)
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, loggable_path(request.url.path))
        return error_response(
            ErrorCode.INTERNAL.status, ErrorCode.INTERNAL, "internal server error"
        )

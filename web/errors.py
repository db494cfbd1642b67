"""Client mistakes that surface as exceptions deep in a handler (a body that is not JSON, a
multipart header aiohttp cannot parse, a file name the file system refuses) answered 400 in
ComfyUI's error shape ({"error": {type, message, details, extra_info}, "node_errors": {}})
instead of a 500: the one place they are mapped. (Refusals a route makes on purpose keep the
plain-text bodies ComfyUI answers with.)"""

from __future__ import annotations

import errno
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from engine.paths import InvalidName, PathError
from web.jsonio import JsonBodyError, dumps, error_body, error_response

logger = logging.getLogger("loom.web.errors")

# errno values that mean "this name cannot exist here", whatever the request meant by it.
BAD_NAME_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EILSEQ})


def bad_request(kind: str, message: str, details: str) -> web.HTTPBadRequest:
    """A 400 to raise, with the structured error body."""
    return web.HTTPBadRequest(text=dumps(error_body(kind, message, details)),
                              content_type="application/json")


def invalid_name(exc: InvalidName) -> web.HTTPBadRequest:
    """The 400 for a name no folder can hold (too long, a NUL byte...)."""
    return bad_request("invalid_file_name", "The file name is not usable", str(exc))


def path_refusal(exc: PathError) -> web.HTTPException:
    """400 for a name no folder can hold, 403 for one that leaves its folder."""
    if isinstance(exc, InvalidName):
        return invalid_name(exc)
    return web.HTTPForbidden(text=str(exc))


def _client_error(request: web.Request, exc: Exception) -> web.Response | None:
    """The 400 reply for an exception the client caused; None for any other exception."""
    if isinstance(exc, JsonBodyError):
        return error_response(400, "invalid_json", "The request body is not acceptable JSON",
                              str(exc))
    if isinstance(exc, HttpProcessingError):  # multipart: a line too long, a NUL in a header
        return error_response(400, "invalid_request", "The request could not be parsed",
                              f"{exc.message.strip()}; send a well-formed multipart/form-data "
                              f"body with short header lines")
    if isinstance(exc, OSError) and exc.errno in BAD_NAME_ERRNOS:
        return error_response(400, "invalid_file_name", "The file name is not usable",
                              f"{exc.strerror}; use a shorter name of plain characters "
                              f"(at most 255 bytes per folder or file name)")
    return None


@web.middleware
async def client_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Map client-caused exceptions to 400s (logged at INFO); others propagate (500, logged by
    aiohttp)."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        reply = _client_error(request, exc)
        if reply is None:
            raise
        logger.info("%s %s refused: %s", request.method, request.path, exc)
        return reply

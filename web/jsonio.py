"""Strict JSON in and out of the server, the one reader and writer every route uses.

In: a body is refused (JsonBodyError, answered 400 in ComfyUI's error shape) when it is not
JSON, nests deeper than MAX_DEPTH, holds a non-finite number (NaN, Infinity, 1e999), a lone UTF-16
surrogate, or an integer longer than Python converts. Out: NaN and Infinity are written as null
(as JavaScript's JSON.stringify does), so every reply and stored row parses in a browser."""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

import numpy as np
from aiohttp import web

from engine.validation import error_entry

logger = logging.getLogger("loom.web.json")

# Real workflows nest about 10 levels (editor format with subgraphs and extra_pnginfo); 100 leaves
# room for custom nodes' widget data while every later step (validation, cache keys, storage)
# stays far from Python's recursion limit.
MAX_DEPTH = 100
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_STRUCTURE = bytes(set(range(256)) - set(b'"[]{}'))
_QUOTE = ord('"')
_BRACKET_STEP = np.zeros(256, dtype=np.int32)
_BRACKET_STEP[list(b"[{")] = 1
_BRACKET_STEP[list(b"]}")] = -1
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class JsonBodyError(ValueError):
    """A request body that is not acceptable JSON; the message says what and how to fix it."""


# -- reading -----------------------------------------------------------------------------------

def nesting_depth(raw: bytes) -> int:
    """How deeply the arrays and objects of JSON text `raw` nest (0 for a bare value): brackets
    counted outside strings, vectorised (escapes dropped, then every quote toggles "inside")."""
    if b"\\" in raw:
        raw = _ESCAPE.sub(b"", raw)
    structure = np.frombuffer(raw.translate(None, _NOT_STRUCTURE), dtype=np.uint8)
    outside = (np.cumsum(structure == _QUOTE) & 1) == 0
    return int(np.cumsum(_BRACKET_STEP[structure] * outside).max(initial=0))


def _refuse_constant(name: str) -> Any:
    raise JsonBodyError(f"the body holds {name}, which is not a JSON number; send finite "
                        f"numbers only (a missing value is null)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonBodyError(f"the number {text[:40]} is too large for a 64-bit float; send a "
                            f"finite number")
    return value


def parse(raw: bytes | str) -> Any:
    """The value of JSON text `raw`, strictly (see the module docstring); JsonBodyError if not."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH:  # else it cannot nest deeper
        depth = nesting_depth(data)
        if depth > MAX_DEPTH:
            raise JsonBodyError(f"the JSON nests {depth} levels deep; at most {MAX_DEPTH} are "
                                f"accepted: flatten the data")
    try:
        value = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except JsonBodyError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, >4300 digits
        raise JsonBodyError(f"the body is not JSON ({exc}); send a JSON document") from exc
    if _SURROGATE_ESCAPE.search(data):
        _refuse_lone_surrogates(value)
    return value


def _refuse_lone_surrogates(value: Any) -> None:
    """JsonBodyError if any string (or key) in `value` cannot be written as UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise JsonBodyError(f"the string {item[:40]!r} holds a lone UTF-16 surrogate "
                                    f"({exc.reason}); send valid Unicode text") from exc


async def read_json(request: web.Request, default: Any = None) -> Any:
    """The request's JSON body; `default` when the body is empty. JsonBodyError otherwise."""
    raw = await request.read()
    if not raw.strip():
        return default
    return parse(raw)


# -- writing -----------------------------------------------------------------------------------

def dumps(value: Any) -> str:
    """Strict JSON text of `value`: non-finite floats become null; a value JSON cannot express
    (say a tensor in a node's UI dict) is written as its repr, so one odd output never stops a
    prompt from being recorded or reported."""
    try:
        return _ENCODER.encode(value)
    except ValueError:  # a NaN or Infinity somewhere inside
        return _ENCODER.encode(finite(value))


def _unserialisable(value: Any) -> str:
    text = repr(value)
    logger.warning("%s is not JSON; sent and stored as its repr %.80s", type(value).__name__,
                   text)
    return text


# Configuration only, never changed; one instance spares building an encoder per message (a
# third of the cost of a small one, and a large graph's run sends thousands).
_ENCODER = json.JSONEncoder(allow_nan=False, default=_unserialisable)


def finite(value: Any) -> Any:
    """`value` with every NaN and Infinity (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def strict_text(stored: str) -> str:
    """Stored JSON text as strict JSON: rows written before non-finite numbers were refused may
    hold NaN or Infinity, which browsers cannot parse; those are rewritten with null."""
    if "NaN" not in stored and "Infinity" not in stored:  # str search: ~5x a regex
        return stored
    return dumps(json.loads(stored))


def json_response(data: Any, *, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    """A strict-JSON reply (what every route answers with)."""
    return web.json_response(data, status=status, headers=headers, dumps=dumps)


def error_body(kind: str, message: str, details: str = "",
               node_errors: dict[str, Any] | None = None) -> dict[str, Any]:
    """An error in ComfyUI's shape: {"error": {type, message, details, extra_info},
    "node_errors": {...}}."""
    return {"error": error_entry(kind, message, details), "node_errors": node_errors or {}}


def error_response(status: int, kind: str, message: str, details: str = "",
                   node_errors: dict[str, Any] | None = None) -> web.Response:
    return json_response(error_body(kind, message, details, node_errors), status=status)

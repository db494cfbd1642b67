"""Safe defaults: cross-site state-changing requests are refused unless --enable-cors-header
allows the origin, a server listening on a non-loopback address wants a token on every
HTTP and WebSocket request, and a server without a token answers only requests whose Host names
it (so a page whose host name re-resolves to 127.0.0.1, DNS rebinding, gets nothing)."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
import sys
from typing import Any

from aiohttp import web
from yarl import URL

logger = logging.getLogger("loom.web.security")

STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
TOKEN_COOKIE = "loom_token"
TOKEN_QUERY = "token"
CORS_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
CORS_ALLOWED_HEADERS = "Content-Type, Authorization"
# Names that always mean this machine: browsers resolve them (and *.localhost) to loopback
# themselves, so no other site can make them point elsewhere.
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost",
                            "ip6-loopback"})
ANY_HOST = "*"


def is_loopback(listen: str) -> bool:
    """True when every address in --listen (comma-separated) is a loopback address."""
    for host in (part.strip().strip("[]") for part in listen.split(",")):
        if host == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False  # a host name may resolve to anything: treat it as exposed
    return True


def resolve_auth_token(args: Any) -> str | None:
    """The token requests must carry: --auth-token, or for a non-loopback --listen without one
    a random token, printed once and stored back into `args` so later calls agree."""
    token = getattr(args, "auth_token", None)
    if token:
        return token
    listen = getattr(args, "listen", "127.0.0.1") or "127.0.0.1"
    if is_loopback(listen):
        return None
    token = secrets.token_urlsafe(24)
    args.auth_token = token
    print(f"Loom listens on {listen}: every request needs the token. Open the editor at "
          f"http://<host>:{getattr(args, 'port', 8188)}/?{TOKEN_QUERY}={token} or send "
          f"'Authorization: Bearer {token}'. Pass --auth-token to choose it.",
          file=sys.stderr, flush=True)
    return token


def _origin_endpoint(url: URL) -> tuple[str, int | None]:
    return (url.host or "").lower(), url.port


def is_cross_site(request: web.Request) -> bool:
    """Whether the browser says the request comes from another site than the one it targets."""
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        return False  # not sent by a browser on another site (script clients, same-origin GET)
    if origin == "null":
        return True  # sandboxed frames and file:// pages
    try:
        host = URL(f"{request.scheme}://{request.host}")
        return _origin_endpoint(URL(origin)) != _origin_endpoint(host)
    except ValueError:
        return True


def _changes_state(request: web.Request) -> bool:
    upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
    return request.method in STATE_CHANGING_METHODS or upgrade


def host_name(host: str) -> str:
    """The name part of a Host header value, lower case: 'A.b:8188' -> 'a.b', '[::1]:80' ->
    '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() else host


def allowed_host_names(args: Any) -> frozenset[str]:
    """The --listen addresses and the --allowed-hosts names (each comma-separated)."""
    listen = getattr(args, "listen", None) or "127.0.0.1"
    given = [listen, *(getattr(args, "allowed_hosts", None) or [])]
    return frozenset(host_name(part) for value in given for part in value.split(",")
                     if part.strip())


def names_this_server(name: str, allowed: frozenset[str]) -> bool:
    """Whether Host name `name` is a loopback name or address, or one of `allowed`."""
    if ANY_HOST in allowed or name in allowed or name in LOOPBACK_NAMES:
        return True
    if name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_middleware(allowed: frozenset[str]) -> Any:
    """403 for a request whose Host header names another server (only used without a token:
    a token already keeps other sites' pages out)."""

    @web.middleware
    async def check_host(request: web.Request, handler: Any) -> web.StreamResponse:
        host = request.headers.get("Host")
        if host is None or names_this_server(host_name(host), allowed):
            return await handler(request)  # no Host: not a browser (HTTP/1.0 scripts)
        logger.warning("refused %s %s for Host %r (not a name of this server)", request.method,
                       request.path, host)
        return web.Response(status=403, text=(
            f"403 Forbidden: Host {host!r} does not name this server (a page on another site "
            f"may be using DNS rebinding). If you reach Loom under that name, start it with "
            f"--allowed-hosts {host_name(host)}"))

    return check_host


def _cors_allows(allowed: str | None, origin: str | None) -> bool:
    if allowed is None:
        return False
    return allowed == "*" or (origin is not None and origin.rstrip("/") == allowed.rstrip("/"))


def _cors_headers(allowed: str, origin: str | None) -> dict[str, str]:
    headers = {"Access-Control-Allow-Methods": CORS_METHODS,
               "Access-Control-Allow-Headers": CORS_ALLOWED_HEADERS,
               "Access-Control-Max-Age": "86400"}
    if allowed == "*":
        headers["Access-Control-Allow-Origin"] = "*"
    else:
        headers["Access-Control-Allow-Origin"] = origin or allowed
        headers["Access-Control-Allow-Credentials"] = "true"
        headers["Vary"] = "Origin"
    return headers


def origin_middleware(allowed: str | None) -> Any:
    """Refuse cross-site state changes (403) unless `allowed` (--enable-cors-header) covers the
    origin; for allowed origins add the CORS headers and answer preflight requests."""

    @web.middleware
    async def guard_origin(request: web.Request, handler: Any) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        cors = _cors_allows(allowed, origin)
        if cors and request.method == "OPTIONS":
            return web.Response(headers=_cors_headers(allowed or "*", origin))
        if not cors and _changes_state(request) and is_cross_site(request):
            logger.warning("refused cross-site %s %s from origin %s", request.method,
                           request.path, origin)
            return web.Response(status=403, text=(
                f"403 Forbidden: cross-site {request.method} from {origin or 'another site'} "
                f"refused; start Loom with --enable-cors-header ORIGIN to allow that origin"))
        if not cors:
            return await handler(request)
        headers = _cors_headers(allowed or "*", origin)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(headers)
            raise
        if not response.prepared:
            response.headers.update(headers)
        return response

    return guard_origin


def _supplied_token(request: web.Request) -> tuple[str | None, bool]:
    """(token, came from the query string) from the header, the query or the cookie."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip(), False
    if TOKEN_QUERY in request.query:
        return request.query[TOKEN_QUERY], True
    return request.cookies.get(TOKEN_COOKIE), False


def auth_middleware(token: str | None) -> Any:
    """With a token: 401 for requests without it; a valid `?token=` sets a cookie so the
    editor's later fetches and its WebSocket are let in."""

    @web.middleware
    async def require_token(request: web.Request, handler: Any) -> web.StreamResponse:
        if token is None:
            return await handler(request)
        supplied, from_query = _supplied_token(request)
        if supplied is None or not hmac.compare_digest(supplied.encode(), token.encode()):
            return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"}, text=(
                "401 Unauthorized: this Loom server listens on a non-loopback address; send "
                "'Authorization: Bearer <token>' or open the editor once with ?token=<token> "
                "(the token is printed at start-up, or set with --auth-token)"))
        response = await handler(request)
        if from_query and not response.prepared:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", path="/")
        return response

    return require_token


def middlewares(server: Any) -> list[Any]:
    """The security middlewares, outermost first (CORS preflight is answered before auth)."""
    args = server.args
    token = resolve_auth_token(args)
    guards = [origin_middleware(getattr(args, "enable_cors_header", None)),
              auth_middleware(token)]
    return guards if token else [host_middleware(allowed_host_names(args)), *guards]

"""Route registration: every API route exists bare (/prompt) and under /api (/api/prompt),
as ComfyUI serves them; /internal/... routes exist bare only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiRoutes:
    """Collects handlers; `install` adds each under both prefixes."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, str, Handler, bool]] = []

    def route(self, method: str, path: str, *, api_twin: bool = True,
              ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self._routes.append((method, path, handler, api_twin))
            return handler
        return register

    def get(self, path: str, **kw: bool) -> Callable[[Handler], Handler]:
        return self.route("GET", path, **kw)

    def post(self, path: str, **kw: bool) -> Callable[[Handler], Handler]:
        return self.route("POST", path, **kw)

    def delete(self, path: str, **kw: bool) -> Callable[[Handler], Handler]:
        return self.route("DELETE", path, **kw)

    def install(self, router: web.UrlDispatcher) -> None:
        for method, path, handler, api_twin in self._routes:
            router.add_route(method, path, handler)
            if api_twin:
                router.add_route(method, "/api" + path, handler)

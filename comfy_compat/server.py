"""ComfyUI's `server` module for custom-node packs: `PromptServer.instance` and
`BinaryEventTypes`, implemented with Loom's web objects in web/comfy_server.py."""

from aiohttp import web

from web.comfy_server import BinaryEventTypes
from web.comfy_server import PackPromptServer as PromptServer

__all__ = ["BinaryEventTypes", "PromptServer", "web"]

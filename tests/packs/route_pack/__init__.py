"""A pack with HTTP routes, a WebSocket message sent while it runs, and web extensions."""

from aiohttp import web
from server import PromptServer

WEB_DIRECTORY = "./js"


@PromptServer.instance.routes.get("/route_pack/hello")
async def hello(request):
    return web.json_response({"hello": "from route_pack"})


class Ping:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "ping"})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "tests"

    def run(self, text):
        server = PromptServer.instance
        server.send_sync("route_pack.ping", {"text": text, "node": server.last_node_id,
                                             "client": server.client_id}, server.client_id)
        return {}


NODE_CLASS_MAPPINGS = {"RoutePackPing": Ping}

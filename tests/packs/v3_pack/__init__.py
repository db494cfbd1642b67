"""A V3 pack: nodes declared with comfy_api.latest and discovered through comfy_entrypoint."""

from comfy_api.latest import ComfyExtension, io, ui
from comfy_execution.graph_utils import GraphBuilder


class ScaleImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="V3ScaleImage", display_name="Scale Image (V3)", category="tests",
            inputs=[io.Image.Input("image"),
                    io.Float.Input("factor", default=0.5, min=0.0, max=1.0, step=0.1),
                    io.Combo.Input("mode", options=["multiply", "invert"])],
            outputs=[io.Image.Output(display_name="scaled")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, image, factor, mode):
        out = image * factor if mode == "multiply" else 1.0 - image
        return io.NodeOutput(out, ui=ui.PreviewText(f"ran as node {cls.hidden.unique_id}"))


class AddOne(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3AddOne", category="tests",
                         inputs=[io.Int.Input("value", default=1, min=0, max=10)],
                         outputs=[io.Int.Output()])

    @classmethod
    def execute(cls, value):
        return io.NodeOutput(value + 1)


class AddOneTwice(io.ComfyNode):
    """Expands into two V3AddOne nodes; its output is the second one's."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3AddOneTwice", category="tests",
                         inputs=[io.Int.Input("value", default=1, min=0, max=10)],
                         outputs=[io.Int.Output()])

    @classmethod
    def execute(cls, value):
        graph = GraphBuilder()
        first = graph.node("V3AddOne", value=value)
        second = graph.node("V3AddOne", value=first.out(0))
        return io.NodeOutput(second.out(0), expand=graph.finalize())


class TestExtension(ComfyExtension):
    async def get_node_list(self):
        return [ScaleImage, AddOne, AddOneTwice]


async def comfy_entrypoint():
    return TestExtension()

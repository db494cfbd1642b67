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


class Arithmetic(io.ComfyNode):
    """A DynamicCombo: the chosen operation brings its own inputs; execute gets one dict."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3Arithmetic", category="tests", inputs=[
            io.Int.Input("value", default=1),
            io.DynamicCombo.Input("operation", options=[
                io.DynamicCombo.Option("add", [io.Int.Input("amount", default=1)]),
                io.DynamicCombo.Option("scale", [io.Int.Input("factor", default=2, min=1,
                                                              max=4),
                                                 io.Int.Input("offset", default=0)]),
            ])], outputs=[io.Int.Output()])

    @classmethod
    def execute(cls, value, operation):
        if operation["operation"] == "add":
            return io.NodeOutput(value + operation["amount"])
        return io.NodeOutput(value * operation["factor"] + operation["offset"])


class SumAll(io.ComfyNode):
    """An Autogrow of INT sockets named term0, term1 ...; execute gets {name: value}."""

    @classmethod
    def define_schema(cls):
        template = io.Autogrow.TemplatePrefix(io.Int.Input("term"), prefix="term", min=1, max=4)
        return io.Schema(node_id="V3SumAll", category="tests",
                         inputs=[io.Autogrow.Input("terms", template=template)],
                         outputs=[io.Int.Output(), io.String.Output()])

    @classmethod
    def execute(cls, terms):
        return io.NodeOutput(sum(terms.values()), ",".join(terms))


class TestExtension(ComfyExtension):
    async def get_node_list(self):
        return [ScaleImage, AddOne, AddOneTwice, Arithmetic, SumAll]


async def comfy_entrypoint():
    return TestExtension()

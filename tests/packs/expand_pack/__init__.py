"""Classic nodes that expand into graphs of other nodes, the way loop and macro nodes of packs
(Easy-Use, Impact, Inspire, KJNodes) do: GraphBuilder, result links into the expansion,
DYNPROMPT, lazy inputs and ExecutionBlocker."""

from comfy_execution.graph import ExecutionBlocker
from comfy_execution.graph_utils import GraphBuilder, is_link


class Add:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"default": 0}), "b": ("INT", {"default": 0})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, a, b):
        return (a + b,)


class Fail:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"default": 0})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, x):
        raise ValueError(f"x is {x}; Fail always fails")


class ShowInt:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"forceInput": True})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "tests"

    def run(self, value):
        return {"ui": {"value": [value]}}


class AddTwice:
    """value + amount + amount, as two Add nodes of its expansion; its output links to the
    second."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0}), "amount": ("INT", {"default": 1})}}

    RETURN_TYPES = ("INT", "STRING")
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, value, amount):
        graph = GraphBuilder()
        first = graph.node("ExpandAdd", a=value, b=amount)
        second = graph.node("ExpandAdd", a=first.out(0), b=amount)
        return {"result": (second.out(0), graph.prefix), "expand": graph.finalize()}


class PlainExpand:
    """An expansion written as a plain API dict, its ids made unique with UNIQUE_ID."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("INT", "STRING")
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, value, unique_id):
        node_id = f"{unique_id}.plain"
        graph = {node_id: {"class_type": "ExpandAdd", "inputs": {"a": value, "b": 100}}}
        return {"result": ([node_id, 0], "literal"), "expand": graph}


class ExpandInto:
    """Expands into one node of class `inner_class` given `x=value`; its output is that node's."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"inner_class": ("STRING", {"default": "ExpandFail"}),
                             "value": ("INT", {"default": 3})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, inner_class, value):
        graph = GraphBuilder()
        inner = graph.node(inner_class, x=value)
        return {"result": (inner.out(0),), "expand": graph.finalize()}


class AddOneToLink:
    """Gets its input as the link itself (rawLink) and expands into an Add reading it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"rawLink": True, "forceInput": True})}}

    RETURN_TYPES = ("INT", "STRING")
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, value):
        graph = GraphBuilder()
        added = graph.node("ExpandAdd", a=value, b=1)
        return {"result": (added.out(0), repr(value)), "expand": graph.finalize()}


class HiddenEcho:
    """Returns a hidden input of its own kind, which only an expansion's literal can set
    (Easy-Use's forLoopStart gets its loop index that way)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "hidden": {"given": ("INT",), "unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, given=-1, unique_id=None):
        return (given,)


class ExpandEcho:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, value):
        graph = GraphBuilder()
        echo = graph.node("ExpandHiddenEcho", given=value)
        return {"result": (echo.out(0),), "expand": graph.finalize()}


class ShowRepr:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",)}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, value):
        return (repr(value),)


class ExpandPair:
    """Passes [first, second] (two ints, link-shaped) as a literal to a node it expands into."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"first": ("INT", {"default": 0}), "second": ("INT", {"default": 0})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, first, second):
        graph = GraphBuilder()
        shown = graph.node("ExpandShowRepr", value=[first, second])
        return {"result": (shown.out(0),), "expand": graph.finalize()}


class ExpandSelfLink:
    """Links its result to itself: an expansion that could never finish."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, unique_id):
        return {"result": ([unique_id, 0],), "expand": {}}


class LoopOpen:
    """Starts a loop: its id (the flow), the iterations left, the value, and the value again
    for the loop body, blocked once no iteration is left."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"remaining": ("INT", {"default": 3}),
                             "value": ("INT", {"default": 0})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("LOOP_FLOW", "INT", "INT", "INT")
    RETURN_NAMES = ("flow", "remaining", "value", "body_value")
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, remaining, value, unique_id):
        body = value if remaining > 0 else ExecutionBlocker(None)
        return (unique_id, remaining, value, body)


def loop_members(dynprompt, open_id, close_id):
    """The open node, the close node and every node downstream of the open one that is not
    downstream of the close one."""
    readers = {}
    for node_id in dynprompt.all_node_ids():
        for value in dynprompt.get_node(node_id)["inputs"].values():
            if is_link(value):
                readers.setdefault(value[0], []).append(node_id)
    members, stack = {open_id, close_id}, [open_id]
    while stack:
        for reader in readers.get(stack.pop(), ()):
            if reader not in members:
                members.add(reader)
                stack.append(reader)
    return members


class LoopClose:
    """Ends a loop: while iterations remain, expands into a copy of the loop whose open node
    starts from this iteration's value; else returns the value."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"flow": ("LOOP_FLOW",), "remaining": ("INT", {"forceInput": True}),
                             "value": ("INT", {"lazy": True, "forceInput": True}),
                             "done": ("INT", {"lazy": True, "forceInput": True})},
                "hidden": {"dynprompt": "DYNPROMPT", "unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def check_lazy_status(self, flow, remaining, value=None, done=None, **hidden):
        return ["value"] if remaining > 0 else ["done"]

    def run(self, flow, remaining, value=None, done=None, dynprompt=None, unique_id=None):
        if remaining <= 0:
            return (done,)
        members = loop_members(dynprompt, flow, unique_id)
        graph = GraphBuilder()

        def local(node_id):
            return "close" if node_id == unique_id else node_id

        for node_id in members:
            copy = graph.node(dynprompt.get_node(node_id)["class_type"], local(node_id))
            copy.set_override_display_id(node_id)
        for node_id in members:
            copy = graph.lookup_node(local(node_id))
            for name, linked in dynprompt.get_node(node_id)["inputs"].items():
                if is_link(linked) and linked[0] in members:
                    copy.set_input(name, graph.lookup_node(local(linked[0])).out(linked[1]))
                else:
                    copy.set_input(name, linked)
        opener = graph.lookup_node(flow)
        opener.set_input("remaining", remaining - 1)
        opener.set_input("value", value)
        return {"result": (graph.lookup_node("close").out(0),), "expand": graph.finalize()}


NODE_CLASS_MAPPINGS = {"ExpandAdd": Add, "ExpandFail": Fail, "ExpandShowInt": ShowInt,
                       "ExpandAddTwice": AddTwice, "ExpandPlain": PlainExpand,
                       "ExpandInto": ExpandInto,
                       "ExpandSelfLink": ExpandSelfLink, "ExpandAddOneToLink": AddOneToLink,
                       "ExpandHiddenEcho": HiddenEcho, "ExpandEcho": ExpandEcho,
                       "ExpandShowRepr": ShowRepr, "ExpandPair": ExpandPair,
                       "ExpandLoopOpen": LoopOpen, "ExpandLoopClose": LoopClose}

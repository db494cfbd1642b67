"""The one binding point between ComfyUI's module-level singletons and this process's objects.

ComfyUI's Python API, which custom-node packs import, is made of module globals: the folder
tables of `folder_paths`, `PromptServer.instance`, the device state of `comfy.model_management`.
Loom keeps those objects in main.py and passes them down, so the facades in `comfy_compat/` read
them from here: main.py calls `bind` once before packs load, the web layer attaches its
PromptServer facade when it serves, and the classic/V3 adapters mark which node is running.
Nothing else in Loom reads this module."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from engine.context import InterruptFlag, NodeContext, Services


class ValueBridge(Protocol):
    """Turns Loom values into the objects ComfyUI's nodes expect, and back."""

    def to_pack(self, value: Any) -> Any: ...

    def from_pack(self, value: Any) -> Any: ...


class ComfyHostError(RuntimeError):
    """A ComfyUI facade was used before Loom bound its objects (e.g. at import in a test)."""


@dataclass
class ComfyHost:
    """What the facades delegate to. `registry` and `prompt_server` are typed Any because the
    registry's node classes and the web layer's facade sit above the engine."""

    services: Services | None = None
    registry: Any = None
    prompt_server: Any = None
    interrupt: InterruptFlag | None = None
    # Converts MODEL/CLIP/VAE to ComfyUI's objects for pack nodes and back (comfy_compat).
    values: ValueBridge | None = None
    # comfy.utils.set_progress_bar_global_hook: a pack's own sink for every ProgressBar.
    progress_hook: Callable[..., Any] | None = None

    def require_services(self, what: str) -> Services:
        if self.services is None:
            raise ComfyHostError(f"{what} needs Loom's services, but none are bound; main.py "
                                 f"binds them (engine.comfy_host.bind) before custom nodes load")
        return self.services


HOST = ComfyHost()
"""The binding itself: the single place the facades read Loom's objects from."""

_RUNNING: contextvars.ContextVar[NodeContext | None] = contextvars.ContextVar(
    "loom_running_node", default=None)


@dataclass
class GraphPrefix:
    """Where `GraphBuilder()` starts the ids of the nodes a node expands into: ComfyUI's
    "<node id>.<call index>.<graph index>.", the graph index counting the builders made in
    one call, so ids are unique per parent node and deterministic."""

    root: str
    call_index: int = 0
    graph_index: int = 0

    def allocate(self, root: str | None = None, call_index: int | None = None,
                 graph_index: int | None = None) -> str:
        """The next prefix (a part given replaces the running node's)."""
        prefix = (f"{self.root if root is None else root}."
                  f"{self.call_index if call_index is None else call_index}."
                  f"{self.graph_index if graph_index is None else graph_index}.")
        self.graph_index += 1
        return prefix


_PREFIX: contextvars.ContextVar[GraphPrefix | None] = contextvars.ContextVar(
    "loom_graph_prefix", default=None)


def bind(services: Services, registry: Any, interrupt: InterruptFlag | None = None) -> ComfyHost:
    """Point ComfyUI's module-level API at this process's services and node registry."""
    HOST.services = services
    HOST.registry = registry
    HOST.interrupt = interrupt
    return HOST


def unbind() -> None:
    """Forget every bound object (tests; a process binds once and keeps its binding)."""
    HOST.services = HOST.registry = HOST.prompt_server = HOST.interrupt = None
    HOST.progress_hook = None


def bind_prompt_server(prompt_server: Any) -> None:
    """Attach the `server.PromptServer.instance` facade (created by the web layer)."""
    HOST.prompt_server = prompt_server


@contextlib.contextmanager
def running(ctx: NodeContext) -> Iterator[None]:
    """Mark `ctx` as the node being run, for ProgressBar, interrupt checks and classic calls,
    and start the ids of the graphs this call may expand into."""
    token = _RUNNING.set(ctx)
    prefix = _PREFIX.set(GraphPrefix(ctx.node_id, ctx.call_index) if ctx is not None
                         else GraphPrefix(""))  # (tests call adapters without a context)
    try:
        yield
    finally:
        _PREFIX.reset(prefix)
        _RUNNING.reset(token)


def graph_prefix() -> GraphPrefix:
    """The running call's GraphPrefix (outside a node call, one for this context whose root
    is empty, as ComfyUI's default)."""
    current = _PREFIX.get()
    if current is None:
        current = GraphPrefix("")
        _PREFIX.set(current)
    return current


def set_graph_prefix(prefix: GraphPrefix) -> None:
    """Replace the running call's GraphPrefix (GraphBuilder.set_default_prefix)."""
    _PREFIX.set(prefix)


def to_pack(value: Any) -> Any:
    """A node input as a ComfyUI-protocol node receives it (unchanged with no bridge)."""
    return value if HOST.values is None else HOST.values.to_pack(value)


def from_pack(value: Any) -> Any:
    """A ComfyUI-protocol node's output as Loom's nodes receive it."""
    return value if HOST.values is None else HOST.values.from_pack(value)


def running_node() -> NodeContext | None:
    """The context of the classic or V3 node running in this thread, if any."""
    return _RUNNING.get()


def node_context(class_type: str) -> NodeContext:
    """A context for calling a built-in node the classic way (`nodes.KSampler().sample(...)`):
    the running node's, so progress and interrupt reach its prompt, else a detached one."""
    current = running_node()
    services = HOST.require_services(f"calling node {class_type!r} directly")
    if current is not None:
        return NodeContext(node_id=current.node_id, class_type=class_type,
                           prompt_id=current.prompt_id, services=services,
                           interrupt=current.interrupt_flag,
                           progress_sink=current.progress_sink, text_sink=current.text_sink)
    return NodeContext(node_id="", class_type=class_type, prompt_id="", services=services,
                       interrupt=HOST.interrupt or InterruptFlag())

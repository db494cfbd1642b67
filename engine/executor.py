"""Runs a validated prompt: only the nodes the outputs need, in topological order, reusing every
cached result whose structural key is unchanged, and reporting each step to a listener."""

from __future__ import annotations

import hashlib
import time
import traceback
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

from engine.cache import CacheEntry, OutputCache
from engine.context import ExecutionInterrupted, InterruptFlag, NodeContext, Services
from engine.digest import content_digest, literal_items, small_scalars, stable_key
from engine.events import ExecutionListener, timestamp_ms
from engine.gc_scope import older_objects_frozen
from engine.graph import Prompt, PromptNode
from engine.node import ALWAYS_CHANGED, Node, NodeResult, NodeSchema
from engine.registry import NodeRegistry


class NodeExecutionError(Exception):
    """A node raised; carries what the execution_error message reports."""

    def __init__(self, node_id: str, class_type: str, exc: BaseException,
                 current_inputs: dict[str, list[Any]]) -> None:
        super().__init__(f"node {node_id} ({class_type}) failed: {type(exc).__name__}: {exc}")
        self.node_id = node_id
        self.class_type = class_type
        self.exc = exc
        self.traceback = traceback.format_exception(type(exc), exc, exc.__traceback__)
        self.current_inputs = current_inputs


@dataclass
class ExecutionResult:
    """How a prompt ended and what it produced."""

    prompt_id: str
    status: str  # "success" | "error" | "interrupted"
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    values: dict[str, list[list[Any]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "success"


class Executor:
    """Long-lived: owns the output cache and node instances across prompts."""

    def __init__(self, registry: NodeRegistry, services: Services,
                 cache: OutputCache | None = None, interrupt: InterruptFlag | None = None) -> None:
        self.registry = registry
        self.services = services
        self.cache = cache if cache is not None else OutputCache("classic")
        self.interrupt = interrupt if interrupt is not None else InterruptFlag()
        self._instances: dict[tuple[str, str], Node] = {}
        self._shared: dict[str, Node] = {}
        self._key_memo: dict[str, tuple[Any, ...]] = {}
        self._fingerprinted: dict[type[Node], bool] = {}
        self._last_run: _RunRecord | None = None

    def execute(self, prompt: Prompt, outputs: list[str], *, prompt_id: str | None = None,
                extra_data: dict[str, Any] | None = None,
                listener: ExecutionListener | None = None) -> ExecutionResult:
        """Run `outputs` of a validated prompt; never raises for a node's failure."""
        run = _PromptRun(self, prompt, outputs, prompt_id or str(uuid.uuid4()),
                         extra_data or {}, listener or ExecutionListener())
        with older_objects_frozen():
            return run.run()

    def instance(self, node_id: str, class_type: str) -> Node:
        """The object whose methods run a prompt node (shared per type when stateless)."""
        node = self._shared.get(class_type)
        if node is not None:
            return node
        key = (node_id, class_type)
        node = self._instances.get(key)
        if node is None:
            node_type = self.registry.get(class_type)
            node = node_type()
            if node_type.per_node_instance:
                self._instances[key] = node
            else:
                self._shared[class_type] = node
        return node

    def has_fingerprint(self, node_type: type[Node]) -> bool:
        """Whether the type overrides Node.fingerprint (memoised per type)."""
        known = self._fingerprinted.get(node_type)
        if known is None:
            known = self._fingerprinted[node_type] = node_type.fingerprint is not Node.fingerprint
        return known

    def forget_instances(self, keep: set[str]) -> None:
        for key in [k for k in self._instances if k[0] not in keep]:
            del self._instances[key]
        for node_id in [n for n in self._key_memo if n not in keep]:
            del self._key_memo[node_id]


def format_input_values(values: list[Any]) -> list[Any]:
    """Input values as execution_error's current_inputs shows them (short, JSON-safe)."""
    shown = []
    for value in values:
        if isinstance(value, (str, int, float, bool, type(None))):
            shown.append(value)
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            shown.append(f"<{type(value).__name__} shape={tuple(value.shape)} {value.dtype}>")
        else:
            text = repr(value)
            shown.append(text if len(text) <= 200 else text[:197] + "...")
    return shown


class _Facts:
    """What a run needs of one prompt node, looked up once per run."""

    __slots__ = ("class_type", "schema", "links", "lazy", "static", "fingerprinted", "simple",
                 "literal_kwargs", "link_kwargs")

    def __init__(self, node: PromptNode, node_type: type[Node], fingerprinted: bool) -> None:
        schema = node_type.schema
        self.class_type = node.class_type
        self.schema = schema
        self.links = tuple((name, src, slot) for name, (src, slot) in sorted(node.links.items()))
        self.lazy = schema.lazy_inputs
        # the key's part that only the node itself decides
        self.static = repr((node.class_type, schema.version, literal_items(node.literals)))
        self.fingerprinted = fingerprinted
        declared = schema.declares
        # Only declared inputs reach the node (editor files can carry extras, e.g. "upload").
        self.literal_kwargs = {name: value for name, value in node.literals.items()
                               if declared(name)}
        self.link_kwargs = tuple(link for link in self.links if declared(link[0]))
        self.simple = not (self.lazy or schema.input_is_list or schema.hidden_inputs)


@dataclass(frozen=True)
class _RunRecord:
    """A prompt that ended with every node resolved, no node fingerprinted, non-idempotent or
    lazy, and the cache entries it used (weakly: the cache decides what lives). The same prompt
    again is answered from those same entries without recomputing a key."""

    nodes: dict[str, PromptNode]
    outputs: tuple[str, ...]
    reachable: set[str]
    steps: tuple[tuple[str, str, weakref.ref[CacheEntry]], ...]  # (node, key, entry) in order


class _PromptRun:
    """The state of one prompt's execution."""

    def __init__(self, executor: Executor, prompt: Prompt, outputs: list[str], prompt_id: str,
                 extra_data: dict[str, Any], listener: ExecutionListener) -> None:
        self.ex = executor
        self.prompt = prompt
        self.outputs = outputs
        self.prompt_id = prompt_id
        self.extra_data = extra_data
        self.listener = listener
        self.resolved: dict[str, CacheEntry] = {}
        self.used_keys: set[str] = set()
        self.structural: dict[str, str] = {}
        self.result = ExecutionResult(prompt_id, "success")
        self.nonce = uuid.uuid4().hex
        self.rank: dict[str, int] = {}
        self.keys: dict[str, str] = {}
        self._facts: dict[str, _Facts] = {}
        self.replayable = True  # see _RunRecord
        # A listener that ignores events needs none built (saves time on huge graphs).
        self.silent = (type(listener).event is ExecutionListener.event
                       and type(listener).node_finished is ExecutionListener.node_finished)

    # -- events -----------------------------------------------------------------------------
    def emit(self, name: str, **data: Any) -> None:
        if not self.silent:
            data["prompt_id"] = self.prompt_id
            self.listener.event(name, data)

    def facts(self, node_id: str) -> _Facts:
        facts = self._facts.get(node_id)
        if facts is None:
            node = self.prompt.nodes[node_id]
            node_type = self.ex.registry.get(node.class_type)
            facts = self._facts[node_id] = _Facts(node, node_type,
                                                  self.ex.has_fingerprint(node_type))
            if facts.fingerprinted or facts.lazy or not facts.schema.idempotent:
                self.replayable = False
        return facts

    def schema(self, node_id: str) -> NodeSchema:
        return self.facts(node_id).schema

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> ExecutionResult:
        self.ex.interrupt.clear()
        self.emit("execution_start", timestamp=timestamp_ms())
        if self._replay():
            return self.result
        reachable = self.prompt.required_nodes(self.outputs)
        self.ex._last_run = None
        try:
            order = self.prompt.order_for(self.outputs, self.ex.services.graph_planner)
            self.rank = {node_id: i for i, node_id in enumerate(order)}
            self._precache(order)
            self._run_nodes(self._plan(self.outputs, order))
            self.emit("execution_success", timestamp=timestamp_ms())
            self._record(order, reachable)
        except NodeExecutionError as failure:
            self._report_error(failure)
        except ExecutionInterrupted as stop:
            self._report_interrupt(stop.node_id)
        finally:
            self.ex.cache.end_prompt(self.used_keys)
            self.ex.forget_instances(reachable)
            self.emit("executing", node=None)
        self.result.values = {n: e.outputs for n, e in self.resolved.items()}
        return self.result

    def _replay(self) -> bool:
        """Answer a repeat of the last fully cached prompt from the entries it used."""
        record = self.ex._last_run
        if (record is None or record.outputs != tuple(self.outputs)
                or record.nodes != self.prompt.nodes):
            return False
        get = self.ex.cache.get
        entries = []
        for _node_id, key, entry_ref in record.steps:
            entry = get(key)
            if entry is None or entry is not entry_ref():
                return False  # evicted or recomputed since: take the normal path
            entries.append(entry)
        resolved, keys = self.resolved, self.keys
        for (node_id, key, _), entry in zip(record.steps, entries, strict=True):
            resolved[node_id] = entry
            keys[node_id] = key
        self.used_keys = set(keys.values())
        self._announce_hits(list(resolved))
        self.emit("execution_success", timestamp=timestamp_ms())
        self.ex.cache.end_prompt(self.used_keys)
        self.ex.forget_instances(record.reachable)
        self.emit("executing", node=None)
        self.result.values = {n: e.outputs for n, e in resolved.items()}
        return True

    def _record(self, order: list[str], reachable: set[str]) -> None:
        if self.replayable and all(node_id in self.resolved for node_id in order):
            steps = tuple((node_id, self.keys[node_id], weakref.ref(self.resolved[node_id]))
                          for node_id in order)
            self.ex._last_run = _RunRecord(self.prompt.nodes, tuple(self.outputs), reachable,
                                           steps)

    def _precache(self, order: list[str]) -> None:
        """Resolve from the cache every node whose inputs are all known and whose key hits."""
        hits = []
        resolved = self.resolved
        for node_id in order:
            facts = self.facts(node_id)
            lazy = facts.lazy
            if any(src not in resolved for name, src, _ in facts.links if name not in lazy):
                continue  # an input must be computed first, so this node cannot be a hit yet
            try:
                key = self._key(node_id)
            except Exception:  # noqa: BLE001 - a failing fingerprint is re-raised when it runs
                key = None
            if key is None:
                continue
            self.keys[node_id] = key
            entry = self.ex.cache.get(key)
            if entry is not None:
                self._accept(node_id, key, entry)
                hits.append(node_id)
        self._announce_hits(hits)

    def _announce_hits(self, hits: list[str]) -> None:
        self.result.cached.extend(hits)
        self.emit("execution_cached", nodes=hits, timestamp=timestamp_ms())
        for node_id in hits:
            self._announce_cached_output(node_id)

    def _announce_cached_output(self, node_id: str) -> None:
        entry = self.resolved[node_id]
        self.listener.node_finished(self.prompt_id, node_id, 0.0, True)
        if entry.ui is not None and self.schema(node_id).output_node:
            self.result.outputs[node_id] = entry.ui
            self.emit("executed", node=node_id, display_node=node_id, output=entry.ui)

    def _plan(self, targets: list[str], order: list[str] | None = None) -> list[str]:
        """Unresolved nodes needed to produce `targets` (lazy inputs not followed), in order
        (`order`: the run's whole order, cheaper to filter than to sort a large plan)."""
        need: set[str] = set()
        stack = list(targets)
        resolved = self.resolved
        while stack:
            node_id = stack.pop()
            if node_id in need or node_id in resolved:
                continue
            need.add(node_id)
            facts = self.facts(node_id)
            lazy = facts.lazy
            stack.extend(src for name, src, _ in facts.links if name not in lazy)
        if order is not None:
            return [node_id for node_id in order if node_id in need]
        return sorted(need, key=self.rank.__getitem__)

    def _run_nodes(self, plan: list[str]) -> None:
        # locals: this loop runs once per node of every prompt
        resolved, keys, used_keys = self.resolved, self.keys, self.used_keys
        interrupted, cache = self.ex.interrupt.is_set, self.ex.cache
        for node_id in plan:
            if node_id in resolved:
                continue
            if interrupted():
                raise ExecutionInterrupted(node_id)
            key = keys.get(node_id) or self._key_or_fail(node_id)
            if key is None:
                raise RuntimeError(f"node {node_id} was scheduled before its inputs resolved")
            entry = cache.get(key)
            if entry is not None:  # early cutoff: an upstream re-ran and gave the same output
                self._accept(node_id, key, entry)
                self.result.cached.append(node_id)
                self.emit("execution_cached", nodes=[node_id], timestamp=timestamp_ms())
                self._announce_cached_output(node_id)
                continue
            entry = self._execute(node_id, key)
            cache.put(key, entry)
            resolved[node_id] = entry
            used_keys.add(key)
            keys[node_id] = key

    def _accept(self, node_id: str, key: str, entry: CacheEntry) -> None:
        self.resolved[node_id] = entry
        self.used_keys.add(key)
        self.keys[node_id] = key

    # -- keys -------------------------------------------------------------------------------
    def _key_or_fail(self, node_id: str) -> str | None:
        """The key, with a failing fingerprint reported as that node's failure."""
        try:
            return self._key(node_id)
        except Exception as exc:  # noqa: BLE001 - a node hook failed: fail the prompt, not us
            raise NodeExecutionError(node_id, self.prompt.nodes[node_id].class_type, exc,
                                     {}) from exc

    def _key(self, node_id: str) -> str | None:
        """The node's cache key, or None while a (non-lazy) upstream is unresolved."""
        facts = self.facts(node_id)
        lazy = facts.lazy
        resolved = self.resolved
        upstream = []
        for name, src, slot in facts.links:
            if name in lazy:
                upstream.append((name, "s", self._structural_key(src), slot))
                continue
            entry = resolved.get(src)
            if entry is None:
                return None
            upstream.append((name, entry.identities[slot]))
        upstream_t = tuple(upstream)
        fingerprint = None
        if facts.fingerprinted:
            node = self.prompt.nodes[node_id]
            instance = self.ex.instance(node_id, node.class_type)
            fingerprint = instance.fingerprint(self._context(node_id), **node.literals)
        if fingerprint is ALWAYS_CHANGED or not facts.schema.idempotent:
            # Never reused by a later prompt, nor shared with another node of this one.
            fingerprint = ("nonce", self.nonce, node_id, repr(fingerprint))
        memo = self.ex._key_memo.get(node_id)
        if (memo is not None and memo[0] == facts.static and memo[1] == upstream_t
                and memo[2] == fingerprint):
            return memo[3]
        key = hashlib.blake2b(f"{facts.static}|{fingerprint!r}|{upstream_t!r}".encode(),
                              digest_size=16).hexdigest()
        self.ex._key_memo[node_id] = (facts.static, upstream_t, fingerprint, key)
        return key

    def _structural_key(self, node_id: str) -> str:
        """Key from the graph alone (no output contents): used for lazy, unevaluated inputs."""
        for current in sorted(self.prompt.required_nodes([node_id]), key=self.rank.__getitem__):
            if current in self.structural:
                continue
            node = self.prompt.nodes[current]
            links = tuple((name, self.structural[src], slot)
                          for name, (src, slot) in sorted(node.links.items()))
            version = self.ex.registry.get(node.class_type).schema.version
            self.structural[current] = stable_key((node.class_type, version, node.literals,
                                                   links))
        return self.structural[node_id]

    # -- running one node -------------------------------------------------------------------
    def _context(self, node_id: str) -> NodeContext:
        return NodeContext(node_id=node_id, class_type=self.prompt.nodes[node_id].class_type,
                           prompt_id=self.prompt_id, services=self.ex.services,
                           interrupt=self.ex.interrupt, progress_sink=self._progress)

    def _progress(self, node_id: str, value: float, total: float, preview: Any) -> None:
        if preview is not None:
            self.listener.preview(self.prompt_id, node_id, preview)
        self.emit("progress", value=value, max=total, node=node_id)

    def _execute(self, node_id: str, key: str) -> CacheEntry:
        facts = self.facts(node_id)
        if not self.silent:
            self.emit("executing", node=node_id, display_node=node_id)
        ctx = self._context(node_id)
        instance = self.ex.instance(node_id, facts.class_type)
        started = time.perf_counter()
        try:
            outputs, ui = self._invoke(node_id, facts, instance, ctx)
        except (ExecutionInterrupted, NodeExecutionError):
            raise
        except Exception as exc:  # noqa: BLE001 - any node failure fails the prompt, not us
            node = self.prompt.nodes[node_id]
            inputs = self._gather_inputs(node_id, facts)
            shown = {name: format_input_values(values) for name, values in inputs.items()
                     if name in node.literals or name in node.links}
            raise NodeExecutionError(node_id, facts.class_type, exc, shown) from exc
        seconds = time.perf_counter() - started
        self.result.executed.append(node_id)
        self.result.timings[node_id] = seconds
        if not self.silent:
            self.listener.node_finished(self.prompt_id, node_id, seconds, False)
        if ui is not None:
            self.result.outputs[node_id] = ui
            self.emit("executed", node=node_id, display_node=node_id, output=ui)
        identities = tuple(self._identity(values, key, slot) for slot, values in enumerate(outputs))
        return CacheEntry(outputs, identities, ui)

    def _invoke(self, node_id: str, facts: _Facts, instance: Node,
                ctx: NodeContext) -> tuple[list[list[Any]], dict[str, Any] | None]:
        """Run the node on its inputs: one direct call in the common case (no lazy, hidden or
        list inputs, one value per link), else through ComfyUI's list semantics."""
        if facts.simple:
            kwargs = dict(facts.literal_kwargs)
            resolved = self.resolved
            for name, src, slot in facts.link_kwargs:
                values = resolved[src].outputs[slot]
                if len(values) != 1:
                    break
                kwargs[name] = values[0]
            else:
                schema = facts.schema
                values, ui = _normalise(instance.execute(ctx, **kwargs), schema)
                outputs = [list(value) if declared.is_list else [value]
                           for declared, value in zip(schema.outputs, values, strict=True)]
                return outputs, (None if ui is None else _merge_ui(None, ui))
        inputs = self._gather_inputs(node_id, facts)
        if facts.lazy:
            self._resolve_lazy(node_id, facts.schema, instance, ctx, inputs)
        return self._call(instance, ctx, facts.schema, inputs)

    @staticmethod
    def _identity(values: list[Any], key: str, slot: int) -> Any:
        """What downstream keys see of an output: its content when it can be told cheaply
        (that is what makes early cutoff work), else the producing node's key."""
        scalars = small_scalars(values)
        if scalars is not None:
            return ("s", scalars)
        digest = content_digest(values)
        return ("v", digest) if digest is not None else ("k", key, slot)

    def _gather_inputs(self, node_id: str, facts: _Facts) -> dict[str, list[Any]]:
        """Every input as a list of values (ComfyUI list semantics); lazy ones left out."""
        inputs: dict[str, list[Any]] = {name: [value]
                                        for name, value in facts.literal_kwargs.items()}
        lazy = facts.lazy
        for name, src, slot in facts.link_kwargs:
            if name not in lazy or src in self.resolved:
                inputs[name] = self.resolved[src].outputs[slot]
        for spec in facts.schema.hidden_inputs:
            inputs[spec.name] = [self._hidden_value(spec.type, node_id)]
        return inputs

    def _hidden_value(self, kind: str, node_id: str) -> Any:
        if kind == "PROMPT":
            return self.prompt.raw
        if kind == "EXTRA_PNGINFO":
            return self.extra_data.get("extra_pnginfo")
        if kind == "UNIQUE_ID":
            return node_id
        if kind == "DYNPROMPT":
            return self.prompt
        return self.extra_data.get(kind.lower())

    def _resolve_lazy(self, node_id: str, schema: NodeSchema, instance: Node, ctx: NodeContext,
                      inputs: dict[str, list[Any]]) -> None:
        """Ask the node which lazy inputs it needs; evaluate those, until it needs no more."""
        links = self.prompt.nodes[node_id].links
        pending = {name for name in schema.lazy_inputs if name in links and name not in inputs}
        while pending:
            probe = {name: (values if schema.input_is_list else values[0])
                     for name, values in inputs.items() if values}
            probe.update({name: None for name in pending})
            wanted = [n for n in instance.check_lazy(ctx, **probe) if n in pending]
            if not wanted:
                return
            self._run_nodes(self._plan([links[name][0] for name in wanted]))
            for name in wanted:
                src, slot = links[name]
                inputs[name] = self.resolved[src].outputs[slot]
                pending.discard(name)

    def _call(self, instance: Node, ctx: NodeContext, schema: NodeSchema,
              inputs: dict[str, list[Any]]) -> tuple[list[list[Any]], dict[str, Any] | None]:
        """Call the node once (INPUT_IS_LIST) or once per list index, and merge the results."""
        if not schema.input_is_list and all(len(values) == 1 for values in inputs.values()):
            # The common case, one call: no per-call bookkeeping (the executor has just
            # checked for an interrupt before this node).
            values, ui = _normalise(
                instance.execute(ctx, **{name: vals[0] for name, vals in inputs.items()}), schema)
            outputs = [list(value) if declared.is_list else [value]
                       for declared, value in zip(schema.outputs, values, strict=True)]
            return outputs, (None if ui is None else _merge_ui(None, ui))
        if schema.input_is_list:
            calls = [inputs]
        else:
            count = max((len(v) for v in inputs.values()), default=1)
            if any(len(v) == 0 for v in inputs.values()):
                count = 0
            calls = [{name: values[min(i, len(values) - 1)] for name, values in inputs.items()}
                     for i in range(count)]
        outputs: list[list[Any]] = [[] for _ in schema.outputs]
        ui: dict[str, Any] | None = None
        for kwargs in calls:
            ctx.check_interrupted()
            values, call_ui = _normalise(instance.execute(ctx, **kwargs), schema)
            for slot, (declared, value) in enumerate(zip(schema.outputs, values, strict=True)):
                outputs[slot].extend(value) if declared.is_list else outputs[slot].append(value)
            if call_ui is not None:
                ui = _merge_ui(ui, call_ui)
        return outputs, ui

    # -- endings ----------------------------------------------------------------------------
    def _report_error(self, failure: NodeExecutionError) -> None:
        exc = failure.exc
        payload = {
            "prompt_id": self.prompt_id, "node_id": failure.node_id,
            "node_type": failure.class_type, "executed": list(self.result.executed),
            "exception_message": str(exc), "exception_type": type(exc).__name__,
            "traceback": failure.traceback, "current_inputs": failure.current_inputs,
            "current_outputs": list(self.resolved), "timestamp": timestamp_ms(),
        }
        self.result.status = "error"
        self.result.error = payload
        self.listener.event("execution_error", payload)

    def _report_interrupt(self, node_id: str | None) -> None:
        class_type = self.prompt.nodes[node_id].class_type if node_id in self.prompt.nodes else None
        payload = {"prompt_id": self.prompt_id, "node_id": node_id, "node_type": class_type,
                   "executed": list(self.result.executed), "timestamp": timestamp_ms()}
        self.result.status = "interrupted"
        self.result.error = payload
        self.listener.event("execution_interrupted", payload)


def _normalise(returned: Any, schema: NodeSchema) -> tuple[tuple[Any, ...], dict | None]:
    """A node's return value as (one value per declared output, UI dict or None)."""
    if isinstance(returned, NodeResult):
        values, ui = tuple(returned.outputs), returned.ui
    elif returned is None:
        values, ui = (), None
    elif isinstance(returned, tuple):
        values, ui = returned, None
    else:
        raise TypeError(f"{schema.name}.execute returned {type(returned).__name__}; return a "
                        f"tuple with one value per output or a NodeResult")
    if len(values) != len(schema.outputs):
        raise TypeError(f"{schema.name}.execute returned {len(values)} value(s) but the node "
                        f"declares {len(schema.outputs)} output(s)")
    return values, ui


def _merge_ui(merged: dict[str, Any] | None, ui: dict[str, Any]) -> dict[str, Any]:
    if merged is None:
        return {key: list(value) if isinstance(value, (list, tuple)) else value
                for key, value in ui.items()}
    for key, value in ui.items():
        if isinstance(value, (list, tuple)) and isinstance(merged.get(key), list):
            merged[key].extend(value)
        else:
            merged[key] = value
    return merged

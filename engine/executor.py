"""Runs a validated prompt the way ComfyUI's caching executor does: only the nodes the outputs
need, in topological order, each looked up in the output cache by its structural key first
(engine/cache_keys.py), and every step reported to a listener.

Two shortcuts keep the editor's re-runs cheap: nodes whose inputs are all known are looked up
before anything runs (their hits are announced in one `execution_cached` event), and what the
previous run recorded (engine/run_record.py) spares recomputing the keys of unchanged nodes,
or replays the whole run when the prompt is the same again."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Any

from engine.cache import CacheEntry, OutputCache
from engine.cache_keys import CacheKeys, NodeFacts, output_identity, structural_key
from engine.context import ExecutionInterrupted, InterruptFlag, NodeContext, Services
from engine.events import ExecutionListener, timestamp_ms
from engine.expansion import ExpansionError, Expansions, PendingExpansion
from engine.gc_scope import older_objects_frozen
from engine.graph import CycleError, Prompt
from engine.node import ALWAYS_CHANGED, HIDDEN_KINDS, Node
from engine.node_call import Called, call_node, call_once, format_input_values
from engine.registry import NodeRegistry
from engine.run_record import RunRecord
from engine.run_result import ExecutionResult, NodeExecutionError
from engine.run_reuse import RunReuse


class Executor:
    """Long-lived: owns the output cache, the node instances and the key memory across
    prompts."""

    def __init__(self, registry: NodeRegistry, services: Services,
                 cache: OutputCache | None = None, interrupt: InterruptFlag | None = None) -> None:
        self.registry = registry
        self.services = services
        self.cache = cache if cache is not None else OutputCache("classic")
        self.interrupt = interrupt if interrupt is not None else InterruptFlag()
        self.keys = CacheKeys(registry)
        self._instances: dict[str, tuple[str, Node]] = {}  # node id -> (class, instance)
        self._shared: dict[str, Node] = {}
        self._last_run: RunRecord | None = None
        self._kept: set[str] | None = None  # what forget_instances kept last

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
        known = self._instances.get(node_id)
        if known is not None and known[0] == class_type:
            return known[1]
        node_type = self.registry.get(class_type)
        node = node_type()
        if node_type.per_node_instance:
            self._instances[node_id] = (class_type, node)
        else:
            self._shared[class_type] = node
        return node

    def forget_instances(self, keep: set[str]) -> None:
        """Drop node instances and key memory of nodes outside `keep`."""
        if keep is self._kept:
            return  # the nodes of the last run again: nothing new to forget
        self._kept = keep
        if not self._instances.keys() <= keep:
            for node_id in [n for n in self._instances if n not in keep]:
                del self._instances[node_id]
        self.keys.forget(keep)


class _PromptRun(RunReuse):
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
        self.keys: dict[str, str] = {}
        self.structural: dict[str, str] = {}
        self.fingerprints: dict[str, str] = {}
        self.result = ExecutionResult(prompt_id, "success")
        self.nonce = uuid.uuid4().hex
        self.rank: dict[str, int] = {}
        self._facts: dict[str, NodeFacts] = {}
        self.replayable = True  # see RunRecord
        self.expansions = Expansions(prompt, executor.registry)  # nodes that expanded
        # A listener that ignores events needs none built (saves time on huge graphs).
        self.silent = (type(listener).event is ExecutionListener.event
                       and type(listener).node_finished is ExecutionListener.node_finished)

    def emit(self, name: str, **data: Any) -> None:
        if not self.silent:
            data["prompt_id"] = self.prompt_id
            self.listener.event(name, data)

    def facts(self, node_id: str) -> NodeFacts:
        facts = self._facts.get(node_id)
        if facts is None:
            facts = self._facts[node_id] = self.ex.keys.facts(self.prompt.nodes[node_id])
            if facts.lazy or not facts.schema.idempotent:
                self.replayable = False
        return facts

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> ExecutionResult:
        self.ex.interrupt.clear()
        self.emit("execution_start", timestamp=timestamp_ms())
        replay = self._replayable_record()
        reachable = replay[0].reachable if replay else self.prompt.required_nodes(self.outputs)
        record = None
        try:
            if replay is not None:
                self._replay(*replay)
                record = replay[0]
            else:
                record = self._run_in_order(reachable)
            self.emit("execution_success", timestamp=timestamp_ms())
        except NodeExecutionError as failure:
            self._report_error(failure)
        except ExecutionInterrupted as stop:
            self._report_interrupt(stop.node_id)
        finally:
            self.ex.cache.end_prompt(self.used_keys)
            self.ex.forget_instances(reachable)
            self.emit("executing", node=None)
        if record is not None:
            # this prompt's nodes (a replayed record's are equal): the next edit is of them
            self.ex._last_run = replace(record, nodes=self.prompt.nodes, key_of=record.key_of,
                                        cache_version=self.ex.cache.version)
        self.result.resolved = self.resolved
        return self.result

    def _run_in_order(self, reachable: set[str]) -> RunRecord | None:
        """Look up and run the nodes; the run's record if a repeat can replay it."""
        last, self.ex._last_run = self.ex._last_run, None
        order = self.prompt.order_for(self.outputs, self.ex.services.graph_planner)
        self.rank = {node_id: i for i, node_id in enumerate(order)}
        self._precache(order, last if last is not None and last.holds(self.ex.cache) else None)
        self._run_nodes(self._plan(self.outputs, order))
        if not self.replayable or len(self.resolved) != len(order):
            return None
        return RunRecord(self.prompt.nodes, tuple(self.outputs), reachable, tuple(order),
                         tuple(map(self.keys.__getitem__, order)), tuple(self.result.outputs),
                         self.fingerprints)

    # -- running ----------------------------------------------------------------------------
    def _plan(self, targets: list[str], order: list[str] | None = None) -> list[str]:
        """Unresolved nodes needed to produce `targets` (lazy inputs not followed), in order
        (`order`: the run's whole order, cheaper to filter than to sort a large plan)."""
        need: set[str] = set()
        stack = list(targets)
        while stack:
            node_id = stack.pop()
            if node_id in need or node_id in self.resolved:
                continue
            need.add(node_id)
            facts = self.facts(node_id)
            stack.extend(src for name, src, _ in facts.links if name not in facts.lazy)
        if order is not None:
            return [node_id for node_id in order if node_id in need]
        return sorted(need, key=self.rank.__getitem__)

    def _run_nodes(self, plan: list[str]) -> None:
        """Run the plan's nodes in order. A node with lazy inputs that asks for some not yet
        evaluated waits on the stack while their plan runs (a loop, not a recursion, so a
        chain of lazy nodes may be as deep as it likes)."""
        stack = plan[::-1]  # the next node last
        while stack:
            node_id = stack[-1]
            if node_id in self.resolved:
                stack.pop()
                continue
            if self.ex.interrupt.is_set():
                raise ExecutionInterrupted(node_id)
            if node_id in self.expansions.pending:  # its expansion has run: it can finish
                key, entry = self.expansions.finish(node_id, self.resolved)
                self.ex.cache.put(key, entry)
                self._accept(node_id, key, entry)
                continue
            key = self.keys.get(node_id) or self._key_or_fail(node_id)
            entry = self.ex.cache.get(key)
            if entry is not None:  # early cutoff: an upstream re-ran and gave the same output
                self._accept(node_id, key, entry)
                self._announce_hits([node_id])
                continue
            wanted = self._lazy_inputs_wanted(node_id)
            if wanted:
                stack.extend(self._plan(wanted)[::-1])
                continue
            entry = self._execute(node_id, key)
            if isinstance(entry, CacheEntry):
                self.ex.cache.put(key, entry)
                self._accept(node_id, key, entry)
            else:  # it expanded: the new nodes it waits for run first
                stack.extend(self._plan(entry)[::-1])

    # -- keys -------------------------------------------------------------------------------
    def _key_or_fail(self, node_id: str) -> str:
        """The key, with a failing fingerprint reported as that node's failure."""
        try:
            key = self._key(node_id)
        except Exception as exc:  # noqa: BLE001 - a node hook failed: fail the prompt, not us
            raise NodeExecutionError(node_id, self.prompt.nodes[node_id].class_type, exc,
                                     {}) from exc
        if key is None:
            raise RuntimeError(f"node {node_id} was scheduled before its inputs resolved")
        return key

    def _key(self, node_id: str) -> str | None:
        """The node's cache key, or None while a (non-lazy) upstream is unresolved."""
        facts = self.facts(node_id)
        upstream = []
        for name, src, slot in facts.links:
            if name in facts.lazy:  # may never be evaluated: its key from the graph alone
                upstream.append((name, "s", structural_key(self.prompt, src, self.rank,
                                                           self.ex.registry, self.structural),
                                 slot))
                continue
            entry = self.resolved.get(src)
            if entry is None:
                return None
            upstream.append((name, entry.identities[slot]))
        fingerprint = None
        if facts.fingerprinted:
            fingerprint = self._fingerprint(node_id)
            self.fingerprints[node_id] = repr(fingerprint)
        if fingerprint is ALWAYS_CHANGED or not facts.schema.idempotent:
            # Never reused by a later prompt, nor shared with another node of this one.
            fingerprint = ("nonce", self.nonce, node_id, repr(fingerprint))
            self.replayable = False
        if node_id in self.expansions.opaque:  # an expanded node given non-scalar literals
            fingerprint = (fingerprint, self.expansions.opaque[node_id])
        return self.ex.keys.key(facts, tuple(upstream), fingerprint)

    def _fingerprint(self, node_id: str) -> Any:
        node = self.prompt.nodes[node_id]
        instance = self.ex.instance(node_id, node.class_type)
        return instance.fingerprint(self._context(node_id), **node.literals)

    # -- running one node -------------------------------------------------------------------
    def _context(self, node_id: str) -> NodeContext:
        return NodeContext(node_id=node_id, class_type=self.prompt.nodes[node_id].class_type,
                           prompt_id=self.prompt_id, services=self.ex.services,
                           interrupt=self.ex.interrupt, progress_sink=self._progress,
                           text_sink=self._text)

    def _progress(self, node_id: str, value: float, total: float, preview: Any) -> None:
        if preview is not None:
            self.listener.preview(self.prompt_id, node_id, preview)
        self.emit("progress", value=value, max=total, node=node_id)

    def _text(self, node_id: str, text: str) -> None:
        self.listener.text(self.prompt_id, node_id, text)

    def _execute(self, node_id: str, key: str) -> CacheEntry | list[str]:
        """The node's entry, or, if it expanded, the new nodes it waits for."""
        facts = self.facts(node_id)
        display = self.expansions.dynamic.get_display_node_id(node_id)
        self.emit("executing", node=node_id, display_node=display)
        ctx = self._context(node_id)
        if ctx.models is not None:
            ctx.models.begin_node()
        instance = self.ex.instance(node_id, facts.node.class_type)
        started = time.perf_counter()
        try:
            outputs, ui, graphs = self._invoke(node_id, facts, instance, ctx)
        except (ExecutionInterrupted, NodeExecutionError):
            raise
        except Exception as exc:  # noqa: BLE001 - any node failure fails the prompt, not us
            raise self._failure(node_id, facts, exc) from exc
        seconds = time.perf_counter() - started
        self.result.executed.append(node_id)
        self.result.timings[node_id] = seconds
        if not self.silent:
            self.listener.node_finished(self.prompt_id, node_id, seconds, False)
        if ui is not None:
            self.result.outputs[node_id] = ui
            self.emit("executed", node=node_id, display_node=display, output=ui)
        if graphs:
            return self._expand(node_id, PendingExpansion(key, outputs, ui, []), graphs)
        identities = tuple(output_identity(values, key, slot)
                           for slot, values in enumerate(outputs))
        return CacheEntry(outputs, identities, ui)

    def _expand(self, node_id: str, pending: PendingExpansion, graphs: list[Any]) -> list[str]:
        """Add the node's expansion to the run (engine/expansion.py)."""
        try:
            targets = self.expansions.expand(node_id, pending, graphs, self.rank)
        except (ExpansionError, CycleError) as exc:  # the expanding node's failure
            raise self._failure(node_id, self.facts(node_id), exc) from exc
        for added in () if self.silent else self.expansions.added:
            self.listener.node_added(self.prompt_id, self.expansions.lineage(added))
        self.prompt = self.expansions.prompt
        self.replayable = False
        self.ex._kept = None  # its new nodes' instances are to be forgotten after the run
        return targets

    def _invoke(self, node_id: str, facts: NodeFacts, instance: Node,
                ctx: NodeContext) -> Called:
        """Run the node on its inputs: one direct call in the common case (no lazy, hidden or
        list inputs, one value per link), else through ComfyUI's list semantics."""
        if facts.simple:
            kwargs = dict(facts.literal_kwargs)
            for name, src, slot in facts.link_kwargs:
                values = self.resolved[src].outputs[slot]
                if len(values) != 1:
                    break
                kwargs[name] = values[0]
            else:
                return call_once(instance, ctx, facts.schema, kwargs)
        return call_node(instance, ctx, facts.schema, self._gather_inputs(node_id, facts))

    def _gather_inputs(self, node_id: str, facts: NodeFacts) -> dict[str, list[Any]]:
        """Every input as a list of values (ComfyUI list semantics); lazy ones left out."""
        inputs: dict[str, list[Any]] = {name: [value]
                                        for name, value in facts.literal_kwargs.items()}
        for name, src, slot in facts.link_kwargs:
            if name in facts.raw_links:
                inputs[name] = [[src, slot]]
            elif name not in facts.lazy or src in self.resolved:
                inputs[name] = self.resolved[src].outputs[slot]
        for spec in facts.schema.hidden_inputs:  # a pack's own kind keeps a value it was given
            if spec.type in HIDDEN_KINDS or spec.name not in inputs:
                inputs[spec.name] = [self._hidden_value(spec.type, node_id)]
        return inputs

    def _hidden_value(self, kind: str, node_id: str) -> Any:
        engine_values = {"PROMPT": self.prompt.raw, "UNIQUE_ID": node_id,
                         "DYNPROMPT": self.expansions.dynamic,
                         "EXTRA_PNGINFO": self.extra_data.get("extra_pnginfo")}
        return engine_values[kind] if kind in engine_values else self.extra_data.get(kind.lower())

    def _lazy_inputs_wanted(self, node_id: str) -> list[str]:
        """Sources of the lazy inputs the node asks for (ComfyUI's check_lazy_status) that are
        not evaluated yet; asked again each time those have been evaluated."""
        facts = self.facts(node_id)
        if not facts.lazy:
            return []
        schema, links = facts.schema, facts.node.links
        inputs = self._gather_inputs(node_id, facts)
        pending = {name for name in schema.lazy_inputs if name in links and name not in inputs}
        if not pending:
            return []
        probe = {name: (values if schema.input_is_list else values[0])
                 for name, values in inputs.items() if values}
        probe.update({name: None for name in pending})
        instance = self.ex.instance(node_id, facts.node.class_type)
        try:
            asked = instance.check_lazy(self._context(node_id), **probe)
        except ExecutionInterrupted:
            raise
        except Exception as exc:  # noqa: BLE001 - any node failure fails the prompt, not us
            raise self._failure(node_id, facts, exc) from exc
        return [links[name][0] for name in asked if name in pending]

    def _failure(self, node_id: str, facts: NodeFacts, exc: Exception) -> NodeExecutionError:
        """The node's failure, with the inputs it had (as execution_error shows them)."""
        node = facts.node
        shown = {name: format_input_values(values)
                 for name, values in self._gather_inputs(node_id, facts).items()
                 if name in node.literals or name in node.links}
        return NodeExecutionError(node_id, node.class_type, exc, shown)

    # -- endings ----------------------------------------------------------------------------
    def _report_error(self, failure: NodeExecutionError) -> None:
        """execution_error; a failure inside an expansion is reported on its prompt node (as
        ComfyUI does), the message naming the expanded node that failed."""
        exc = failure.exc
        real, message = self.expansions.reported(failure.node_id, exc)
        payload = {
            "prompt_id": self.prompt_id, "node_id": real,
            "node_type": self.prompt.nodes[real].class_type,
            "executed": list(self.result.executed),
            "exception_message": message, "exception_type": type(exc).__name__,
            "traceback": failure.traceback, "current_inputs": failure.current_inputs,
            "current_outputs": list(self.resolved), "timestamp": timestamp_ms(),
        }
        self.result.status = "error"
        self.result.error = payload
        self.listener.event("execution_error", payload)

    def _report_interrupt(self, node_id: str | None) -> None:
        node_id = None if node_id is None else self.expansions.dynamic.get_real_node_id(node_id)
        class_type = self.prompt.nodes[node_id].class_type if node_id in self.prompt.nodes else None
        payload = {"prompt_id": self.prompt_id, "node_id": node_id, "node_type": class_type,
                   "executed": list(self.result.executed), "timestamp": timestamp_ms()}
        self.result.status = "interrupted"
        self.result.error = payload
        self.listener.event("execution_interrupted", payload)

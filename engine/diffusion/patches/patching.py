"""Clone-and-patch: a ModelHandle's `patches` change the shared network only while that handle
is in use, and are undone bit for bit afterwards (so clones never see each other's LoRAs).

A patch is any object with `apply(module) -> Undo`; `Undo()` restores exactly what `apply`
changed. Patches apply in order and are undone in reverse order. Weight patches swap new
tensors in (`param.data = new`) rather than writing into the shared ones, which may be a
copy-on-write memory map of the file (engine/diffusion/patches/weight_patches.py). Callers run one
prompt at a time per process (the server's single worker), so patching the shared module in
place is safe for the duration of a `patched` block."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Protocol

from torch import nn

from engine.diffusion.memory.model_manager import RESIDENT_HOOK

Undo = Callable[[], None]


class Patch(Protocol):
    """A reversible change to a module's weights (LoRA delta, model merge, ...)."""

    def apply(self, module: nn.Module) -> Undo: ...


@contextmanager
def patched(module: nn.Module, patches: Sequence[Patch]) -> Iterator[nn.Module]:
    """`module` with `patches` applied for the duration of the block, its weights held loaded
    (patches swap tensors in: the weights must not be evicted or moved under them)."""
    hold: Callable[[], AbstractContextManager[object]] | None = getattr(
        module, RESIDENT_HOOK, None)
    with hold() if hold is not None else nullcontext():
        undos: list[Undo] = []
        try:
            for patch in patches:
                undos.append(patch.apply(module))
            yield module
        finally:
            for undo in reversed(undos):
                undo()

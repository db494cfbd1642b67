"""Stable hashing and byte accounting of node inputs and outputs.

Keys must be identical across processes, so nothing here uses Python's salted `hash()`."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

# Tensors larger than this are not content-hashed (hashing would cost more than re-running the
# consumers); their identity falls back to the structural key of the node that made them.
MAX_DIGEST_BYTES = 256 * 2**20
_SCALARS = (str, int, float, bool, type(None))
_SCALAR_TYPES = frozenset(_SCALARS)


def stable_key(obj: Any) -> str:
    """A 128-bit hex digest of a key tuple built from scalars, tuples, lists and dicts."""
    return hashlib.blake2b(canonical(obj).encode("utf-8", "surrogatepass"),
                           digest_size=16).hexdigest()


def literal_items(literals: Mapping[str, Any]) -> tuple[tuple[str, Any], ...] | str:
    """Literal inputs in a key-ready, order-independent form: sorted (name, value) pairs when
    every value is a scalar (their repr is stable across processes), else canonical text."""
    if all(type(value) in _SCALAR_TYPES for value in literals.values()):
        return tuple(sorted(literals.items()))
    return canonical(literals)


def small_scalars(values: list[Any]) -> tuple[Any, ...] | None:
    """The values themselves when they are few short scalars (an identity needing no hash)."""
    if len(values) > 16:
        return None
    for value in values:
        kind = type(value)
        if kind not in _SCALAR_TYPES or (kind is str and len(value) > 256):
            return None
    return tuple(values)


def canonical(obj: Any) -> str:
    """A deterministic text form: dicts sorted by key, floats by repr, types tagged."""
    if isinstance(obj, _SCALARS):
        return repr(obj)
    if isinstance(obj, (tuple, list)):
        return "(" + ",".join(canonical(item) for item in obj) + ")"
    if isinstance(obj, Mapping):
        items = sorted((canonical(k), canonical(v)) for k, v in obj.items())
        return "{" + ",".join(f"{k}:{v}" for k, v in items) + "}"
    return f"<{type(obj).__module__}.{type(obj).__qualname__}:{obj!r}>"


def content_digest(value: Any) -> str | None:
    """Digest of a value's content, or None when it cannot be hashed cheaply (e.g. models)."""
    custom = getattr(value, "__loom_digest__", None)
    if custom is not None:
        return custom()
    if isinstance(value, _SCALARS):
        return "v" + repr(value)
    if isinstance(value, (list, tuple)):
        parts = [content_digest(item) for item in value]
        return None if None in parts else stable_key((type(value).__name__, parts))
    if isinstance(value, Mapping):
        parts = {str(k): content_digest(v) for k, v in value.items()}
        return None if None in parts.values() else stable_key(("map", parts))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        inner = content_digest(fields)
        return None if inner is None else stable_key((type(value).__qualname__, inner))
    return _array_digest(value)


def _array_digest(value: Any) -> str | None:
    """Hash of a torch tensor or numpy array (dtype, shape and bytes)."""
    module = type(value).__module__
    if module.startswith("torch") and hasattr(value, "detach"):
        tensor = value.detach()
        if tensor.numel() * tensor.element_size() > MAX_DIGEST_BYTES:
            return None
        tensor = tensor.cpu().contiguous()
        raw = tensor.view(-1).view(__import__("torch").uint8).numpy().tobytes() \
            if tensor.numel() else b""
        header = (str(tensor.dtype), tuple(tensor.shape))
    elif module.startswith("numpy") and hasattr(value, "tobytes"):
        if value.nbytes > MAX_DIGEST_BYTES:
            return None
        raw, header = value.tobytes(), (str(value.dtype), tuple(value.shape))
    else:
        return None
    hasher = hashlib.blake2b(repr(header).encode(), digest_size=16)
    hasher.update(raw)
    return hasher.hexdigest()


def nbytes_of(value: Any, _seen: set[int] | None = None) -> int:
    """Bytes of tensor/array data held by a value (shared storage counted once)."""
    seen = _seen if _seen is not None else set()
    if id(value) in seen:
        return 0
    seen.add(id(value))
    custom = getattr(value, "__loom_nbytes__", None)
    if custom is not None:
        return int(custom())
    if isinstance(value, _SCALARS):
        return 0
    if isinstance(value, (list, tuple)):
        return sum(nbytes_of(item, seen) for item in value)
    if isinstance(value, Mapping):
        return sum(nbytes_of(item, seen) for item in value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes_of(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    module = type(value).__module__
    if module.startswith("torch") and hasattr(value, "untyped_storage"):
        storage = value.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return int(storage.nbytes())
    if module.startswith("numpy") and hasattr(value, "nbytes"):
        return int(value.nbytes)
    return 0

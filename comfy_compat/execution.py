"""ComfyUI's `execution` module for custom-node packs: the helpers packs import from it.
Its executor (PromptExecutor, validate_prompt ...) is Loom's own and not reachable this way."""

from __future__ import annotations

import enum
from typing import Any

from loom_internals import unavailable

PromptExecutor = unavailable("execution.PromptExecutor")
validate_prompt = unavailable("execution.validate_prompt")
validate_inputs = unavailable("execution.validate_inputs")
get_input_data = unavailable("execution.get_input_data")
get_output_data = unavailable("execution.get_output_data")
IsChangedCache = unavailable("execution.IsChangedCache")
CacheSet = unavailable("execution.CacheSet")


class ExecutionResult(enum.Enum):
    SUCCESS = 0
    FAILURE = 1
    PENDING = 2


class CacheType(enum.Enum):
    CLASSIC = 0
    LRU = 1
    NONE = 2
    RAM_PRESSURE = 3


def full_type_name(klass: Any) -> str:
    """`module.QualName` of a class ('QualName' for builtins), as ComfyUI's error reports."""
    module = klass.__module__
    return klass.__qualname__ if module == "builtins" else f"{module}.{klass.__qualname__}"

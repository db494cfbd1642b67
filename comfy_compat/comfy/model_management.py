"""ComfyUI's `comfy.model_management` for custom-node packs: devices and dtypes come from the
process's DevicePolicy, memory from its ModelManager, interrupts from the running prompt."""

from __future__ import annotations

import enum
import os
from typing import Any

import torch

from engine.comfy_host import HOST, running_node
from engine.context import ExecutionInterrupted, InterruptFlag

# ComfyUI raises this to stop a prompt; Loom's executor treats it as the user's interrupt.
InterruptProcessingException = ExecutionInterrupted
OOM_EXCEPTION = torch.cuda.OutOfMemoryError
XFORMERS_IS_AVAILABLE = False
XFORMERS_ENABLED_VAE = False
ENABLE_PYTORCH_ATTENTION = True
directml_enabled = False
lowvram_available = True
current_loaded_models: list[Any] = []  # Loom's ModelManager tracks loaded models itself


class VRAMState(enum.Enum):
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


class CPUState(enum.Enum):
    GPU = 0
    CPU = 1
    MPS = 2


def _ram_bytes() -> tuple[int, int]:
    """(total, available) RAM in bytes (Linux sysconf; available as free pages there)."""
    page = os.sysconf("SC_PAGE_SIZE")
    return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")


def _policy() -> Any:
    return _manager().policy


def _manager() -> Any:
    manager = HOST.require_services("comfy.model_management").model_manager
    if manager is None:
        raise RuntimeError("comfy.model_management needs Loom's model manager; main.py creates "
                           "it before custom nodes load")
    return manager


def __getattr__(name: str) -> Any:
    """vram_state, cpu_state, total_vram and total_ram, as ComfyUI's module globals."""
    if name == "cpu_state":
        return CPUState.GPU if _policy().device.type == "cuda" else CPUState.CPU
    if name == "vram_state":
        return VRAMState.NORMAL_VRAM if _policy().device.type == "cuda" else VRAMState.DISABLED
    if name == "total_vram":
        return get_total_memory() / 2**20
    if name == "total_ram":
        return _ram_bytes()[0] / 2**20
    raise AttributeError(f"comfy.model_management has no attribute {name!r} in Loom's facade")


def get_torch_device() -> torch.device:
    return _policy().device


def get_torch_device_name(device: Any) -> str:
    """"cpu", or "cuda:0 <GPU name>" as ComfyUI prints it."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return device.type


def intermediate_device() -> torch.device:
    return torch.device("cpu")


def unet_offload_device() -> torch.device:
    return _policy().offload_device


def text_encoder_offload_device() -> torch.device:
    return _policy().offload_device


def vae_offload_device() -> torch.device:
    return _policy().offload_device


def text_encoder_device() -> torch.device:
    return _policy().device


def vae_device() -> torch.device:
    return _policy().device


def unet_inital_load_device(parameters: int = 0, dtype: Any = None) -> torch.device:
    return _policy().offload_device


def unet_dtype(device: Any = None, model_params: int = 0, supported_dtypes: Any = None,
               weight_dtype: Any = None) -> torch.dtype:
    return _policy().unet_dtype


def text_encoder_dtype(device: Any = None) -> torch.dtype:
    return _policy().text_dtype


def vae_dtype(device: Any = None, allowed_dtypes: Any = None) -> torch.dtype:
    return _policy().vae_dtype


def unet_manual_cast(weight_dtype: Any, inference_device: Any,
                     supported_dtypes: Any = None) -> None:
    """None: Loom computes in the weights' dtype (no per-layer casting)."""
    return None


def should_use_fp16(device: Any = None, model_params: int = 0,
                    prioritize_performance: bool = True, manual_cast: bool = False) -> bool:
    return _policy().unet_dtype == torch.float16


def should_use_bf16(device: Any = None, model_params: int = 0,
                    prioritize_performance: bool = True, manual_cast: bool = False) -> bool:
    return _policy().unet_dtype == torch.bfloat16


def supports_dtype(device: Any, dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.bfloat16) or torch.device(device).type == "cuda"


def supports_cast(device: Any, dtype: torch.dtype) -> bool:
    return True


def device_supports_non_blocking(device: Any) -> bool:
    return torch.device(device).type == "cuda"


def get_autocast_device(dev: Any) -> str:
    return torch.device(dev).type if dev is not None else "cuda"


def is_device_type(device: Any, kind: str) -> bool:
    return getattr(device, "type", None) == kind


def is_device_cpu(device: Any) -> bool:
    return is_device_type(device, "cpu")


def is_device_mps(device: Any) -> bool:
    return is_device_type(device, "mps")


def is_device_cuda(device: Any) -> bool:
    return is_device_type(device, "cuda")


def is_intel_xpu() -> bool:
    return False


def is_nvidia() -> bool:
    return _policy().device.type == "cuda" and torch.version.cuda is not None


def is_amd() -> bool:
    return _policy().device.type == "cuda" and torch.version.hip is not None


def mps_mode() -> bool:
    return False


def xformers_enabled() -> bool:
    return False


def xformers_enabled_vae() -> bool:
    return False


def pytorch_attention_enabled() -> bool:
    return True


def pytorch_attention_flash_attention() -> bool:
    return _policy().device.type == "cuda"


def sage_attention_enabled() -> bool:
    return False


def flash_attention_enabled() -> bool:
    return False


def get_total_memory(dev: Any = None, torch_total_too: bool = False) -> Any:
    """Bytes of the compute device (RAM on the CPU), and torch's share when asked."""
    info = _manager().memory_info()
    total = info.total if info is not None else _ram_bytes()[0]
    return (total, total) if torch_total_too else total


def get_free_memory(dev: Any = None, torch_free_too: bool = False) -> Any:
    info = _manager().memory_info()
    free = info.free if info is not None else _ram_bytes()[1]
    return (free, free) if torch_free_too else free


def maximum_vram_for_weights(device: Any = None) -> int:
    return int(get_total_memory() * 0.88)


def module_size(module: torch.nn.Module) -> int:
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def cast_to_device(tensor: torch.Tensor, device: Any, dtype: Any, copy: bool = False
                   ) -> torch.Tensor:
    return tensor.to(device=device, dtype=dtype, copy=copy)


def cast_to(weight: torch.Tensor, dtype: Any = None, device: Any = None,
            non_blocking: bool = False, copy: bool = False, stream: Any = None) -> torch.Tensor:
    return weight.to(device=device, dtype=dtype, non_blocking=non_blocking, copy=copy)


def load_models_gpu(models: Any, memory_required: int = 0, force_patch_weights: bool = False,
                    minimum_memory_required: Any = None, force_full_load: bool = False) -> None:
    """Make the models' weights resident on their compute device (Loom's manager decides how)."""
    for model in models:
        load_model_gpu(model)


def load_model_gpu(model: Any) -> None:
    loom_value = getattr(model, "loom_value", None)
    if loom_value is not None:
        _manager().ensure_resident(loom_value())


def loaded_models(only_currently_used: bool = False) -> list[Any]:
    return []


def free_memory(memory_required: int, device: Any, keep_loaded: Any = ()) -> list[Any]:
    """ComfyUI frees room on `device`; Loom's manager already offloads by its own budget."""
    return []


def unload_all_models() -> None:
    _manager().free()


def cleanup_models(keep_clone_weights_loaded: bool = False) -> None:
    return None


def cleanup_models_gc() -> None:
    return None


def soft_empty_cache(force: bool = False) -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _interrupt() -> InterruptFlag:
    current = running_node()
    if current is not None:
        return current.interrupt_flag
    if HOST.interrupt is None:
        HOST.interrupt = InterruptFlag()
    return HOST.interrupt


def interrupt_current_processing(value: bool = True) -> None:
    flag = _interrupt()
    flag.set() if value else flag.clear()


def processing_interrupted() -> bool:
    return _interrupt().is_set()


def throw_exception_if_processing_interrupted() -> None:
    """Raise the interrupt (ComfyUI's InterruptProcessingException) if the user asked to stop."""
    if processing_interrupted():
        current = running_node()
        raise InterruptProcessingException(current.node_id if current is not None else None)

"""Reading safetensors files: tensors are zero-copy views of the mapped file; a tensor read in
another dtype is converted alone and the file pages it came from leave the process, so a load
never holds the file and the converted weights together."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.diffusion.checkpoints.loader import load_checkpoint
from engine.diffusion.checkpoints.safetensors_io import CastOnRead, SafetensorsFile, shapes_of
from engine.diffusion.checkpoints.state_files import open_state_file
from engine.diffusion.checkpoints.writer import write_random_checkpoint
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.text.tokenizer import BpeCache

MIB = 2**20
# ComfyUI's "store in fp32" flags: every weight converted to fp32 at load, none held as stored
CONVERTED = DevicePolicy.decide(cpu=True, fp32_unet=True, fp32_text_enc=True, fp32_vae=True)


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def resident_file_bytes() -> int:
    """RssFile of this process: the mapped file pages it holds."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile line in /proc/self/status")


def test_a_same_dtype_read_is_a_view_of_the_mapping(tmp_path: Path) -> None:
    weight = torch.randn(64, 32)
    opened = SafetensorsFile(write(tmp_path / "w.safetensors", {"w": weight}))
    first, second = opened.cast("w", torch.float32), opened["w"]
    assert torch.equal(first, weight)
    assert first.data_ptr() == second.data_ptr()


def test_a_cast_read_converts_to_the_asked_dtype(tmp_path: Path) -> None:
    weight = torch.randn(64, 32, dtype=torch.float16)
    opened = SafetensorsFile(write(tmp_path / "w.safetensors", {"w": weight}))
    cast = opened.cast("w", torch.float32)
    assert cast.dtype == torch.float32 and torch.equal(cast, weight.float())
    assert torch.equal(opened["w"], weight)  # the file's bytes read back unchanged


def test_integer_tensors_are_never_cast(tmp_path: Path) -> None:
    ids = torch.arange(77).unsqueeze(0)
    opened = SafetensorsFile(write(tmp_path / "ids.safetensors", {"ids": ids}))
    assert opened.cast("ids", torch.float16).dtype == torch.int64


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_a_cast_read_releases_the_file_pages_it_was_read_from(tmp_path: Path) -> None:
    weight = torch.ones(32 * MIB // 2, dtype=torch.float16)  # 32 MiB in the file
    opened = SafetensorsFile(write(tmp_path / "big.safetensors", {"w": weight}))
    before = resident_file_bytes()
    touched = int(torch.count_nonzero(opened["w"]))  # faults every page in
    with_pages = resident_file_bytes()
    cast = opened.cast("w", torch.float32)
    after = resident_file_bytes()
    assert touched == weight.numel() and torch.equal(cast, weight.float())
    assert with_pages - before > 24 * MIB
    assert with_pages - after > 24 * MIB


def test_cast_on_read_casts_only_the_given_prefixes(tmp_path: Path) -> None:
    tensors = {"unet.w": torch.randn(4, 4, dtype=torch.float16),
               "vae.w": torch.randn(4, 4, dtype=torch.float16)}
    reader = CastOnRead(SafetensorsFile(write(tmp_path / "c.safetensors", tensors)),
                        {"unet.": torch.float32})
    assert reader["unet.w"].dtype == torch.float32
    assert reader["vae.w"].dtype == torch.float16
    assert set(reader) == set(tensors) and len(reader) == 2


def test_cast_on_read_works_on_tensors_already_in_memory() -> None:
    reader = CastOnRead({"a": torch.ones(2, dtype=torch.float16)}, {"": torch.bfloat16})
    assert reader["a"].dtype == torch.bfloat16


def test_shapes_through_cast_on_read_come_from_the_header(tmp_path: Path) -> None:
    opened = SafetensorsFile(write(tmp_path / "s.safetensors",
                                   {"a": torch.zeros(3, 5, dtype=torch.float16)}))

    class Untouchable(CastOnRead):
        def __getitem__(self, name: str) -> torch.Tensor:
            raise AssertionError(f"{name} was read")

    assert shapes_of(Untouchable(opened, {"": torch.float32})) == {"a": (3, 5)}


def test_an_fp16_checkpoint_loads_as_fp32_weights_equal_to_the_file_under_the_fp32_flags(
        tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path / "half.safetensors", "sd15", dtype=torch.float16)
    loaded = load_checkpoint(open_state_file(path), CONVERTED, BpeCache().get())
    stored = SafetensorsFile(path)
    parts = {"model.diffusion_model.": loaded.model.unet, "first_stage_model.": loaded.vae.module,
             "cond_stage_model.transformer.text_model.": loaded.clip.encoders["l"]}
    for prefix, module in parts.items():
        for name, value in module.state_dict().items():
            assert value.dtype == torch.float32, (prefix, name)
            assert torch.equal(value, stored[prefix + name].float()), (prefix, name)


def loaded_modules(path: Path) -> tuple[SafetensorsFile, list[torch.nn.Module]]:
    opened = open_state_file(path)
    loaded = load_checkpoint(opened, CONVERTED, BpeCache().get())
    return opened.tensors, [loaded.model.unet, loaded.vae.module, *loaded.clip.encoders.values()]


def test_no_weight_converted_from_an_fp16_file_stays_in_the_mapping(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path / "half.safetensors", "sd15", dtype=torch.float16)
    opened, modules = loaded_modules(path)
    for module in modules:
        for name, value in module.state_dict().items():
            assert not opened.holds(value), name


def test_an_fp32_file_loaded_as_fp32_is_the_only_copy_of_its_weights(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path / "full.safetensors", "sd15", dtype=torch.float32)
    opened, modules = loaded_modules(path)
    for module in modules:
        for name, value in module.named_parameters():
            assert opened.holds(value), name  # a view of the file's pages, not a copy

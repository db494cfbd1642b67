"""Nodes using comfy.lora the way community packs do: a block-weight LoRA loader written as
Inspire's LoraLoaderBlockWeight applies a file (key maps, load_lora, one add_patches call per
weight with its block's ratio), and a sampler that wraps comfy.lora.calculate_weight for its
own patch type while it samples, as Easy-Use's Fooocus inpaint patch does."""

import comfy.lora
import comfy.sample
import comfy.utils
import folder_paths
import torch


class PackBlockWeightLora:
    """A LoRA file applied weight by weight; the weights of `muted_block` (e.g.
    "input_blocks.1") get ratio 0 and are left out, every other weight ratio 1."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",),
                             "lora_name": ("STRING", {"default": ""}),
                             "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0}),
                             "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0}),
                             "muted_block": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, model, clip, lora_name, strength_model, strength_clip, muted_block):
        lora = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", lora_name),
                                           safe_load=True)
        key_map = comfy.lora.model_lora_keys_unet(model.model)
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        loaded = comfy.lora.load_lora(lora, key_map)
        new_model, new_clip = model.clone(), clip.clone()
        muted = f"diffusion_model.{muted_block}." if muted_block else None
        for key, patch in sorted(loaded.items(), key=lambda item: str(item[0])):
            name = key[0] if isinstance(key, tuple) else key
            ratio = 0.0 if muted and name.startswith(muted) else 1.0
            if ratio == 0.0:
                continue
            if "text" in name or "encoder" in name:
                new_clip.add_patches({key: patch}, strength_clip * ratio)
            else:
                new_model.add_patches({key: patch}, strength_model * ratio)
        return (new_model, new_clip)


class ScaledAddPatches:
    """Wraps comfy.lora.calculate_weight while it exists: entries ("pack_add", (tensor,)) are
    added here, the rest go to the function it wrapped; `calls` counts the entries it took."""

    def __init__(self):
        self.calls = 0
        self.original = None

    def calculate_weight(self, patches, weight, key, intermediate_dtype=torch.float32):
        remaining = []
        for patch in patches:
            value = patch[1]
            if isinstance(value, tuple) and len(value) == 2 and value[0] == "pack_add":
                self.calls += 1
                weight += patch[0] * value[1][0].to(weight.device, weight.dtype)
            else:
                remaining.append(patch)
        return self.original(remaining, weight, key, intermediate_dtype) if remaining else weight

    def __enter__(self):
        self.original = comfy.lora.calculate_weight
        comfy.lora.calculate_weight = self.calculate_weight
        return self

    def __exit__(self, *exc_info):
        comfy.lora.calculate_weight = self.original


class PackOwnPatchSample:
    """Adds 0.05 to one UNet weight as a "pack_add" patch (or a plain diff, `as_diff`) and
    samples, wrapping calculate_weight for "pack_add" when `wrap`; outputs the latent and how
    many pack_add entries the wrapper took."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",),
                             "negative": ("CONDITIONING",), "latent": ("LATENT",),
                             "key": ("STRING", {"default": ""}),
                             "as_diff": ("BOOLEAN", {"default": False}),
                             "wrap": ("BOOLEAN", {"default": True})}}

    RETURN_TYPES = ("LATENT", "INT")
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, model, positive, negative, latent, key, as_diff, wrap):
        patched = model.clone()
        change = torch.full_like(patched.model_state_dict()[key], 0.05)
        patched.add_patches({key: ("diff", (change,)) if as_diff else ("pack_add", (change,))})
        wrapper = ScaledAddPatches()
        image = latent["samples"]
        noise = comfy.sample.prepare_noise(image, 7)
        if wrap:
            with wrapper:
                samples = comfy.sample.sample(patched, noise, 2, 6.0, "euler", "normal",
                                              positive, negative, image, seed=7)
        else:
            samples = comfy.sample.sample(patched, noise, 2, 6.0, "euler", "normal", positive,
                                          negative, image, seed=7)
        return ({**latent, "samples": samples}, wrapper.calls)


NODE_CLASS_MAPPINGS = {"PackBlockWeightLora": PackBlockWeightLora,
                       "PackOwnPatchSample": PackOwnPatchSample}

"""Classic nodes using ComfyUI's module API the way community packs do."""

import os

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
import latent_preview
import node_helpers
import torch
from comfy_execution.graph import ExecutionBlocker

import nodes
from nodes import MAX_RESOLUTION

# Packs register their own model folders at import time.
folder_paths.folder_names_and_paths["basics_models"] = (
    [os.path.join(folder_paths.models_dir, "basics_models")], folder_paths.supported_pt_extensions)


class EncodeAndSample:
    """Encodes a prompt and samples with the core nodes called the classic way."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",), "clip": ("CLIP",), "latent": ("LATENT",),
            "positive": ("STRING", {"default": "a red fox"}),
            "negative": ("STRING", {"default": "blurry"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            "steps": ("INT", {"default": 2, "min": 1, "max": 100}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS,),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS,)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, model, clip, latent, positive, negative, seed, steps, sampler_name,
            scheduler):
        pos = nodes.CLIPTextEncode().encode(clip, positive)[0]
        neg = nodes.CLIPTextEncode().encode(clip, negative)[0]
        return nodes.common_ksampler(model, seed, steps, 6.0, sampler_name, scheduler, pos, neg,
                                     latent)


class SampleDirect:
    """comfy.sample.sample with prepare_noise and a latent_preview callback (Impact's way)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",),
                             "negative": ("CONDITIONING",), "latent": ("LATENT",),
                             "seed": ("INT", {"default": 0}), "steps": ("INT", {"default": 2})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, model, positive, negative, latent, seed, steps):
        image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        noise = comfy.sample.prepare_noise(image, seed, latent.get("batch_index"))
        callback = latent_preview.prepare_callback(model, steps)
        samples = comfy.sample.sample(model, noise, steps, 6.0, "euler", "normal", positive,
                                      negative, image, callback=callback, seed=seed)
        return ({**latent, "samples": samples},)


class ModelFacts:
    """Reads what packs read from a MODEL and passes a clone on."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL", "STRING")
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, model):
        clone = model.clone()
        clone.model_options["transformer_options"]["basics"] = "tag"
        sampling = clone.get_model_object("model_sampling")
        facts = (f"sigma_max={float(sampling.sigma_max):.4f} "
                 f"scale={clone.model.latent_format.scale_factor} "
                 f"clone={clone.is_clone(model)} dtype={clone.model_dtype()} "
                 f"device={comfy.model_management.get_torch_device().type}")
        return (clone, facts)


class CountSteps:
    """A ProgressBar over three steps."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": ("INT", {"default": 3, "max": MAX_RESOLUTION})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, steps):
        bar = comfy.utils.ProgressBar(steps)
        for _ in range(steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update(1)
        return (steps,)


class ListFiles:
    """Files of a model folder kind, through folder_paths."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": ("STRING", {"default": "checkpoints"})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, kind):
        return (",".join(folder_paths.get_filename_list(kind)),)


class HalfStrength:
    """node_helpers.conditioning_set_values on a CONDITIONING."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, conditioning):
        return (node_helpers.conditioning_set_values(conditioning, {"strength": 0.5}),)


class ScaleAttention:
    """An attention patch (as FreeU/PAG-style packs add): scales attn1's queries."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "scale": ("FLOAT", {"default": 2.0})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, model, scale):
        def patch(q, k, v, extra_options):
            return q * scale, k, v

        patched = model.clone()
        patched.set_model_attn1_patch(patch)
        return (patched,)


class GuidancePatches:
    """A post-CFG function that returns what it is given, and an optional embedding patch
    (a point Loom does not have)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "emb_patch": ("BOOLEAN",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, model, emb_patch):
        patched = model.clone()
        patched.set_model_sampler_post_cfg_function(lambda args: args["denoised"])
        if emb_patch:
            patched.set_model_emb_patch(lambda emb, options: emb)
        return (patched,)


class Upscale:
    """comfy.utils.common_upscale on an IMAGE."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, image):
        samples = image.movedim(-1, 1)
        scaled = comfy.utils.common_upscale(samples, samples.shape[3] * 2, samples.shape[2] * 2,
                                            "nearest-exact", "disabled")
        return (torch.clamp(scaled.movedim(1, -1), 0, 1),)


class LoadAndEncode:
    """comfy.sd.load_checkpoint_guess_config, CLIP tokenize/encode and a VAE round trip."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {"default": ""}),
                             "text": ("STRING", {"default": "a red fox"}),
                             "image": ("IMAGE",)}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "VAE", "LATENT", "INT")
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, ckpt_name, text, image):
        path = folder_paths.get_full_path("checkpoints", ckpt_name)
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path)
        tokens = clip.tokenize(text)
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        latent = vae.encode(image[:, :, :, :3])
        return (model, [[cond, {"pooled_output": pooled}]], vae, {"samples": latent},
                vae.downscale_ratio)


class MaybeBlock:
    """Passes an INT on, or blocks what consumes it (rgthree/Impact switches do this)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1}), "block": ("BOOLEAN",),
                             "message": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, value, block, message):
        return (ExecutionBlocker(message or None) if block else value,)


def sample_pack_euler(model, x, sigmas, extra_args=None, callback=None, disable=None,
                      step_scale=1.0):
    """A pack's own k-diffusion-style Euler sampler (step_scale 1: plain Euler)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        derivative = (x - denoised) / sigmas[i]
        x = x + derivative * (sigmas[i + 1] - sigmas[i]) * step_scale
    return x


class PackEulerSampler:
    """SAMPLER: the pack's own Euler function through comfy.samplers.KSAMPLER."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"step_scale": ("FLOAT", {"default": 1.0})}}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, step_scale):
        return (comfy.samplers.KSAMPLER(sample_pack_euler, {"step_scale": step_scale}),)


class EulerSampler(comfy.samplers.Sampler):
    """A pack's own comfy.samplers.Sampler: noise scaling and the steps done by itself."""

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
               denoise_mask=None, disable_pbar=False):
        sampling = model_wrap.inner_model.model_sampling
        x = sampling.noise_scaling(sigmas[0], noise, latent_image,
                                   self.max_denoise(model_wrap, sigmas))

        def report(step):
            callback(step["i"], step["denoised"], step["x"], len(sigmas) - 1)

        x = sample_pack_euler(model_wrap, x, sigmas, extra_args, callback=report)
        return sampling.inverse_noise_scaling(sigmas[-1], x)


class PackSamplerObject:
    """SAMPLER: an instance of the pack's Sampler subclass."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self):
        return (EulerSampler(),)


class BatchedCFGGuider(comfy.samplers.CFGGuider):
    """CFG written out with calc_cond_batch, as packs' guiders do."""

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        negative, positive = comfy.samplers.calc_cond_batch(
            self.inner_model, [self.conds.get("negative"), self.conds.get("positive")], x,
            timestep, model_options)
        return negative + (positive - negative) * self.cfg


class SamplingFunctionGuider(comfy.samplers.CFGGuider):
    """A guider that hands CFG back to comfy.samplers.sampling_function at half the scale."""

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        return comfy.samplers.sampling_function(
            self.inner_model, x, timestep, self.conds.get("negative"), self.conds.get("positive"),
            self.cfg / 2, model_options=model_options, seed=seed)


class PackGuider:
    """GUIDER: one of the pack's own CFGGuider subclasses."""

    KINDS = {"batched": BatchedCFGGuider, "sampling_function": SamplingFunctionGuider}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",),
                             "negative": ("CONDITIONING",), "cfg": ("FLOAT", {"default": 6.0}),
                             "kind": (list(cls.KINDS),)}}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, model, positive, negative, cfg, kind):
        guider = self.KINDS[kind](model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return (guider,)


class PackMerge:
    """ModelMergeSimple written as packs write merges: clone, get_key_patches, add_patches;
    `diff` instead adds 0.5 * the other model's weights as a raw diff patch."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model1": ("MODEL",), "model2": ("MODEL",),
                             "ratio": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0}),
                             "mode": (["merge", "diff", "lora_adapter"],)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, model1, model2, ratio, mode):
        merged = model1.clone()
        for key, patches in model2.get_key_patches("diffusion_model.").items():
            if mode == "merge":
                merged.add_patches({key: patches}, 1.0 - ratio, ratio)
            elif mode == "diff":
                merged.add_patches({key: (patches[0][0],)}, 0.5)
            else:
                merged.add_patches({key: object()}, 1.0)
        return (merged,)


class PackClipMerge:
    """CLIPMergeSimple written as packs write it: clone, get_key_patches, add_patches."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip1": ("CLIP",), "clip2": ("CLIP",),
                             "ratio": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "run"
    CATEGORY = "tests"

    def run(self, clip1, clip2, ratio):
        merged = clip1.clone()
        for key, patches in clip2.get_key_patches().items():
            if key.endswith(".position_ids") or key.endswith(".logit_scale"):
                continue
            merged.add_patches({key: patches}, 1.0 - ratio, ratio)
        return (merged,)


NODE_CLASS_MAPPINGS = {"PackEulerSampler": PackEulerSampler, "PackGuider": PackGuider,
                       "PackMerge": PackMerge, "PackClipMerge": PackClipMerge,
                       "PackSamplerObject": PackSamplerObject,
                       "MaybeBlock": MaybeBlock, "LoadAndEncode": LoadAndEncode,
                       "EncodeAndSample": EncodeAndSample,
                       "SampleDirect": SampleDirect,
                       "ModelFacts": ModelFacts, "CountSteps": CountSteps,
                       "ListFiles": ListFiles, "HalfStrength": HalfStrength,
                       "ScaleAttention": ScaleAttention, "GuidancePatches": GuidancePatches,
                       "BasicsUpscale": Upscale}

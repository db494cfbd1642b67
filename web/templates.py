"""The workflow templates of the editor's first screen (its Templates dialog), for what Loom
runs: SD1.5 text-to-image, image-to-image, inpainting, hires fix, SDXL base + refiner,
ControlNet, LoRA, area composition and upscaling with a model.

Served as the editor asks for ComfyUI's template package: GET /templates/index.json (the list),
/templates/<name>.json (an editor-format workflow) and /templates/<name>-1.png (its
thumbnail). Each workflow is built from the node schemas (web/template_graph.py); the file
names they expect are the usual release names, listed under "models"."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from web.template_graph import GraphBuilder, Socket, TemplateNode

SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SD15_INPAINT = "sd-v1-5-inpainting.safetensors"
SDXL_BASE = "sd_xl_base_1.0.safetensors"
SDXL_REFINER = "sd_xl_refiner_1.0.safetensors"
CANNY_CONTROLNET = "control_v11p_sd15_canny_fp16.safetensors"
LORA = "epiNoiseoffset_v2.safetensors"
UPSCALER = "RealESRGAN_x4plus.pth"
EXAMPLE_IMAGE = "example.png"  # upload your own image over it, or pick another in LoadImage

POSITIVE = "beautiful scenery nature glass bottle landscape, purple galaxy bottle"
NEGATIVE = "text, watermark"
SEED = 156680208700286


@dataclass(frozen=True)
class Template:
    """One entry of the Templates dialog and how to build its workflow."""

    name: str
    title: str
    description: str
    tags: tuple[str, ...]
    models: tuple[str, ...]
    build: Callable[[GraphBuilder], None]

    def index_entry(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "description": self.description,
                "mediaType": "image", "mediaSubtype": "png", "tags": list(self.tags),
                "models": list(self.models)}


def _checkpoint(graph: GraphBuilder, name: str, row: float = 0) -> TemplateNode:
    return graph.node("CheckpointLoaderSimple", [name], (0, row), height=98)


def _prompts(graph: GraphBuilder, clip: Socket, column: float = 1, row: float = 0,
             positive: str = POSITIVE) -> tuple[Socket, Socket]:
    good = graph.node("CLIPTextEncode", [positive], (column, row), "Positive prompt", clip=clip)
    bad = graph.node("CLIPTextEncode", [NEGATIVE], (column, row + 1), "Negative prompt",
                     clip=clip)
    return good.out(), bad.out()


def _sample(graph: GraphBuilder, model: Socket, conditioning: tuple[Socket, Socket],
            latent: Socket, at: tuple[float, float], steps: int = 20, denoise: float = 1.0,
            title: str | None = None) -> Socket:
    sampler = graph.node("KSampler", [SEED, "randomize", steps, 8.0, "euler", "normal", denoise],
                         at, title, model=model, positive=conditioning[0],
                         negative=conditioning[1], latent_image=latent)
    return sampler.out()


def _save(graph: GraphBuilder, samples: Socket, vae: Socket, column: float, row: float = 0,
          prefix: str = "ComfyUI") -> None:
    image = graph.node("VAEDecode", [], (column, row), samples=samples, vae=vae).out()
    graph.node("SaveImage", [prefix], (column + 1, row), height=300, images=image)


def text_to_image(graph: GraphBuilder) -> None:
    checkpoint = _checkpoint(graph, SD15)
    conditioning = _prompts(graph, checkpoint.out("CLIP"))
    latent = graph.node("EmptyLatentImage", [512, 512, 1], (1, 2)).out()
    samples = _sample(graph, checkpoint.out("MODEL"), conditioning, latent, (2, 0))
    _save(graph, samples, checkpoint.out("VAE"), 3)


def image_to_image(graph: GraphBuilder) -> None:
    checkpoint = _checkpoint(graph, SD15)
    conditioning = _prompts(graph, checkpoint.out("CLIP"))
    picture = graph.node("LoadImage", [EXAMPLE_IMAGE, "image"], (0, 1), height=320)
    latent = graph.node("VAEEncode", [], (1, 2), pixels=picture.out("IMAGE"),
                        vae=checkpoint.out("VAE")).out()
    samples = _sample(graph, checkpoint.out("MODEL"), conditioning, latent, (2, 0),
                      denoise=0.75)
    _save(graph, samples, checkpoint.out("VAE"), 3)


def inpainting(graph: GraphBuilder) -> None:
    checkpoint = _checkpoint(graph, SD15_INPAINT)
    conditioning = _prompts(graph, checkpoint.out("CLIP"))
    picture = graph.node("LoadImage", [EXAMPLE_IMAGE, "image"], (0, 1), height=320)
    latent = graph.node("VAEEncodeForInpaint", [6], (1, 2), pixels=picture.out("IMAGE"),
                        vae=checkpoint.out("VAE"), mask=picture.out("MASK")).out()
    samples = _sample(graph, checkpoint.out("MODEL"), conditioning, latent, (2, 0))
    _save(graph, samples, checkpoint.out("VAE"), 3)


def hires_fix(graph: GraphBuilder) -> None:
    checkpoint = _checkpoint(graph, SD15)
    conditioning = _prompts(graph, checkpoint.out("CLIP"))
    latent = graph.node("EmptyLatentImage", [512, 512, 1], (1, 2)).out()
    model = checkpoint.out("MODEL")
    first = _sample(graph, model, conditioning, latent, (2, 0), title="First pass")
    bigger = graph.node("LatentUpscaleBy", ["nearest-exact", 1.5], (2, 2), samples=first).out()
    second = _sample(graph, model, conditioning, bigger, (3, 0), steps=15, denoise=0.5,
                     title="Second pass (hires)")
    _save(graph, second, checkpoint.out("VAE"), 4)


def _advanced(graph: GraphBuilder, model: Socket, conditioning: tuple[Socket, Socket],
              latent: Socket, at: tuple[float, float], base: bool, title: str) -> Socket:
    window = ["enable", SEED, "randomize", 25, 8.0, "euler", "normal", 0, 20, "enable"] if base \
        else ["disable", SEED, "randomize", 25, 8.0, "euler", "normal", 20, 10000, "disable"]
    return graph.node("KSamplerAdvanced", window, at, title, model=model,
                      positive=conditioning[0], negative=conditioning[1],
                      latent_image=latent).out()


def sdxl_base_refiner(graph: GraphBuilder) -> None:
    base = _checkpoint(graph, SDXL_BASE)
    refiner = _checkpoint(graph, SDXL_REFINER, row=2)
    base_conditioning = _prompts(graph, base.out("CLIP"))
    refiner_conditioning = _prompts(graph, refiner.out("CLIP"), row=2)
    latent = graph.node("EmptyLatentImage", [1024, 1024, 1], (1, 4)).out()
    rough = _advanced(graph, base.out("MODEL"), base_conditioning, latent, (2, 0), True,
                      "Base: steps 0-20")
    refined = _advanced(graph, refiner.out("MODEL"), refiner_conditioning, rough, (2, 2), False,
                        "Refiner: steps 20-25")
    _save(graph, refined, refiner.out("VAE"), 3)


def controlnet(graph: GraphBuilder) -> None:
    checkpoint = _checkpoint(graph, SD15)
    conditioning = _prompts(graph, checkpoint.out("CLIP"))
    picture = graph.node("LoadImage", [EXAMPLE_IMAGE, "image"], (0, 1), height=320)
    edges = graph.node("Canny", [0.4, 0.8], (0, 3), image=picture.out("IMAGE")).out()
    control = graph.node("ControlNetLoader", [CANNY_CONTROLNET], (1, 2)).out()
    applied = graph.node("ControlNetApplyAdvanced", [1.0, 0.0, 1.0], (2, 0),
                         positive=conditioning[0], negative=conditioning[1],
                         control_net=control, image=edges, vae=checkpoint.out("VAE"))
    latent = graph.node("EmptyLatentImage", [512, 512, 1], (2, 2)).out()
    samples = _sample(graph, checkpoint.out("MODEL"),
                      (applied.out("positive"), applied.out("negative")), latent, (3, 0))
    _save(graph, samples, checkpoint.out("VAE"), 4)


def lora(graph: GraphBuilder) -> None:
    checkpoint = _checkpoint(graph, SD15)
    patched = graph.node("LoraLoader", [LORA, 1.0, 1.0], (1, 0), model=checkpoint.out("MODEL"),
                         clip=checkpoint.out("CLIP"))
    conditioning = _prompts(graph, patched.out("CLIP"), column=2)
    latent = graph.node("EmptyLatentImage", [512, 512, 1], (2, 2)).out()
    samples = _sample(graph, patched.out("MODEL"), conditioning, latent, (3, 0))
    _save(graph, samples, checkpoint.out("VAE"), 4)


def area_composition(graph: GraphBuilder) -> None:
    checkpoint = _checkpoint(graph, SD15)
    clip = checkpoint.out("CLIP")
    scene, negative = _prompts(graph, clip, positive="a meadow by a lake at sunset, "
                                                     "mountains in the distance")
    subject = graph.node("CLIPTextEncode", ["a red fox sitting in the grass"], (1, 2),
                         "Prompt for the right half", clip=clip).out()
    placed = graph.node("ConditioningSetArea", [384, 512, 384, 0, 1.0], (2, 2),
                        conditioning=subject).out()
    combined = graph.node("ConditioningCombine", [], (2, 0), conditioning_1=scene,
                          conditioning_2=placed).out()
    latent = graph.node("EmptyLatentImage", [768, 512, 1], (2, 3)).out()
    samples = _sample(graph, checkpoint.out("MODEL"), (combined, negative), latent, (3, 0))
    _save(graph, samples, checkpoint.out("VAE"), 4)


def upscale_with_model(graph: GraphBuilder) -> None:
    picture = graph.node("LoadImage", [EXAMPLE_IMAGE, "image"], (0, 0), height=320)
    model = graph.node("UpscaleModelLoader", [UPSCALER], (0, 1.6)).out()
    bigger = graph.node("ImageUpscaleWithModel", [], (1, 0), upscale_model=model,
                        image=picture.out("IMAGE")).out()
    graph.node("SaveImage", ["ComfyUI_upscaled"], (2, 0), height=300, images=bigger)


TEMPLATES = (
    Template("loom-sd15-text-to-image", "Text to Image (SD1.5)",
             "Generate an image from a prompt with a Stable Diffusion 1.5 checkpoint.",
             ("Text to Image",), (SD15,), text_to_image),
    Template("loom-sd15-image-to-image", "Image to Image (SD1.5)",
             "Redraw an input image from a prompt; denoise sets how much changes.",
             ("Image to Image",), (SD15,), image_to_image),
    Template("loom-sd15-inpainting", "Inpainting (SD1.5)",
             "Repaint the masked part of an image (paint the mask in the image's mask editor) "
             "with an inpainting checkpoint.", ("Inpainting",), (SD15_INPAINT,), inpainting),
    Template("loom-sd15-hires-fix", "Hires Fix (two passes)",
             "Generate at 512, upscale the latent 1.5x and refine it in a second pass.",
             ("Text to Image", "Upscale"), (SD15,), hires_fix),
    Template("loom-sdxl-base-refiner", "SDXL Base + Refiner",
             "SDXL base for the first 20 of 25 steps, the refiner for the rest.",
             ("Text to Image", "SDXL"), (SDXL_BASE, SDXL_REFINER), sdxl_base_refiner),
    Template("loom-sd15-controlnet-canny", "ControlNet (Canny edges)",
             "Follow the edges of an input image with a Canny ControlNet.",
             ("ControlNet",), (SD15, CANNY_CONTROLNET), controlnet),
    Template("loom-sd15-lora", "LoRA",
             "Apply a LoRA to the model and the text encoder.", ("LoRA",), (SD15, LORA), lora),
    Template("loom-sd15-area-composition", "Area Composition",
             "One prompt for the whole picture, another for its right half.",
             ("Area Composition",), (SD15,), area_composition),
    Template("loom-upscale-with-model", "Upscale with a Model",
             "Enlarge an image 4x with an ESRGAN-family upscale model.",
             ("Upscale",), (UPSCALER,), upscale_with_model),
)


class TemplateNotFound(KeyError):
    """No template of that name."""


def template_index() -> list[dict[str, Any]]:
    """GET /templates/index.json: one module of Loom's templates."""
    return [{"moduleName": "default", "title": "Loom", "type": "image", "category": "Loom",
             "templates": [template.index_entry() for template in TEMPLATES]}]


def build_template(name: str, schemas: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The editor-format workflow of template `name`."""
    for template in TEMPLATES:
        if template.name == name:
            graph = GraphBuilder(schemas)
            template.build(graph)
            return graph.workflow()
    raise TemplateNotFound(f"no template named {name!r}; the templates are "
                           f"{[template.name for template in TEMPLATES]}")

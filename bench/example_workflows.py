"""ComfyUI's own SD-era example workflows, validated and run in-process on tiny stand-in models.

`python bench/example_workflows.py EXAMPLES_DIR [--only TEXT ...] [--shrink N] [--steps N]`

EXAMPLES_DIR is a checkout of ComfyUI's examples repository (ComfyUI_examples). Every image
(PNG text chunk / WebP EXIF) and .json under the SD1.x/SD2.x/SDXL folders that carries a
workflow is taken in the editor format when it has one, else as its API prompt. Each gets a
fresh base folder with stand-ins named exactly as its loaders ask: tiny random checkpoints,
VAEs, ControlNets, T2I-Adapters, LoRAs, hypernetworks, embeddings, CLIP vision towers and
upscalers in the real key layouts (the engine's writers), and grey input images for LoadImage.
It is converted with Loom's converter, validated, and run on the CPU in fp32.

Stand-in limits, stated rather than hidden: a tiny UNet's config lives in safetensors metadata,
so a checkpoint, ControlNet or GLIGEN the workflow names as a pickle (.ckpt/.pth) is written as
.safetensors under the same stem and the workflow's name is changed to it; every other pickle
(VAE, T2I-Adapter, upscaler, hypernetwork, embedding) is written as a pickle and loaded as
with --allow-pickle-checkpoints. Models a workflow names are picked by name (a *xl* checkpoint
is SDXL, *xl_edit* the 8-channel CosXL edit model with its EDM v-prediction marker, *refiner*
the SDXL refiner, *unclip* SD 2.1 unCLIP-H, *inpainting* the 9-channel inpainting UNet, v2-1
and WD 1.5 SD 2.x v-prediction, anything else SD1.5); add-ons follow the workflow's checkpoint
family. With --shrink N (default 8) every pixel size the workflow states
(latent sizes, areas, offsets, paddings, image scales) is divided by N, and with --steps N
(default 2) no sampler takes more than N steps (KSamplerAdvanced's start/end steps keep their
share of the schedule), to keep CPU runs short: this checks that the graphs work, not images.

One row per workflow (validates, runs, the first error), then folders skipped with the reason
and a last line `examples=<n> validate=<n> run=<n>`.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.example_standins import StandIns  # noqa: E402
from engine.context import Services  # noqa: E402
from engine.diffusion.memory.devices import DevicePolicy  # noqa: E402
from engine.diffusion.memory.model_manager import ModelManager  # noqa: E402
from engine.executor import Executor  # noqa: E402
from engine.paths import Paths  # noqa: E402
from engine.registry import NodeRegistry  # noqa: E402
from engine.validation import validate_prompt  # noqa: E402
from engine.workflow import WorkflowFormatError, read_workflow_file, to_api_prompt  # noqa: E402
from nodes import builtin_node_types  # noqa: E402

SD_ERA = ("2_pass_txt2img", "area_composition", "controlnet", "edit_models", "gligen",
          "hypernetworks", "img2img", "inpaint", "lcm", "lora", "model_merging",
          "noisy_latent_composition", "sdturbo", "sdxl", "textual_inversion_embeddings",
          "unclip", "upscale_models")
SKIPPED = {
    "3d": "Stable Zero123 (a novel-view model with its own conditioning, not SD1/SD2/SDXL)",
    "audio": "audio models (Stable Audio, ACE-Step)",
    "aura_flow": "AuraFlow", "chroma": "Chroma (Flux-derived)", "cosmos": "Cosmos video",
    "cosmos_predict2": "Cosmos Predict2", "flux": "Flux", "flux2": "Flux 2",
    "hidream": "HiDream", "hunyuan_dit": "Hunyuan-DiT", "hunyuan_image": "HunyuanImage",
    "hunyuan_video": "Hunyuan video", "latent_preview": "no workflow (a web page)",
    "ltxv": "LTX video", "lumina2": "Lumina 2", "mochi": "Mochi video",
    "omnigen": "OmniGen 2", "qwen_image": "Qwen-Image", "sd3": "SD3/SD3.5",
    "stable_cascade": "Stable Cascade", "video": "Stable Video Diffusion (video)",
    "wan": "Wan 2.1 video", "wan22": "Wan 2.2 video", "z_image": "Z-Image",
    "faq": "no workflow (a README)",
}
# (class_type, input) pixel sizes and offsets --shrink divides; latent sizes stay multiples of 8
PIXEL_INPUTS = {
    "EmptyLatentImage": ("width", "height"), "LatentUpscale": ("width", "height"),
    "ImageScale": ("width", "height"), "ConditioningSetArea": ("width", "height", "x", "y"),
    "LatentComposite": ("x", "y", "feather"),
    "ImagePadForOutpaint": ("left", "top", "right", "bottom", "feathering"),
    "GLIGENTextBoxApply": ("width", "height", "x", "y"),
    "CLIPTextEncodeSDXL": ("width", "height", "crop_w", "crop_h", "target_width",
                           "target_height"),
}
INPUT_IMAGE_SIZE = 512  # LoadImage stand-ins before --shrink
# (class_type, steps input, step-index inputs scaled with it) that --steps caps
STEP_INPUTS = {"KSampler": ("steps", ()), "BasicScheduler": ("steps", ()),
               "KSamplerAdvanced": ("steps", ("start_at_step", "end_at_step"))}


@dataclass
class Outcome:
    """One workflow's result: validated, ran, and the first problem."""

    name: str
    source: str
    validates: bool = False
    runs: bool = False
    error: str = ""
    seconds: float = 0.0

    def row(self) -> str:
        flags = f"validate={'yes' if self.validates else 'NO'} run={'yes' if self.runs else 'NO'}"
        tail = f"  {self.error}" if self.error else ""
        return f"{self.name:<62} {self.source:<8} {flags} {self.seconds:6.1f}s{tail}"


def workflow_files(root: Path, only: list[str]) -> Iterator[Path]:
    for folder in SD_ERA:
        for path in sorted((root / folder).glob("*")):
            wanted = not only or any(text in str(path) for text in only)
            if path.suffix.lower() in (".png", ".webp", ".json") and wanted:
                yield path


def read_example(path: Path) -> tuple[dict[str, Any], str] | None:
    """(workflow, "editor" | "api") of a file, or None when it carries none (input images)."""
    try:
        prompt, workflow = read_workflow_file(path)
    except WorkflowFormatError:
        return None
    return (workflow, "editor") if workflow is not None else (prompt or {}, "api")


def shrink(api: dict[str, Any], factor: int) -> None:
    """Divide the pixel sizes of `api` by `factor` in place: multiples of 8, sizes at least
    64 (ConditioningSetArea's minimum)."""
    for body in api.values():
        for name in PIXEL_INPUTS.get(body.get("class_type"), ()):
            value = body["inputs"].get(name)
            if isinstance(value, int) and not isinstance(value, bool) and factor > 1:
                smaller = value // factor
                smaller -= smaller % 8
                body["inputs"][name] = max(64, smaller) if "width" in name or "height" in name \
                    else smaller


def cap_steps(api: dict[str, Any], cap: int) -> None:
    """At most `cap` sampling steps per sampler; KSamplerAdvanced's start/end steps keep their
    fraction of the schedule (an end past the last step stays past it)."""
    for body in api.values():
        steps_name, indices = STEP_INPUTS.get(body.get("class_type"), ("", ()))
        inputs = body["inputs"]
        steps = inputs.get(steps_name)
        if not isinstance(steps, int) or steps <= cap:
            continue
        inputs[steps_name] = cap
        for name in indices:
            value = inputs.get(name)
            if isinstance(value, int):
                inputs[name] = value if value >= steps else round(value * cap / steps)


class Harness:
    """The built-in nodes and a fresh engine over one temporary base folder per workflow."""

    def __init__(self, factor: int, steps: int) -> None:
        self.factor = factor
        self.steps = steps
        self.registry = NodeRegistry()
        self.registry.register_all(builtin_node_types())

    def check(self, path: Path, root: Path) -> Outcome | None:
        example = read_example(path)
        if example is None:
            return None
        data, source = example
        outcome = Outcome(str(path.relative_to(root)), source)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="loom-example-") as temp:
            try:
                self._check(copy.deepcopy(data), source, Path(temp), outcome)
            except Exception as error:  # noqa: BLE001 - a harness row, not a crash
                outcome.error = f"harness: {type(error).__name__}: {error}"
                traceback.print_exc(file=sys.stderr)
        outcome.seconds = time.perf_counter() - started
        return outcome

    def _check(self, data: dict[str, Any], source: str, base: Path, outcome: Outcome) -> None:
        manager = ModelManager(DevicePolicy.decide(cpu=True, force_fp32=True),
                               allow_pickle=True)
        services = Services(Paths.from_base(base), model_manager=manager)
        api = (to_api_prompt(data, self.registry.object_info(services)) if source == "editor"
               else data)
        shrink(api, self.factor)
        cap_steps(api, self.steps)
        StandIns(base, INPUT_IMAGE_SIZE // self.factor).provide(api)
        checked = validate_prompt(api, self.registry, services)
        if checked.error is not None or checked.node_errors:
            outcome.error = "validation: " + describe_validation(checked.to_json())
            return
        outcome.validates = True
        result = Executor(self.registry, services).execute(checked.prompt, checked.outputs)
        outcome.runs = result.ok
        if not result.ok:
            outcome.error = "run: " + describe_run(result.error)


def describe_validation(report: dict[str, Any]) -> str:
    problems = [f"{node_id}: {error.get('message')} ({error.get('details', '')})"
                for node_id, body in report["node_errors"].items()
                for error in body.get("errors", [])]
    if report["error"] and not problems:
        problems.append(f"{report['error'].get('message')} ({report['error'].get('details')})")
    return "; ".join(problems)[:400]


def describe_run(error: dict[str, Any] | None) -> str:
    if not error:
        return "unknown"
    return (f"{error.get('node_type')} #{error.get('node_id')}: {error.get('exception_type')}: "
            f"{error.get('exception_message')}")[:400]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("examples", type=Path, help="a ComfyUI_examples checkout")
    parser.add_argument("--only", nargs="*", default=[],
                        help="check only files whose path contains one of these texts")
    parser.add_argument("--shrink", type=int, default=8,
                        help="divide pixel sizes by this (1: the workflow's own sizes)")
    parser.add_argument("--steps", type=int, default=2,
                        help="at most this many sampling steps per sampler (start/end steps "
                             "scaled with it)")
    args = parser.parse_args(argv)
    harness = Harness(args.shrink, args.steps)
    outcomes = []
    for path in workflow_files(args.examples, args.only):
        outcome = harness.check(path, args.examples)
        if outcome is None:
            print(f"{path.relative_to(args.examples)}: no workflow (an input image)")
            continue
        outcomes.append(outcome)
        print(outcome.row(), flush=True)
    for folder, reason in sorted(SKIPPED.items()):
        print(f"skipped {folder}/: {reason}")
    print(f"examples={len(outcomes)} validate={sum(o.validates for o in outcomes)} "
          f"run={sum(o.runs for o in outcomes)}")


if __name__ == "__main__":
    main()

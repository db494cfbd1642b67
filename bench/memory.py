"""Peak memory of cold `main.py run` workflows on full-size checkpoints written by the project's
writer: SD1.5 txt2img at 512x512 (the released fp32 file, and the same weights as fp16) and
SDXL base txt2img at 1024x1024 (the released fp16 file), each in a fresh process, against the
floor: what the weights alone need in the dtypes the device policy holds them in (a 16-bit file
computed in fp32 is held as stored: memory/cast_on_use.py).

Memory is read from /proc/<pid>/status every few milliseconds while the run goes: VmRSS split
into anonymous (RssAnon: weights converted or copied, activations, Python and torch) and
file-backed (RssFile: pages of the memory-mapped checkpoint the process has touched); the
peak is VmHWM (the kernel's high-water mark, checked against wait4's ru_maxrss). Each
workflow node's peak is shown so the phase that sets the peak is visible. GB are 2**30 bytes.

Peak memory does not depend on the step count (every step allocates and frees the same
activations), so the runs sample 1 step by default (--steps to change); image size, batch
and CFG are the real ones. The page cache is warm (the files were just written or read): the
runs are cold processes, not cold disks. Checkpoints are written once into --models-dir
(SD1.5 fp32 4.3 GB, fp16 2.1 GB, SDXL fp16 6.9 GB) and reused.

Needs ~6 GB of RAM for SD1.5. SDXL's floor is 6.5 GB (its fp16 file held as stored; 12.9 GB
with --fp32-unet --fp32-text-enc --fp32-vae), so its run needs ~11 GB: pick the cases that fit
with --cases (a case not run prints its floor when its file exists, and nan as its peak).
With `--comfyui DIR` each case also runs in a fresh ComfyUI server from that checkout (`--cpu`,
no custom nodes, its default dtypes: fp32 UNet and VAE, text encoders held in fp16 on a CPU),
sent the same workflow through POST /prompt and stopped once its history entry is written; the
whole server process is watched the same way, start included, and Loom / ComfyUI is printed.

Last line: `sd15_peak_gb=<float> sdxl_peak_gb=<float> floor_sd15_gb=<float>
floor_sdxl_gb=<float>` (SD1.5 from its fp32 file, SDXL from its fp16 file), with
`comfyui_sd15_peak_gb=<float> comfyui_sdxl_peak_gb=<float>` after them under --comfyui.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.custom_nodes_startup import free_port, wait_until_answering  # noqa: E402

GIB = 2**30
POLL_SECONDS = 0.005
PROMPTS = ("a photograph of an astronaut riding a horse on the moon", "")


@dataclass(frozen=True)
class Case:
    """One measured run: a checkpoint file and the image size its family is made for."""

    name: str
    kind: str  # the writer's checkpoint kind
    dtype: str  # the file's weight dtype
    size: int  # image width and height
    pair: bool = False  # two checkpoints (the file and a copy), one txt2img each

    @property
    def file_name(self) -> str:
        return f"{self.kind}_full_{self.dtype}.safetensors"

    @property
    def file_names(self) -> tuple[str, ...]:
        copy = f"{self.kind}_full_{self.dtype}_copy.safetensors"
        return (self.file_name, copy) if self.pair else (self.file_name,)


CASES = (Case("sd15", "sd15", "fp32", 512), Case("sd15_fp16_file", "sd15", "fp16", 512),
         Case("sdxl", "sdxl_base", "fp16", 1024),
         # two SDXL checkpoints in one workflow, for --model-ram-budget: the peak against the
         # budget plus one model (512x512 keeps the two samplings short; weights set the peak)
         Case("sdxl_pair", "sdxl_base", "fp16", 512, pair=True))


@dataclass
class Sample:
    """Resident memory of the child at one moment, in bytes."""

    anon: int = 0
    file: int = 0

    @property
    def total(self) -> int:
        return self.anon + self.file


@dataclass
class Measurement:
    """What one run used: the peak, the sample at the peak and each node's peak."""

    hwm: int = 0
    at_peak: Sample = field(default_factory=Sample)
    by_node: dict[str, Sample] = field(default_factory=dict)
    ru_maxrss: int = 0
    seconds: float = 0.0
    node: str = "startup"


# ---- the checkpoints and the workflow -----------------------------------------------------

def ensure_checkpoint(models_dir: Path, case: Case) -> Path:
    """The case's checkpoint, written by the project's writer (in a child process, so this
    process stays small) when missing."""
    path = models_dir / case.file_name
    if not path.exists():
        models_dir.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} ...", flush=True)
        partial = path.with_suffix(".partial")
        subprocess.run([sys.executable, "-m", "engine.diffusion.checkpoints.writer",
                        str(partial), case.kind, "--full", "--dtype", case.dtype],
                       cwd=ROOT, check=True)
        partial.rename(path)
    for name in case.file_names[1:]:  # the pair's second checkpoint: another file, same bytes
        if not (models_dir / name).exists():
            shutil.copyfile(path, models_dir / f"{name}.partial")
            (models_dir / f"{name}.partial").rename(models_dir / name)
    return path


def workflow(case: Case, steps: int) -> dict:
    """txt2img in the API format for each of the case's checkpoints (node ids 1-7, 11-17)."""
    nodes = {}
    for index, file_name in enumerate(case.file_names):
        nodes.update({str(10 * index + int(key)): body
                      for key, body in txt2img(case, file_name, steps, 10 * index).items()})
    return nodes


def txt2img(case: Case, file_name: str, steps: int, offset: int) -> dict:
    """Checkpoint, two prompts, KSampler, VAE decode, save; links shifted by `offset`."""
    def link(node: int, output: int) -> list:
        return [str(node + offset), output]

    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": file_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPTS[0], "clip": link(1, 1)}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPTS[1], "clip": link(1, 1)}},
        "4": {"class_type": "EmptyLatentImage",
              "inputs": {"width": case.size, "height": case.size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "seed": 0, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0, "model": link(1, 0), "positive": link(2, 0),
            "negative": link(3, 0), "latent_image": link(4, 0)}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": link(5, 0), "vae": link(1, 2)}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": case.name,
                                                    "images": link(6, 0)}},
    }


def floor_bytes(path: Path, loom_flags: list[str]) -> int:
    """Bytes of the checkpoint's UNet, text encoder and VAE weights in the dtypes the device
    policy (with `loom_flags`) holds them in: what holding the weights once costs."""
    from engine.diffusion.checkpoints.loader import checkpoint_weight_bytes
    from engine.diffusion.checkpoints.state_files import open_state_file
    from engine.diffusion.memory.devices import DevicePolicy
    from main import build_parser

    policy = DevicePolicy.from_args(build_parser()[1].parse_args(["-", *loom_flags]))
    return checkpoint_weight_bytes(open_state_file(path), policy)


# ---- running and watching one child -----------------------------------------------------

def read_status(pid: int) -> dict[str, int] | None:
    """VmHWM, RssAnon and RssFile of a process in bytes; None once it has gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields if len(fields) == 3 else None


def follow_output(stream: object, measurement: Measurement, verbose: bool) -> None:
    """Track which node runs from the CLI's 'running node N (Class)' lines, printing each
    node's peak as the next one starts (a run stopped by a time limit still shows them)."""
    for line in stream:  # type: ignore[attr-defined]
        if line.startswith("running node "):
            print_node(measurement.node, measurement.by_node.get(measurement.node, Sample()))
            measurement.node = line.removeprefix("running node ").strip()
        if verbose or line.startswith(("error", "done")):
            print("    " + line.rstrip(), flush=True)


def watch(pid: int, measurement: Measurement, stop: threading.Event) -> None:
    while not stop.is_set():
        status = read_status(pid)
        if status is None:
            return
        sample = Sample(status["RssAnon"], status["RssFile"])
        node = measurement.by_node.setdefault(measurement.node, Sample())
        if sample.total > node.total:
            measurement.by_node[measurement.node] = sample
        if sample.total > measurement.at_peak.total:
            measurement.at_peak = sample
        measurement.hwm = max(measurement.hwm, status["VmHWM"])
        time.sleep(POLL_SECONDS)


def run_case(case: Case, models_dir: Path, steps: int, loom_flags: list[str],
             verbose: bool) -> Measurement:
    """One cold `main.py run` of the case's workflow, watched from outside."""
    with tempfile.TemporaryDirectory(prefix="loom_memory_bench_") as base:
        base_dir = Path(base)
        write_model_paths(base_dir, models_dir)  # read from the base directory
        (base_dir / "workflow.json").write_text(json.dumps(workflow(case, steps)))
        command = [sys.executable, str(ROOT / "main.py"), "run", str(base_dir / "workflow.json"),
                   "--base-directory", str(base_dir), *loom_flags]
        measurement = Measurement()
        signal.signal(signal.SIGTERM, lambda *_: stopped(measurement))
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        with watching(child, measurement):
            follow_output(child.stdout, measurement, verbose)
        measurement.seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise RuntimeError(f"{case.name}: main.py run exited with {child.returncode}; its "
                           f"output is above (run with --verbose for all of it)")
    return measurement


def write_model_paths(base_dir: Path, models_dir: Path) -> Path:
    """An extra_model_paths.yaml (the same format for Loom and ComfyUI) naming the models."""
    path = base_dir / "extra_model_paths.yaml"
    path.write_text(f"bench:\n  base_path: {models_dir}\n  checkpoints: .\n")
    return path


@contextmanager
def watching(child: subprocess.Popen, measurement: Measurement) -> Iterator[None]:
    """Sample the child's memory until the block ends, then reap it (terminating it if it still
    runs) and record its ru_maxrss."""
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(child.pid, measurement, stop))
    watcher.start()
    try:
        yield
    finally:
        if child.returncode is None:  # not reaped by a poll() yet: reap it here, with its usage
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid == 0:  # still running (a server): stop it
                child.terminate()
                pid, status, usage = os.wait4(child.pid, 0)
            child.returncode = os.waitstatus_to_exitcode(status)
            measurement.ru_maxrss = usage.ru_maxrss * 1024
        stop.set()
        watcher.join()


# ---- the peer: a fresh ComfyUI server running the same workflow --------------------------

def run_comfyui(case: Case, models_dir: Path, steps: int, comfyui: Path, python: str,
                ) -> Measurement:
    """A fresh ComfyUI server (--cpu, no custom nodes, its own default dtypes) started, sent
    the case's workflow through POST /prompt and stopped once its history entry is there:
    the whole process watched, as a ComfyUI user running one workflow gets it."""
    with tempfile.TemporaryDirectory(prefix="comfyui_memory_bench_") as base:
        base_dir = Path(base)
        port = free_port()
        command = [python, str(comfyui / "main.py"), "--cpu", "--listen", "127.0.0.1",
                   "--port", str(port), "--base-directory", base, "--disable-auto-launch",
                   "--disable-all-custom-nodes", "--extra-model-paths-config",
                   str(write_model_paths(base_dir, models_dir))]
        measurement = Measurement(node="ComfyUI start")
        start = time.perf_counter()
        with (base_dir / "server.log").open("w") as log:
            child = subprocess.Popen(command, cwd=comfyui, stdout=log, stderr=subprocess.STDOUT)
            with watching(child, measurement):
                wait_until_answering(child, f"http://127.0.0.1:{port}/system_stats", 600.0)
                measurement.node = "ComfyUI prompt"
                outcome = run_prompt(port, workflow(case, steps), child)
        measurement.seconds = time.perf_counter() - start
        if outcome != "success":
            tail = (base_dir / "server.log").read_text()[-3000:]
            raise RuntimeError(f"{case.name}: ComfyUI's run ended with {outcome!r}:\n{tail}")
    return measurement


def http_json(port: int, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def run_prompt(port: int, prompt: dict, child: subprocess.Popen) -> str:
    """Queue the prompt and wait for its history entry; its status string."""
    prompt_id = http_json(port, "/prompt", {"prompt": prompt, "client_id": "memory-bench"})[
        "prompt_id"]
    while child.poll() is None:
        entry = http_json(port, f"/history/{prompt_id}").get(prompt_id)
        if entry is not None:
            return str(entry.get("status", {}).get("status_str"))
        time.sleep(0.25)
    return f"server exited with {child.returncode}"


def stopped(measurement: Measurement) -> None:
    """On SIGTERM (a time limit such as `timeout 900`): print what was measured, then exit."""
    print_node(measurement.node, measurement.by_node.get(measurement.node, Sample()))
    print(f"  stopped by SIGTERM in {measurement.node}: peak so far {gb(measurement.hwm)} GB "
          f"({gb(measurement.at_peak.anon)} anonymous + {gb(measurement.at_peak.file)} "
          f"file-backed)", flush=True)
    raise SystemExit(124)


# ---- the report ---------------------------------------------------------------------------

def gb(value: int) -> str:
    return f"{value / GIB:.2f}"


def print_case(case: Case, measurement: Measurement, floor: int) -> None:
    peak = max(measurement.hwm, measurement.ru_maxrss)
    print(f"  {case.name}: peak {gb(peak)} GB (ru_maxrss {gb(measurement.ru_maxrss)}), at the "
          f"peak {gb(measurement.at_peak.anon)} anonymous + {gb(measurement.at_peak.file)} "
          f"file-backed; floor {gb(floor)} GB, peak/floor {peak / floor:.2f}; "
          f"{measurement.seconds:.0f} s")
    for node, sample in measurement.by_node.items():
        print_node(node, sample)


def print_node(node: str, sample: Sample) -> None:
    print(f"    {node:<34} peak {gb(sample.total):>6} = {gb(sample.anon):>6} anon "
          f"+ {gb(sample.file):>6} file", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "loom-bench-models",
                        help="where the full-size checkpoints are (written once if missing)")
    parser.add_argument("--cases", nargs="+", choices=[c.name for c in CASES],
                        default=[c.name for c in CASES])
    parser.add_argument("--steps", type=int, default=1, help="sampling steps per run")
    parser.add_argument("--loom-flag", action="append", default=[], dest="loom_flags",
                        help="a flag for main.py run, e.g. --loom-flag=--force-fp32")
    parser.add_argument("--verbose", action="store_true", help="show the runs' output")
    parser.add_argument("--comfyui", type=Path, metavar="DIR",
                        help="a ComfyUI checkout: run each case in a fresh ComfyUI server too "
                             "(its default dtypes, --cpu) and print Loom / ComfyUI")
    parser.add_argument("--comfyui-python", default=sys.executable,
                        help="the Python that runs ComfyUI (default: this one)")
    args = parser.parse_args()

    peaks, floors, peer = {}, {}, {}
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {args.steps} "
          f"step(s) per run; flags: {' '.join(args.loom_flags) or 'none'}")
    for case in CASES:
        if case.name not in args.cases:  # its floor needs only the file's header
            path = args.models_dir / case.file_name
            if path.exists():
                floors[case.name] = floor_bytes(path, args.loom_flags)
                print(f"  {case.name}: not run; floor {gb(floors[case.name])} GB")
            continue
        path = ensure_checkpoint(args.models_dir, case)
        floors[case.name] = floor_bytes(path, args.loom_flags)
        measurement = run_case(case, args.models_dir, args.steps, args.loom_flags, args.verbose)
        peaks[case.name] = max(measurement.hwm, measurement.ru_maxrss)
        print_case(case, measurement, floors[case.name])
        if args.comfyui is not None:
            theirs = run_comfyui(case, args.models_dir, args.steps, args.comfyui,
                                 args.comfyui_python)
            peer[case.name] = max(theirs.hwm, theirs.ru_maxrss)
            print_peer(case, theirs, peaks[case.name])
    figure = lambda table, name: f"{table[name] / GIB:.3f}" if name in table else "nan"  # noqa: E731
    last = (f"sd15_peak_gb={figure(peaks, 'sd15')} sdxl_peak_gb={figure(peaks, 'sdxl')} "
            f"floor_sd15_gb={figure(floors, 'sd15')} floor_sdxl_gb={figure(floors, 'sdxl')}")
    if args.comfyui is not None:
        last += (f" comfyui_sd15_peak_gb={figure(peer, 'sd15')}"
                 f" comfyui_sdxl_peak_gb={figure(peer, 'sdxl')}")
    print(last)


def print_peer(case: Case, theirs: Measurement, ours: int) -> None:
    peak = max(theirs.hwm, theirs.ru_maxrss)
    print(f"  {case.name}, ComfyUI: peak {gb(peak)} GB, at the peak {gb(theirs.at_peak.anon)} "
          f"anonymous + {gb(theirs.at_peak.file)} file-backed; {theirs.seconds:.0f} s with its "
          f"start; Loom / ComfyUI {ours / peak:.2f}")
    for node, sample in theirs.by_node.items():
        print_node(node, sample)


if __name__ == "__main__":
    main()

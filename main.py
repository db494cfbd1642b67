"""Loom's command line: `python main.py [flags]` serves; `python main.py run WORKFLOW` runs one
workflow headless. Both take ComfyUI's flags for paths, custom nodes, caching and devices."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.process_tuning import tune_before_torch

tune_before_torch()  # before anything imports torch

from engine import comfy_host  # noqa: E402
from engine.cache import OutputCache  # noqa: E402
from engine.cli import EXIT_INVALID, run_workflow  # noqa: E402
from engine.context import InterruptFlag, Services  # noqa: E402
from engine.custom_nodes import load_custom_nodes  # noqa: E402
from engine.diffusion.memory.devices import DevicePolicy  # noqa: E402
from engine.diffusion.memory.model_manager import ModelManager  # noqa: E402
from engine.diffusion.memory.offload import VramSettings, cuda_memory_probe  # noqa: E402
from engine.executor import Executor  # noqa: E402
from engine.image_budget import ImageBudget  # noqa: E402
from engine.launch_flags import (  # noqa: E402
    add_inert_flags,
    add_launch_flags,
    add_precision_flags,
    add_tls_flags,
    report_inert_flags,
    settle_flags,
)
from engine.paths import PathError, Paths  # noqa: E402
from engine.registry import NodeRegistry  # noqa: E402
from nodes import builtin_node_types  # noqa: E402

ROOT = Path(__file__).resolve().parent
VRAM_FLAGS = (
    ("--gpu-only", "load every model straight onto the GPU and keep it there"),
    ("--highvram", "keep models on the GPU once used; never offload them to RAM"),
    ("--normalvram", "move models to the GPU when used, offloading the least recently used "
                     "ones to fit (default)"),
    ("--lowvram", "as --normalvram, but weights fill at most 1/1.3 of the budget: bigger "
                  "models are split, their other layers copied in per use"),
    ("--novram", "keep no streamable layer on the GPU: every layer is copied in per use"))
MEMORY_FLAGS = (*(flag for flag, _ in VRAM_FLAGS), "--disable-smart-memory", "--reserve-vram")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by serving and `run` (names and meanings as ComfyUI's)."""
    paths = parser.add_argument_group("paths")
    paths.add_argument("--base-directory", type=Path, default=ROOT,
                       help="root for models/, input/, output/, temp/, user/, custom_nodes/")
    for name in ("output", "input", "temp", "user"):
        paths.add_argument(f"--{name}-directory", type=Path, default=None,
                           help=f"the {name} folder (default: BASE/{name})")
    paths.add_argument("--extra-model-paths-config", type=Path, nargs="+", action="extend",
                       default=[], metavar="YAML",
                       help="extra_model_paths.yaml files to add (repeatable)")
    custom = parser.add_argument_group("custom nodes")
    custom.add_argument("--disable-all-custom-nodes", action="store_true",
                        help="load no custom-node pack (except --whitelist-custom-nodes)")
    custom.add_argument("--whitelist-custom-nodes", nargs="+", default=[], metavar="PACK",
                        help="packs that still load with --disable-all-custom-nodes")
    cache = parser.add_argument_group("cache").add_mutually_exclusive_group()
    cache.add_argument("--cache-classic", action="store_true",
                       help="keep the outputs the latest prompt used (default)")
    cache.add_argument("--cache-lru", type=int, default=0, metavar="N",
                       help="keep up to N node results, least recently used dropped first")
    cache.add_argument("--cache-none", action="store_true",
                       help="keep nothing between prompts (least RAM)")
    cache.add_argument("--cache-ram", type=float, nargs="?", const=4.0, default=None,
                       metavar="GB", help="keep up to GB of tensor data (default 4)")
    device = parser.add_argument_group("device and precision")
    device.add_argument("--cpu", action="store_true", help="run everything on the CPU")
    device.add_argument("--model-ram-budget", type=float, default=None, metavar="GB",
                        help="bytes of model weights kept loaded; the least recently used "
                             "model is evicted and reloaded when needed (default: 75%% of RAM)")
    memory = parser.add_argument_group(
        "GPU memory (CUDA only; weights rest in RAM and are copied to the GPU when used)")
    vram_mode = memory.add_mutually_exclusive_group()
    for flag, text in VRAM_FLAGS:
        vram_mode.add_argument(flag, action="store_true", help=text)
    memory.add_argument("--reserve-vram", type=float, default=None, metavar="GB",
                        help="VRAM left to the OS and other programs (default 0.4); another "
                             "0.8 GB is kept free for activations")
    memory.add_argument("--disable-smart-memory", action="store_true",
                        help="offload every other model to RAM before one is used, instead of "
                             "keeping models on the GPU until the room is needed")
    device.add_argument("--allow-pickle-checkpoints", action="store_true",
                        help="also load .ckpt/.pt files (torch.load with weights_only=True); "
                             "off by default because pickle files can carry code")
    add_precision_flags(parser)
    add_launch_flags(parser)
    add_inert_flags(parser)
    parser.add_argument("--max-image-megapixels", type=float, default=None, metavar="MP",
                        help="largest decoded size of one image file, all frames counted, "
                             "at upload and when loaded (default: an eighth of RAM at 16 "
                             "bytes per pixel)")


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    """--ray and its sizing flags (serving and `run`); see README "Running on a Ray cluster"."""
    ray = parser.add_argument_group("Ray cluster (needs the ray extra: pip install loom[ray])")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run prompts on Ray worker actors: ADDRESS of a running cluster "
                          "(auto, HOST:6379, ray://HOST:10001); without one, a local Ray "
                          "runtime is started")
    ray.add_argument("--ray-workers", type=int, default=1, metavar="N",
                     help="worker actors to start (default 1)")
    ray.add_argument("--ray-cpus-per-worker", type=float, default=1.0, metavar="N",
                     help="CPUs Ray reserves for each worker (default 1)")
    ray.add_argument("--ray-gpus-per-worker", type=float, default=0.0, metavar="N",
                     help="GPUs Ray gives each worker (default 0; 1 = a GPU each)")
    ray.add_argument("--ray-prompts-per-worker", type=int, default=1, metavar="N",
                     help="prompts one worker runs at once, each with its own executor and "
                          "cache, sharing its models (default 1)")


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--listen", nargs="?", const="0.0.0.0", default="127.0.0.1",
                        metavar="IP", help="address to bind (no value: all interfaces)")
    server.add_argument("--port", type=int, default=8188)
    server.add_argument("--enable-cors-header", nargs="?", const="*", default=None,
                        metavar="ORIGIN")
    server.add_argument("--max-upload-size", type=float, default=100, metavar="MB")
    server.add_argument("--front-end-root", type=Path, default=None)
    server.add_argument("--preview-method", default="auto",
                        choices=["auto", "latent2rgb", "taesd", "none"])
    server.add_argument("--auth-token", default=None)
    server.add_argument("--allowed-hosts", action="append", default=[], metavar="NAME[,NAME]",
                        help="host names this server answers to besides loopback names and "
                             "the --listen address (a reverse proxy's or LAN name; '*' for "
                             "any); without a token other Host values are refused (DNS "
                             "rebinding)")
    server.add_argument("--max-history-items", type=int, default=10000, metavar="N",
                        help="finished prompts kept in the history (oldest dropped first)")
    add_tls_flags(parser)


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    serve = argparse.ArgumentParser(prog="main.py", description=__doc__)
    add_common_flags(serve)
    add_server_flags(serve)
    add_ray_flags(serve)
    run = argparse.ArgumentParser(prog="main.py run",
                                  description="Run a saved workflow (API JSON, editor JSON or a "
                                              "PNG with workflow chunks) without a server.")
    run.add_argument("workflow", type=Path)
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="NODE_ID.INPUT=VALUE", help="override a widget value (repeatable)")
    run.add_argument("--dry-run", action="store_true",
                     help="validate and print the execution order; run nothing")
    run.add_argument("--quiet", action="store_true", help="print only errors")
    run.add_argument("--sweep", dest="sweeps", action="append", default=[],
                     metavar="NODE_ID.INPUT=SPEC",
                     help="run the workflow once per value: SPEC is A..B[:STEP] (integers), "
                          "[JSON list], @FILE (one value per line) or a value; several "
                          "--sweep make a grid; outputs are named by their overrides")
    run.add_argument("--sweep-zip", action="store_true",
                     help="pair the i-th values of the --sweep axes instead of a grid")
    add_common_flags(run)
    add_ray_flags(run)
    return serve, run


@dataclass
class App:
    """The long-lived objects one Loom process is made of."""

    services: Services
    registry: NodeRegistry
    executor: Executor


def make_cache(args: argparse.Namespace) -> OutputCache:
    if args.cache_none:
        return OutputCache("none")
    if args.cache_lru:
        return OutputCache("lru", max_entries=args.cache_lru)
    if args.cache_ram is not None:
        return OutputCache("ram", max_bytes=int(args.cache_ram * 2**30))
    return OutputCache("classic")


def model_ram_budget(args: argparse.Namespace) -> int:
    """--model-ram-budget in bytes; by default three quarters of physical memory."""
    if args.model_ram_budget is not None:
        return int(args.model_ram_budget * 2**30)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * 0.75)


def build_app(args: argparse.Namespace) -> App:
    paths = Paths.from_base(args.base_directory, output=args.output_directory,
                            input=args.input_directory, temp=args.temp_directory,
                            user=args.user_directory, models=args.models_directory)
    if not getattr(args, "dry_run", False):  # a dry run writes nothing
        paths.create_working_dirs()
    for config in args.extra_model_paths_config:
        paths.load_extra_config(config)
    default_extra = args.base_directory / "extra_model_paths.yaml"
    if default_extra.is_file() and default_extra not in args.extra_model_paths_config:
        paths.load_extra_config(default_extra)
    policy = DevicePolicy.from_args(args)
    logging.getLogger("loom").info("models: %s (%s)", policy.describe(), policy.reason)
    services = Services(paths=paths, args=args,
                        image_budget=ImageBudget.from_megapixels(args.max_image_megapixels),
                        model_manager=ModelManager(policy,
                                                   allow_pickle=args.allow_pickle_checkpoints,
                                                   ram_budget=model_ram_budget(args),
                                                   vram=vram_settings(args, policy)))
    registry = NodeRegistry()
    registry.register_all(builtin_node_types())
    interrupt = InterruptFlag()
    bind_comfy_api(services, registry, interrupt)
    load_custom_nodes(registry, paths.custom_nodes, disable_all=args.disable_all_custom_nodes,
                      whitelist=args.whitelist_custom_nodes)
    return App(services, registry,
               Executor(registry, services, make_cache(args), interrupt=interrupt))


def bind_comfy_api(services: Services, registry: NodeRegistry, interrupt: InterruptFlag) -> None:
    """ComfyUI's module-level singletons (folder_paths, PromptServer.instance,
    model_management), which custom-node packs read, point at this process's objects."""
    from web.comfy_server import create_pack_server  # aiohttp: packs import it anyway

    comfy_host.bind(services, registry, interrupt)
    create_pack_server()


def vram_settings(args: argparse.Namespace, policy: DevicePolicy) -> VramSettings | None:
    """The GPU memory flags as the model manager's VRAM settings; None off CUDA."""
    if policy.device.type != "cuda":
        return None
    vram = VramSettings.from_args(args, cuda_memory_probe(policy.device))
    logging.getLogger("loom").info(
        "VRAM: %s, %.1f GB of %.1f GB for weights", vram.mode.value, vram.budget() / 2**30,
        vram.probe().total / 2**30)
    return vram


def warn_cpu_memory_flags(args: argparse.Namespace, policy: DevicePolicy) -> None:
    values = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in MEMORY_FLAGS}
    given = [flag for flag, value in values.items() if value is not None and value is not False]
    if given and policy.device.type != "cuda":
        logging.getLogger("loom").warning(
            "%s: GPU memory flags, without effect when models run on the %s (see "
            "--model-ram-budget for the RAM budget)", ", ".join(given), policy.device)


def quiet_known_warnings() -> None:
    """torchsde warns on every SDE run that float32 sigmas overshoot its interval by ~1e-7;
    ComfyUI shows the same harmless line. Keep it out of the user's log."""
    warnings.filterwarnings("ignore", message="Should have tb<=t1", module="torchsde")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_parser, run_parser = build_parser()
    command = argv.pop(0) if argv and argv[0] in ("run", "serve") else "serve"
    args = (run_parser if command == "run" else serve_parser).parse_args(argv)
    try:
        settle_flags(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    logging.basicConfig(level=getattr(logging, args.log_level),
                        stream=sys.stdout if args.log_stdout else sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    quiet_known_warnings()
    report_inert_flags(args)
    try:
        app = build_app(args)
    except (PathError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    warn_cpu_memory_flags(args, app.services.model_manager.policy)
    if command == "run" and (args.sweeps or args.ray is not None) and not args.dry_run:
        return run_batch_command(args, app)
    if command == "run":
        return run_workflow(args.workflow, app.registry, app.services, app.executor,
                            overrides=args.overrides, dry_run=args.dry_run,
                            verbose=args.verbose, quiet=args.quiet)
    return serve(args, app)


def cluster_dispatcher(args: argparse.Namespace, log_to_driver: bool) -> Any:
    """The Dispatcher over Ray worker actors that --ray asks for (Ray is imported here only).
    ValueError when Ray is not installed or a --ray-* value is bad."""
    from engine.cluster.dispatcher import Dispatcher

    try:
        from engine.cluster.pool import ClusterConfig, WorkerPool
    except ImportError as exc:
        raise ValueError(f"--ray needs Ray, which cannot be imported ({exc}); install it with "
                         f"pip install 'loom[ray]'") from exc
    config = ClusterConfig.from_args(args, log_to_driver=log_to_driver)
    return Dispatcher(WorkerPool(config, args))


def run_batch_command(args: argparse.Namespace, app: App) -> int:
    """`run --sweep` and `run --ray`: the prompts of a sweep, in process or on the cluster."""
    from engine.batch import InProcessRunner, run_batch

    runner: Any = InProcessRunner(app.executor)
    if args.ray is not None:
        from engine.cluster.batch_runner import ClusterBatchRunner

        try:
            dispatcher = cluster_dispatcher(args, log_to_driver=args.verbose)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_INVALID
        runner = ClusterBatchRunner(dispatcher, app.registry, app.services.paths)
    return run_batch(args.workflow, app.registry, app.services, runner,
                     overrides=args.overrides, sweeps=args.sweeps, zipped=args.sweep_zip,
                     quiet=args.quiet)


def serve(args: argparse.Namespace, app: App) -> int:
    """Serve the HTTP/WebSocket API and the editor until Ctrl-C."""
    from web.server import LoomServer, run_server  # aiohttp is needed only to serve
    from web.store import StoreError
    from web.worker import Worker

    worker: Any = Worker
    try:
        if args.ray is not None:
            from web.cluster_worker import ClusterWorker

            dispatcher = cluster_dispatcher(args, log_to_driver=True)
            worker = functools.partial(ClusterWorker, dispatcher=dispatcher,
                                       address=dispatcher.pool.config.shown_address)
        server = LoomServer(app.registry, app.services, app.executor, args, worker)
    except (StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return run_server(server)


if __name__ == "__main__":
    sys.exit(main())

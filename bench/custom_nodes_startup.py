"""Start-up cost of custom-node packs. Usage:

    python bench/custom_nodes_startup.py BASE_WITH_CUSTOM_NODES [--repeat N]
    python bench/custom_nodes_startup.py BASE --comfyui COMFYUI_DIR [--repeat N] [--cold N]

Without --comfyui: seconds from process start until Loom's app (registry, packs loaded) is
built, for BASE against an empty base directory, each in a fresh process.

With --comfyui: Loom and ComfyUI (a checkout at COMFYUI_DIR) each serve with `--cpu` and the
same base directory (so the same custom_nodes/ packs), launched by the same Python (this one,
or --python), interleaved; startup is the seconds from process launch until
GET /system_stats answers. Warm runs use the bytecode caches as they are; cold runs compile
every module from source (a fresh PYTHONPYCACHEPREFIX; the OS file cache is not dropped).
Prints both engines' per-pack import times as each logs them, the nodes each registers per
pack (from its /object_info) with the names ComfyUI registers and Loom lacks, and a last line
`loom_startup_s=... comfyui_startup_s=... ratio=...` (warm medians, then cold medians).
Compare figures only within one run: they depend on the machine and its load."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import sys, time
started = time.perf_counter()
sys.path.insert(0, {root!r})
import main
serve, _ = main.build_parser()
app = main.build_app(serve.parse_args(["--base-directory", {base!r}, "--cpu"]))
registry = app.registry
print(f"{{time.perf_counter() - started:.3f}} {{len(registry)}} {{len(registry.pack_errors)}}")
"""
ENGINES = ("loom", "comfyui")
IMPORT_TIME = re.compile(r"^\s*([\d.]+) seconds( \(IMPORT FAILED\))?: (.+?)\s*$")
PACK_PREFIX = "custom_nodes."
POLL_S = 0.1


def measure(base: Path) -> tuple[float, int, int]:
    """(seconds to build the app, node types, pack errors) in a fresh interpreter."""
    code = PROBE.format(root=str(ROOT), base=str(base))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip().splitlines()[-1]
    seconds, nodes, errors = out.split()
    return float(seconds), int(nodes), int(errors)


def compare_with_empty(base: Path, repeat: int) -> None:
    """Loom's app build time with BASE's packs against an empty base directory."""
    with tempfile.TemporaryDirectory() as empty:
        runs = {"no packs": [measure(Path(empty)) for _ in range(repeat)],
                "with packs": [measure(base) for _ in range(repeat)]}
    print(f"{'setting':12s} {'median s':>9s} {'min s':>7s} {'nodes':>6s} {'pack errors':>12s}")
    for name, found in runs.items():
        times = [t for t, _, _ in found]
        print(f"{name:12s} {statistics.median(times):9.2f} {min(times):7.2f} {found[0][1]:6d} "
              f"{found[0][2]:12d}")
    bare = statistics.median(t for t, _, _ in runs["no packs"])
    packed = statistics.median(t for t, _, _ in runs["with packs"])
    print(f"startup_no_packs_s={bare:.2f} startup_with_packs_s={packed:.2f} "
          f"packs_cost_s={packed - bare:.2f}")


@dataclass
class ServerRun:
    """One server start: seconds until it answered, its log's pack import times, and its
    /object_info (the last one fetched is kept for the node counts)."""

    engine: str
    cold: bool
    seconds: float
    import_times: dict[str, float] = field(default_factory=dict)
    object_info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Peer:
    """How to launch each engine's server: same Python, same base directory, --cpu."""

    python: str
    base: Path
    comfyui: Path

    def command(self, engine: str, port: int) -> tuple[list[str], Path]:
        common = ["--cpu", "--base-directory", str(self.base), "--listen", "127.0.0.1",
                  "--port", str(port)]
        if engine == "loom":
            return [self.python, str(ROOT / "main.py"), *common], ROOT
        return [self.python, str(self.comfyui / "main.py"), *common], self.comfyui


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str) -> Any | None:
    """The JSON body of a GET, or None while the server does not answer yet."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def wait_until_answering(process: subprocess.Popen, url: str, limit_s: float) -> float:
    """Seconds from now until `url` answers; RuntimeError if the server exits or is too slow."""
    started = time.perf_counter()
    while get_json(url) is None:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before "
                               f"{url} answered; see its log")
        if time.perf_counter() - started > limit_s:
            raise RuntimeError(f"{url} did not answer within {limit_s:.0f} s")
        time.sleep(POLL_S)
    return time.perf_counter() - started


def start_server(peer: Peer, engine: str, cold: bool, log_dir: Path, index: int,
                 limit_s: float) -> ServerRun:
    """Launch one server, time it until it answers, read its /object_info, stop it."""
    port = free_port()
    command, cwd = peer.command(engine, port)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as pycache:
        if cold:
            env["PYTHONPYCACHEPREFIX"] = pycache
        log_path = log_dir / f"{engine}_{'cold' if cold else 'warm'}_{index}.log"
        with log_path.open("w") as log:
            launched = time.perf_counter()
            process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
            try:
                wait_until_answering(process, f"http://127.0.0.1:{port}/system_stats", limit_s)
                seconds = time.perf_counter() - launched
                info = get_json(f"http://127.0.0.1:{port}/object_info") or {}
            finally:
                stop(process)
    return ServerRun(engine, cold, seconds, pack_import_times(log_path.read_text()), info)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def pack_import_times(log: str) -> dict[str, float]:
    """The 'N.N seconds: PATH' lines both engines log after loading packs, by pack name."""
    times = {}
    for line in log.splitlines():
        found = IMPORT_TIME.match(line)
        if found:
            times[Path(found.group(3)).name] = float(found.group(1))
    return times


def nodes_per_pack(object_info: dict[str, Any]) -> dict[str, set[str]]:
    """Node names of each custom-node pack, by the python_module both engines report."""
    packs: dict[str, set[str]] = {}
    for name, info in object_info.items():
        module = str(info.get("python_module", ""))
        if module.startswith(PACK_PREFIX):
            pack = module[len(PACK_PREFIX):].split(".")[0]
            packs.setdefault(pack, set()).add(name)
    return packs


def interleaved(peer: Peer, repeat: int, cold: int, log_dir: Path, limit_s: float
                ) -> list[ServerRun]:
    """Cold and warm starts, alternating which engine goes first in each round."""
    runs = []
    for index in range(max(repeat, cold)):
        order = ENGINES if index % 2 == 0 else ENGINES[::-1]
        kinds = ([True] if index < cold else []) + ([False] if index < repeat else [])
        for is_cold in kinds:
            for engine in order:
                run = start_server(peer, engine, is_cold, log_dir, index, limit_s)
                print(f"  {engine:8s} {'cold' if is_cold else 'warm'} {run.seconds:7.2f} s",
                      flush=True)
                runs.append(run)
    return runs


def median_of(runs: list[ServerRun], engine: str, cold: bool) -> float | None:
    times = [run.seconds for run in runs if run.engine == engine and run.cold == cold]
    return statistics.median(times) if times else None


def print_startup(runs: list[ServerRun]) -> None:
    print(f"\n{'engine':8s} {'start':5s} {'median s':>9s} {'min s':>7s} {'runs':>5s}")
    for engine in ENGINES:
        for cold in (False, True):
            times = [run.seconds for run in runs if run.engine == engine and run.cold == cold]
            if times:
                print(f"{engine:8s} {'cold' if cold else 'warm':5s} "
                      f"{statistics.median(times):9.2f} {min(times):7.2f} {len(times):5d}")


def print_import_times(runs: list[ServerRun]) -> None:
    """Median per-pack import seconds over the warm runs, as each engine logged them."""
    warm = {engine: [run.import_times for run in runs if run.engine == engine and not run.cold]
            for engine in ENGINES}
    packs = sorted({pack for logs in warm.values() for log in logs for pack in log})
    print(f"\n{'pack import s (warm median)':40s} {'loom':>7s} {'comfyui':>8s}")
    for pack in packs:
        cells = []
        for engine in ENGINES:
            found = [log[pack] for log in warm[engine] if pack in log]
            cells.append(f"{statistics.median(found):.2f}" if found else "-")
        print(f"{pack:40s} {cells[0]:>7s} {cells[1]:>8s}")


def print_node_counts(runs: list[ServerRun], names_out: Path | None) -> None:
    """Per pack: nodes ComfyUI registers, nodes Loom registers, and the names Loom lacks."""
    latest = {run.engine: run.object_info for run in runs if run.object_info}
    loom, comfy = (nodes_per_pack(latest.get(engine, {})) for engine in ENGINES)
    print(f"\n{'pack':40s} {'comfyui':>8s} {'loom':>6s} {'missing':>8s}")
    missing = {pack: sorted(names - loom.get(pack, set())) for pack, names in comfy.items()}
    for pack in sorted(set(loom) | set(comfy)):
        print(f"{pack:40s} {len(comfy.get(pack, ())):8d} {len(loom.get(pack, ())):6d} "
              f"{len(missing.get(pack, ())):8d}")
    total_comfy = sum(map(len, comfy.values()))
    total_loom = sum(len(loom.get(pack, set()) & names) for pack, names in comfy.items())
    share = total_loom / total_comfy if total_comfy else 0.0
    print(f"{'total':40s} {total_comfy:8d} {sum(map(len, loom.values())):6d} "
          f"{total_comfy - total_loom:8d}  ({share:.1%} of ComfyUI's nodes registered by Loom)")
    if names_out is not None:
        names_out.write_text(json.dumps({pack: names for pack, names in missing.items()
                                         if names}, indent=1, sort_keys=True))
        print(f"missing node names per pack written to {names_out}")


def figure(value: float | None) -> str:
    return "nan" if value is None else f"{value:.2f}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    return "nan" if not numerator or not denominator else f"{numerator / denominator:.3f}"


def compare_with_comfyui(args: argparse.Namespace) -> None:
    peer = Peer(args.python, args.base.resolve(), args.comfyui.resolve())
    log_dir = Path(tempfile.mkdtemp(prefix="loom_startup_logs_"))
    print(f"Loom vs ComfyUI ({peer.comfyui}) with {peer.base / 'custom_nodes'}, "
          f"python {peer.python}; server logs in {log_dir}", flush=True)
    runs = interleaved(peer, args.repeat, args.cold, log_dir, args.limit)
    print_startup(runs)
    print_import_times(runs)
    print_node_counts(runs, args.missing_names)
    warm = [median_of(runs, engine, cold=False) for engine in ENGINES]
    cold = [median_of(runs, engine, cold=True) for engine in ENGINES]
    print(f"loom_startup_s={figure(warm[0])} comfyui_startup_s={figure(warm[1])} "
          f"ratio={ratio(*warm)} loom_cold_s={figure(cold[0])} "
          f"comfyui_cold_s={figure(cold[1])} cold_ratio={ratio(*cold)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="a base directory whose custom_nodes/ has packs")
    parser.add_argument("--repeat", type=int, default=3, help="warm starts per engine")
    parser.add_argument("--comfyui", type=Path, default=None, metavar="DIR",
                        help="a ComfyUI checkout to compare server start-up with")
    parser.add_argument("--python", default=sys.executable, metavar="PYTHON",
                        help="the Python both servers run with (default: this one)")
    parser.add_argument("--cold", type=int, default=1, metavar="N",
                        help="with --comfyui: cold starts per engine (default 1)")
    parser.add_argument("--limit", type=float, default=300, metavar="S",
                        help="with --comfyui: give up on a server not answering after S s")
    parser.add_argument("--missing-names", type=Path, default=None, metavar="JSON",
                        help="with --comfyui: write the node names Loom lacks, per pack")
    args = parser.parse_args()
    if args.comfyui is None:
        compare_with_empty(args.base, args.repeat)
    else:
        compare_with_comfyui(args)


if __name__ == "__main__":
    main()

"""Start-up cost of custom-node packs: seconds from process start until Loom's app (registry,
packs loaded) is built, for a base directory with packs against an empty one, each in a fresh
process, and Loom's per-pack import times. Usage:

    python bench/custom_nodes_startup.py BASE_WITH_CUSTOM_NODES [--repeat N]

Prints a table and a last line of figures; compare against another program's start-up only
when it ran on the same machine in the same session."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

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


def measure(base: Path) -> tuple[float, int, int]:
    """(seconds to build the app, node types, pack errors) in a fresh interpreter."""
    code = PROBE.format(root=str(ROOT), base=str(base))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip().splitlines()[-1]
    seconds, nodes, errors = out.split()
    return float(seconds), int(nodes), int(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("base", type=Path, help="a base directory whose custom_nodes/ has packs")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as empty:
        runs = {"no packs": [measure(Path(empty)) for _ in range(args.repeat)],
                "with packs": [measure(args.base) for _ in range(args.repeat)]}
    print(f"{'setting':12s} {'median s':>9s} {'min s':>7s} {'nodes':>6s} {'pack errors':>12s}")
    for name, found in runs.items():
        times = [t for t, _, _ in found]
        print(f"{name:12s} {statistics.median(times):9.2f} {min(times):7.2f} {found[0][1]:6d} "
              f"{found[0][2]:12d}")
    bare = statistics.median(t for t, _, _ in runs["no packs"])
    packed = statistics.median(t for t, _, _ in runs["with packs"])
    print(f"startup_no_packs_s={bare:.2f} startup_with_packs_s={packed:.2f} "
          f"packs_cost_s={packed - bare:.2f}")


if __name__ == "__main__":
    main()

"""main.py as a user runs it: a subprocess on the bundled example workflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "invert_image_api.json"


def main_py(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_run_writes_the_example_image_with_its_prompt(tmp_path: Path) -> None:
    done = main_py("run", str(EXAMPLE), "--base-directory", str(tmp_path),
                   "--set", "4.scale_by=0.5")
    assert done.returncode == 0, done.stderr
    written = tmp_path / "output" / "loom_example_00001_.png"
    assert "wrote output/loom_example_00001_.png" in done.stdout
    with Image.open(written) as image:
        assert image.size == (160, 96)  # (256 + 64) * 0.5, (128 + 64) * 0.5
        assert json.loads(image.text["prompt"])["4"]["inputs"]["scale_by"] == 0.5
    again = main_py("run", str(written), "--base-directory", str(tmp_path))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "output" / "loom_example_00002_.png").is_file()


def test_a_run_creates_the_working_folders_packs_expect(tmp_path: Path) -> None:
    done = main_py("run", str(EXAMPLE), "--base-directory", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert all((tmp_path / name).is_dir() for name in ("input", "output", "temp", "user"))


def test_dry_run_and_bad_value_exit_codes(tmp_path: Path) -> None:
    dry = main_py("run", str(EXAMPLE), "--base-directory", str(tmp_path), "--dry-run")
    assert dry.returncode == 0 and "5 node(s) would run" in dry.stdout
    assert not (tmp_path / "output").exists()
    bad = main_py("run", str(EXAMPLE), "--base-directory", str(tmp_path),
                  "--set", "4.upscale_method=cubic")
    assert bad.returncode == 2
    assert "node 4 (ImageScaleBy), input 'upscale_method' = 'cubic'" in bad.stderr


def test_broken_custom_pack_does_not_stop_the_run(tmp_path: Path) -> None:
    (tmp_path / "custom_nodes").mkdir()
    (tmp_path / "custom_nodes" / "broken.py").write_text("raise ImportError('no such lib')\n")
    done = main_py("run", str(EXAMPLE), "--base-directory", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "no such lib" in done.stderr and "IMPORT FAILED" in done.stderr
    disabled = main_py("run", str(EXAMPLE), "--base-directory", str(tmp_path),
                       "--disable-all-custom-nodes")
    assert disabled.returncode == 0 and "no such lib" not in disabled.stderr


def test_gpu_memory_flags_on_the_cpu_are_accepted_and_said_to_have_no_effect(
        tmp_path: Path) -> None:
    done = main_py("run", str(EXAMPLE), "--base-directory", str(tmp_path), "--cpu",
                   "--lowvram", "--reserve-vram", "1.5", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "--lowvram, --reserve-vram: GPU memory flags, without effect when models run on " \
           "the cpu" in done.stderr


def test_run_sweep_writes_one_image_per_value_named_by_it(tmp_path: Path) -> None:
    done = main_py("run", str(EXAMPLE), "--base-directory", str(tmp_path),
                   "--sweep", "4.scale_by=[0.25, 0.5]")
    assert done.returncode == 0, done.stderr
    for scale in ("0.25", "0.5"):
        assert (tmp_path / "output" / f"loom_example_4.scale_by={scale}_00001_.png").is_file()
    assert "2 of 2 prompt(s) succeeded" in done.stdout
    assert "in process" in done.stdout


def test_an_invalid_sweep_point_stops_the_run_before_any_prompt(tmp_path: Path) -> None:
    done = main_py("run", str(EXAMPLE), "--base-directory", str(tmp_path),
                   "--sweep", '4.upscale_method=["bicubic", "cubic"]')
    assert done.returncode == 2
    assert "sweep item 4.upscale_method=cubic" in done.stderr
    assert not list((tmp_path / "output").iterdir())  # created empty at start, as ComfyUI does


NO_RAY_SCRIPT = """
import sys
from pathlib import Path
import main
base = Path(sys.argv[1])
assert main.main(["run", sys.argv[2], "--base-directory", str(base), "--quiet"]) == 0
assert main.main(["run", sys.argv[2], "--base-directory", str(base), "--quiet",
                  "--sweep", "4.scale_by=[0.5, 1.0]"]) == 0
from tests.web.inprocess import serving
with serving(base / "served") as (client, server):
    assert client.get("/queue").json() == {"queue_running": [], "queue_pending": []}
    assert "loom_cluster" not in client.get("/system_stats").json()
assert "ray" not in sys.modules, "ray was imported"
print("no ray")
"""


def test_without_ray_flags_ray_is_never_imported(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", NO_RAY_SCRIPT, str(tmp_path), str(EXAMPLE)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "no ray" in done.stdout

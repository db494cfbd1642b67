"""End to end on a local Ray runtime: a server restarted mid-queue reconnects and finishes the
persisted queue; `main.py run --ray --sweep` runs a sweep across workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.cluster.conftest import cluster_base, start_cluster_server, wait_until
from tests.web.conftest import ROOT
from tests.web.prompt_helpers import image_workflow, slow_workflow, submit, wait_history

PROMPT_TIMEOUT_S = 240


def test_a_restarted_server_reconnects_and_resumes_its_queue(ray_address: str,
                                                             tmp_path: Path) -> None:
    base = cluster_base(tmp_path / "base")
    first = start_cluster_server(base, ray_address, 1)
    try:
        ids = [submit(first, slow_workflow(value, steps=40, delay=0.05))["prompt_id"]
               for value in (1, 2, 3)]
        wait_until(lambda: first.get_json("/queue")["queue_running"] != [],  # type: ignore
                   PROMPT_TIMEOUT_S, first, "the first prompt to run")
    finally:
        first.stop(kill=True)  # its worker actors die with it
    second = start_cluster_server(base, ray_address, 1)
    try:
        for value, prompt_id in zip((1, 2, 3), ids, strict=True):
            entry = wait_history(second, prompt_id, PROMPT_TIMEOUT_S)
            assert entry["outputs"] == {"3": {"text": [f"value={value}"]}}
        assert sorted(second.get_json("/history")) == sorted(ids)  # type: ignore[arg-type]
    finally:
        second.stop()


def test_run_sweeps_a_workflow_across_the_workers(ray_address: str, tmp_path: Path) -> None:
    base = cluster_base(tmp_path / "base")
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(image_workflow(8, "sweep/img")))
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "run", str(workflow), "--base-directory",
         str(base), "--ray", ray_address, "--ray-workers", "2", "--sweep", "1.width=8..10",
         "--sweep", "1.color=[0, 255]"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    saved = {p.name for p in (base / "output" / "sweep").iterdir()}
    assert saved == {f"img_1.width={w}_1.color={c}_00001_.png" for w in (8, 9, 10)
                     for c in (0, 255)}
    assert "6 of 6 prompt(s) succeeded" in done.stdout
    assert "1.width=9_1.color=255" in done.stdout

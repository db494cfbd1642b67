"""End to end on a local Ray runtime: a Loom server whose three worker actors run its prompts
(parallel drain, model affinity, events to the right client, output files, interrupt, a killed
worker, a prompt that kills workers, sweeps through POST /prompt)."""

from __future__ import annotations

import os
import signal
import urllib.request
from typing import Any

from tests.cluster.conftest import wait_until, worker_that_ran, workers_of
from tests.web.conftest import ServerProcess
from tests.web.prompt_helpers import (
    image_workflow,
    slow_workflow,
    submit,
    value_workflow,
    wait_history,
    ws_url,
)
from tests.web.wsclient import EventRecorder

PROMPT_TIMEOUT_S = 240


def checkpoint_workflow(ckpt: str, width: int = 64) -> dict[str, Any]:
    """Load a checkpoint, decode an empty latent with its VAE and save the image; a slow branch
    keeps the worker busy for a moment."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage",
              "inputs": {"width": width, "height": 64, "batch_size": 1}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0],
                                                     "filename_prefix": "affinity"}},
        **{key: value for key, value in slow_workflow(width, steps=10, delay=0.1).items()
           if key != "3"},
        "13": {"class_type": "LoomTestShow", "inputs": {"value": ["2", 0], "label": "slow"}},
    }


def history_entry(server: ServerProcess, prompt_id: str) -> dict[str, Any]:
    return wait_history(server, prompt_id, PROMPT_TIMEOUT_S)


def running_ids(server: ServerProcess) -> list[str]:
    queue = server.get_json("/queue")
    assert isinstance(queue, dict)
    return [item[1] for item in queue["queue_running"]]


def test_three_workers_drain_three_prompts_in_parallel(cluster: ServerProcess) -> None:
    ids = [submit(cluster, slow_workflow(value, steps=100, delay=0.05))["prompt_id"]
           for value in (1, 2, 3)]
    wait_until(lambda: sorted(running_ids(cluster)) == sorted(ids), PROMPT_TIMEOUT_S, cluster,
               "three prompts running at once")
    assert sorted(p for w in workers_of(cluster) for p in w["running"]) == sorted(ids)
    assert all(len(w["running"]) == 1 for w in workers_of(cluster))
    for value, prompt_id in zip((1, 2, 3), ids, strict=True):
        assert history_entry(cluster, prompt_id)["outputs"] == {
            "3": {"text": [f"value={value}"]}}


def test_a_prompt_goes_to_the_idle_worker_holding_its_checkpoint(cluster: ServerProcess) -> None:
    first_a = submit(cluster, checkpoint_workflow("tiny_a.safetensors"))["prompt_id"]
    first_b = submit(cluster, checkpoint_workflow("tiny_b.safetensors"))["prompt_id"]
    for prompt_id in (first_a, first_b):
        assert history_entry(cluster, prompt_id)["status"]["status_str"] == "success"
    holder_a, holder_b = worker_that_ran(cluster, first_a), worker_that_ran(cluster, first_b)
    assert holder_a != holder_b
    loaded = {w["index"]: w["loaded_models"] for w in workers_of(cluster)}
    assert "checkpoints/tiny_b.safetensors" in loaded[holder_b]
    # One at a time, so every worker is idle: each goes where its checkpoint is.
    for ckpt, holder in (("tiny_b.safetensors", holder_b), ("tiny_a.safetensors", holder_a)):
        again = submit(cluster, checkpoint_workflow(ckpt, width=72))["prompt_id"]
        history_entry(cluster, again)
        assert worker_that_ran(cluster, again) == holder


def test_events_reach_only_the_client_that_submitted(cluster: ServerProcess) -> None:
    with EventRecorder(ws_url(cluster)) as alice, EventRecorder(ws_url(cluster)) as bob:
        mine = submit(cluster, slow_workflow(5, steps=3, delay=0.05), alice.sid)["prompt_id"]
        theirs = submit(cluster, image_workflow(16, "routing/bob"), bob.sid)["prompt_id"]
        alice.wait_end(mine, PROMPT_TIMEOUT_S)
        bob.wait_end(theirs, PROMPT_TIMEOUT_S)
        for recorder, own in ((alice, mine), (bob, theirs)):
            prompt_ids = {m["data"].get("prompt_id") for m in recorder.messages
                          if isinstance(m, dict) and m["type"] not in ("status",)}
            assert prompt_ids == {own}
        assert [m["data"]["value"] for m in alice.of_type("progress")] == [1, 2, 3]
        assert any(isinstance(m, bytes) for m in alice.messages)  # preview frames
        assert [m["data"]["node"] for m in bob.of_type("executed")] == ["3", "4"]
        saved = bob.of_type("executed")[0]["data"]["output"]["images"][0]
    assert (cluster.base / "output" / "routing" / saved["filename"]).is_file()
    url = f"{cluster.url}/view?filename={saved['filename']}&subfolder=routing&type=output"
    with urllib.request.urlopen(url, timeout=30) as reply:
        assert reply.read().startswith(b"\x89PNG")
    entry = history_entry(cluster, theirs)
    assert entry["outputs"]["3"]["images"][0] == saved
    assert set(entry) == {"prompt", "outputs", "status", "meta", "timings"}


def test_interrupt_stops_only_the_prompt_it_names(cluster: ServerProcess) -> None:
    stopped = submit(cluster, slow_workflow(6, steps=600, delay=0.05))["prompt_id"]
    kept = submit(cluster, slow_workflow(7, steps=20, delay=0.05))["prompt_id"]
    wait_until(lambda: stopped in running_ids(cluster), PROMPT_TIMEOUT_S, cluster,
               "the long prompt to run")
    assert cluster.post_json("/interrupt", {"prompt_id": stopped})[0] == 200
    entry = history_entry(cluster, stopped)
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert history_entry(cluster, kept)["status"]["status_str"] == "success"


def test_a_killed_worker_s_prompt_finishes_on_another(cluster: ServerProcess) -> None:
    victim = submit(cluster, slow_workflow(8, steps=100, delay=0.05))["prompt_id"]
    wait_until(lambda: any(victim in w["running"] for w in workers_of(cluster)),
               PROMPT_TIMEOUT_S, cluster, "the prompt to run")
    [worker] = [w for w in workers_of(cluster) if victim in w["running"]]
    os.kill(worker["pid"], signal.SIGKILL)
    entry = history_entry(cluster, victim)
    assert entry["outputs"] == {"3": {"text": ["value=8"]}}
    assert list(cluster.get_json("/history")).count(victim) == 1  # type: ignore[arg-type]
    assert cluster.log().count(f"died while running prompt {victim}") == 1
    wait_until(lambda: workers_of(cluster)[worker["index"]]["state"] == "ready",
               PROMPT_TIMEOUT_S, cluster, "the killed worker to come back")
    assert workers_of(cluster)[worker["index"]]["restarts"] == 1


def test_a_prompt_that_kills_two_workers_fails_clearly(cluster: ServerProcess) -> None:
    deadly = value_workflow(9, "LoomTestDie", spare_pid=os.getpid())
    prompt_id = submit(cluster, deadly)["prompt_id"]
    entry = history_entry(cluster, prompt_id)
    assert entry["status"]["status_str"] == "error"
    error = entry["status"]["messages"][-1][1]
    assert "when each of them died" in error["exception_message"]
    assert "not tried a third time" in error["exception_message"]
    wait_until(lambda: all(w["state"] == "ready" for w in workers_of(cluster)),
               PROMPT_TIMEOUT_S, cluster, "the killed workers to come back")


def test_a_sweep_posted_to_prompt_queues_one_prompt_per_grid_point(
        cluster: ServerProcess) -> None:
    body = {"prompt": value_workflow(0, "LoomTestSlow", steps=1, delay=0.0),
            "loom_sweep": {"grid": {"1.value": "1..2", "3.label": ["x", "y"]}}}
    status, reply = cluster.post_json("/prompt", body)
    assert status == 200, reply
    assert isinstance(reply, dict)
    sweep = reply["loom_sweep"]
    assert sweep["labels"] == ["1.value=1_3.label=x", "1.value=1_3.label=y",
                               "1.value=2_3.label=x", "1.value=2_3.label=y"]
    texts = [history_entry(cluster, prompt_id)["outputs"]["3"]["text"][0]
             for prompt_id in sweep["prompt_ids"]]
    assert texts == ["x=1", "y=1", "x=2", "y=2"]


def test_a_sweep_with_one_invalid_point_queues_nothing(cluster: ServerProcess) -> None:
    before = cluster.get_json("/history")
    body = {"prompt": value_workflow(0), "loom_sweep": {"list": [{"1.value": 1},
                                                                 {"1.value": 5000}]}}
    status, reply = cluster.post_json("/prompt", body)
    assert status == 400
    assert isinstance(reply, dict) and "sweep item 1.value=5000" in reply["error"]["message"]
    assert cluster.get_json("/history") == before
    assert not running_ids(cluster)


def test_system_stats_report_the_workers(cluster: ServerProcess) -> None:
    stats = cluster.get_json("/system_stats")
    assert isinstance(stats, dict)
    workers = stats["loom_cluster"]["workers"]
    assert [w["index"] for w in workers] == [0, 1, 2]
    assert all(w["node_types"] > 90 and w["device"] for w in workers)

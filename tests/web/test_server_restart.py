"""End to end: the queue and history survive a killed server (kill -9) and a stopped one
(SIGTERM); the prompt that was running runs first after the restart."""

from __future__ import annotations

from pathlib import Path

from tests.web.conftest import start_server
from tests.web.prompt_helpers import (
    base_with_test_pack,
    pending_ids,
    slow_workflow,
    submit,
    value_workflow,
    wait_history,
    wait_running,
)


def test_queue_and_history_survive_kill_and_stop(tmp_path: Path) -> None:
    base = base_with_test_pack(tmp_path / "base")
    first = start_server(base)
    try:
        finished = submit(first, value_workflow(70))["prompt_id"]
        wait_history(first, finished)
        running = submit(first, slow_workflow(71, steps=600, delay=0.05))
        wait_running(first, running["prompt_id"])
        waiting = [submit(first, value_workflow(72 + i)) for i in range(2)]
        waiting_ids = [reply["prompt_id"] for reply in waiting]
        assert pending_ids(first) == waiting_ids
    finally:
        first.stop(kill=True)  # SIGKILL: no chance to clean up

    second = start_server(base)
    try:
        wait_running(second, running["prompt_id"])  # it went back to the front
        assert pending_ids(second) == waiting_ids
        assert finished in second.get_json("/history")
    finally:
        second.stop()  # SIGTERM while it runs: it stays queued, first in line
    assert "runs first after a restart" in second.log()

    third = start_server(base)
    try:
        wait_running(third, running["prompt_id"])
        assert pending_ids(third) == waiting_ids
        assert third.post_json("/interrupt", {})[0] == 200
        stopped = wait_history(third, running["prompt_id"])
        assert stopped["status"]["messages"][-1][0] == "execution_interrupted"
        assert stopped["prompt"][0] == running["number"]
        for reply, value in zip(waiting, (72, 73), strict=True):
            entry = wait_history(third, reply["prompt_id"])
            assert entry["outputs"] == {"3": {"text": [f"value={value}"]}}
        assert submit(third, value_workflow(80))["number"] == waiting[-1]["number"] + 1
    finally:
        third.stop()
    for server in (second, third):
        assert "Traceback" not in server.log(), server.log()

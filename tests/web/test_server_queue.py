"""End to end: queue numbers and order, queue clear/delete, interrupt, validation errors and the
jobs API, against one Loom server in a subprocess."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.web.conftest import ServerProcess, start_server
from tests.web.prompt_helpers import (
    base_with_test_pack,
    pending_ids,
    slow_workflow,
    submit,
    value_workflow,
    wait_history,
    wait_running,
    ws_url,
)
from tests.web.wsclient import EventRecorder, is_json, summary


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = base_with_test_pack(tmp_path_factory.mktemp("queue") / "base")
    process = start_server(base)
    yield process
    process.stop()


@pytest.fixture
def blocker(server: ServerProcess) -> Iterator[str]:
    """A slow prompt occupying the worker (interrupted afterwards), so others stay pending."""
    prompt_id = submit(server, slow_workflow(1, steps=400, delay=0.05))["prompt_id"]
    wait_running(server, prompt_id)
    yield prompt_id
    server.post_json("/queue", {"clear": True})
    server.post_json("/interrupt", {})
    wait_history(server, prompt_id)


def test_numbers_count_up_front_is_negative_and_explicit_is_a_float(
        server: ServerProcess, blocker: str) -> None:
    first = submit(server, value_workflow(11))
    second = submit(server, value_workflow(12))
    front = submit(server, value_workflow(13), front=True)
    explicit = submit(server, value_workflow(14), number=1000)
    assert second["number"] == first["number"] + 1 and isinstance(second["number"], int)
    assert front["number"] == -(second["number"] + 1)
    assert explicit["number"] == 1000.0 and isinstance(explicit["number"], float)
    assert pending_ids(server) == [front["prompt_id"], first["prompt_id"],
                                   second["prompt_id"], explicit["prompt_id"]]
    queue = server.get_json("/queue")
    assert isinstance(queue, dict)
    running = queue["queue_running"][0]
    assert running[1] == blocker and running[4] == ["3"] and "create_time" in running[3]
    assert server.get_json("/prompt") == {"exec_info": {"queue_remaining": 5}}


def test_rejected_prompt_uses_up_a_number(server: ServerProcess) -> None:
    before = submit(server, value_workflow(15))["number"]
    status, _ = server.post_json("/prompt", {"prompt": {"1": {"class_type": "Nope"}}})
    assert status == 400
    assert submit(server, value_workflow(16))["number"] == before + 2


def test_queue_delete_and_clear_remove_only_pending_prompts(
        server: ServerProcess, blocker: str) -> None:
    ids = [submit(server, value_workflow(20 + i))["prompt_id"] for i in range(3)]
    assert server.post_json("/queue", {"delete": [ids[1], blocker]}) == (200, None)
    assert pending_ids(server) == [ids[0], ids[2]]
    assert server.post_json("/api/queue", {"clear": True}) == (200, None)
    assert pending_ids(server) == []
    wait_running(server, blocker)  # the running prompt is untouched


def test_interrupt_for_another_prompt_is_ignored_and_the_right_one_stops(
        server: ServerProcess) -> None:
    with EventRecorder(ws_url(server)) as recorder:
        prompt_id = submit(server, slow_workflow(2, steps=400, delay=0.05),
                           recorder.sid)["prompt_id"]
        recorder.wait_for(lambda m: is_json(m, "progress"))
        assert server.post_json("/interrupt", {"prompt_id": "someone-else"}) == (200, None)
        seen = len(recorder.messages)
        recorder.wait_for(lambda m: is_json(m, "progress"), start=seen)  # still running
        assert server.post_json("/api/interrupt", {"prompt_id": prompt_id}) == (200, None)
        recorder.wait_end(prompt_id)
        tail = [summary(m) for m in recorder.messages[-3:]]
        assert tail == [("execution_interrupted",), ("status", 0), ("executing", None)]
        stopped = recorder.of_type("execution_interrupted")[0]["data"]
        assert stopped["node_id"] == "2" and stopped["node_type"] == "LoomTestSlow"
        assert stopped["executed"] == ["1"]
    entry = wait_history(server, prompt_id)
    assert entry["status"]["status_str"] == "error" and not entry["status"]["completed"]
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert server.get_json(f"/jobs/{prompt_id}")["status"] == "cancelled"


def test_interrupt_with_an_empty_body_stops_whatever_runs(server: ServerProcess) -> None:
    prompt_id = submit(server, slow_workflow(3, steps=400, delay=0.05))["prompt_id"]
    wait_running(server, prompt_id)
    assert server.post_json("/interrupt", None)[0] == 200
    entry = wait_history(server, prompt_id)
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"


def test_validation_failure_is_a_400_with_every_node_error(server: ServerProcess) -> None:
    graph = value_workflow(5000, "LoomTestSlow", steps=0, delay=0.0)
    status, reply = server.post_json("/prompt", {"prompt": graph})
    assert status == 400 and isinstance(reply, dict)
    assert reply["error"]["type"] == "prompt_outputs_failed_validation"
    assert reply["error"]["message"] == "Prompt outputs failed validation"
    assert set(reply["error"]) == {"type", "message", "details", "extra_info"}
    assert sorted(reply["node_errors"]) == ["1", "2"]
    first = reply["node_errors"]["1"]
    assert first["class_type"] == "LoomTestValue" and first["dependent_outputs"] == ["3"]
    assert first["errors"][0]["type"] == "value_bigger_than_max"
    assert first["errors"][0]["extra_info"]["received_value"] == 5000


@pytest.mark.parametrize(("body", "kind"), [
    ({"client_id": "x"}, "no_prompt"),
    ({"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}, "invalid_prompt"),
    ({"prompt": {"1": {"inputs": {}}}}, "invalid_prompt"),
    ({"prompt": {"1": {"class_type": "LoomTestValue", "inputs": {"value": 1}}}},
     "prompt_no_outputs"),
    ({"prompt": "not a graph"}, "invalid_prompt"),
])
def test_rejections_use_comfyui_error_types(server: ServerProcess, body: dict,
                                            kind: str) -> None:
    status, reply = server.post_json("/prompt", body)
    assert status == 400 and isinstance(reply, dict)
    assert reply["error"]["type"] == kind and "node_errors" in reply


def test_partly_valid_prompt_runs_its_good_outputs(server: ServerProcess) -> None:
    graph = {**value_workflow(30),
             "9": {"class_type": "LoomTestShow", "inputs": {"value": ["404", 0], "label": "a"}},
             "8": {"class_type": "LoomTestShow", "inputs": {"value": ["1", 0], "label": "b"}}}
    reply = submit(server, graph)
    assert sorted(reply["node_errors"]) == ["9"]
    entry = wait_history(server, reply["prompt_id"])
    assert sorted(entry["prompt"][4]) == ["3", "8"]
    assert sorted(entry["outputs"]) == ["3", "8"]


def test_partial_execution_targets_run_only_those_outputs(server: ServerProcess) -> None:
    graph = {**value_workflow(40),
             "4": {"class_type": "LoomTestShow", "inputs": {"value": ["1", 0], "label": "b"}}}
    reply = submit(server, graph, partial_execution_targets=["4"])
    entry = wait_history(server, reply["prompt_id"])
    assert entry["prompt"][4] == ["4"] and entry["outputs"] == {"4": {"text": ["b=40"]}}


def test_jobs_lists_statuses_and_accepts_cancelled(server: ServerProcess) -> None:
    # two earlier jobs, so that the page of two at offset 1 has more after it
    earlier = [submit(server, value_workflow(value))["prompt_id"] for value in (48, 49)]
    done = submit(server, value_workflow(50))["prompt_id"]
    failed = submit(server, value_workflow(51, "LoomTestFail"))["prompt_id"]
    for prompt_id in (*earlier, done):
        wait_history(server, prompt_id)
    wait_history(server, failed)
    page = server.get_json("/api/jobs?status=completed,failed,cancelled&limit=200&offset=0")
    assert isinstance(page, dict)
    statuses = {job["id"]: job["status"] for job in page["jobs"]}
    assert statuses[done] == "completed" and statuses[failed] == "failed"
    assert page["pagination"]["limit"] == 200 and page["pagination"]["has_more"] is False
    created = [job["create_time"] for job in page["jobs"]]
    assert created == sorted(created, reverse=True)
    two = server.get_json("/api/jobs?limit=2&offset=1")
    assert len(two["jobs"]) == 2 and two["pagination"]["has_more"] is True
    assert two["jobs"] == server.get_json("/api/jobs")["jobs"][1:3]
    failure = server.get_json(f"/api/jobs/{failed}")
    assert failure["execution_error"]["exception_message"] == "deliberate failure"
    assert failure["workflow"]["prompt"]["2"]["class_type"] == "LoomTestFail"
    status, reply = server.post_json("/api/jobs/cancel", {"job_ids": [done]})
    assert status == 200 and reply == {"cancelled": []}


def test_jobs_rejects_an_unknown_status_and_unknown_ids(server: ServerProcess) -> None:
    import urllib.error
    with pytest.raises(urllib.error.HTTPError) as error:
        server.get_json("/api/jobs?status=completed,lost")
    assert error.value.code == 400
    assert b"Invalid status value(s): lost" in error.value.read()
    with pytest.raises(urllib.error.HTTPError) as missing:
        server.get_json("/api/jobs/no-such-job")
    assert missing.value.code == 404


def test_pending_and_running_jobs(server: ServerProcess, blocker: str) -> None:
    waiting = submit(server, value_workflow(60))["prompt_id"]
    page = server.get_json("/api/jobs?status=in_progress,pending&limit=200&offset=0")
    assert [(job["id"], job["status"]) for job in page["jobs"]] == [
        (waiting, "pending"), (blocker, "in_progress")]


def test_a_reconnecting_tab_is_told_which_node_runs(server: ServerProcess) -> None:
    with EventRecorder(ws_url(server) + "?clientId=tab-1") as tab:
        prompt_id = submit(server, slow_workflow(4, steps=400, delay=0.05), tab.sid)["prompt_id"]
        tab.wait_for(lambda m: is_json(m, "progress"))
    with EventRecorder(ws_url(server) + "?clientId=tab-1") as reloaded:
        running = reloaded.wait_for(lambda m: is_json(m, "executing"))
        assert running["data"] == {"node": "2", "display_node": "2", "prompt_id": prompt_id}
        server.post_json("/interrupt", {"prompt_id": prompt_id})
        reloaded.wait_end(prompt_id)


def test_log_has_no_tracebacks(server: ServerProcess) -> None:
    """Runs last in this module: nothing above crashed inside the server."""
    assert "Traceback" not in server.log(), server.log()

"""End to end: prompts posted over HTTP to a Loom server in a subprocess, their WebSocket events,
history and saved images. One server serves the whole module (each start costs seconds)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import pytest
from PIL import Image

from tests.web.conftest import ServerProcess, start_server
from tests.web.prompt_helpers import (
    base_with_test_pack,
    editor_image_workflow,
    image_workflow,
    slow_workflow,
    submit,
    value_workflow,
    wait_history,
    ws_url,
)
from tests.web.wsclient import EventRecorder, is_json, summary


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = base_with_test_pack(tmp_path_factory.mktemp("prompt") / "base")
    process = start_server(base)
    yield process
    process.stop()


def run_recorded(server: ServerProcess, prompt: dict, **extra: object,
                 ) -> tuple[str, list[tuple[object, ...]], EventRecorder]:
    """Post `prompt` from a fresh client; its message summaries up to the end marker."""
    recorder = EventRecorder(ws_url(server))
    reply = submit(server, prompt, recorder.sid, **extra)
    recorder.wait_end(reply["prompt_id"])
    recorder.close()
    return reply["prompt_id"], [summary(m) for m in recorder.messages[1:]], recorder


def fresh_run_sequence(order: list[str], outputs: set[str]) -> list[tuple[object, ...]]:
    """API.md section 3, fresh run: progress_state before each executing; a node's finished
    state after its executed message."""
    expected: list[tuple[object, ...]] = [("status", 1), ("status", 1), ("execution_start",),
                                          ("execution_cached", ())]
    states: list[tuple[str, str]] = []
    for node in order:
        expected += [("progress_state", (*states, (node, "running"))), ("executing", node)]
        if node in outputs:
            expected.append(("executed", node))
        states.append((node, "finished"))
        expected.append(("progress_state", tuple(states)))
    return expected + [("execution_success",), ("status", 0), ("executing", None)]


def test_fresh_then_fully_cached_run_send_comfyui_event_sequences(server: ServerProcess) -> None:
    prompt_id, events, _ = run_recorded(server, image_workflow(16))
    order = [event[1] for event in events if event[0] == "executing" and event[1]]
    assert order[:2] == ["1", "2"] and sorted(order[2:]) == ["3", "4"]
    assert events == fresh_run_sequence(order, {"3", "4"})

    again_id, cached, _ = run_recorded(server, image_workflow(16))
    shown = [event[1] for event in cached if event[0] == "executed"]
    assert sorted(shown) == ["3", "4"]
    assert cached == [("status", 1), ("status", 1), ("execution_start",),
                      ("execution_cached", tuple(order)), ("executed", shown[0]),
                      ("progress_state", ((shown[0], "finished"),)), ("executed", shown[1]),
                      ("progress_state", ((shown[0], "finished"), (shown[1], "finished"))),
                      ("execution_success",), ("status", 0), ("executing", None)]
    first, second = wait_history(server, prompt_id), wait_history(server, again_id)
    assert second["outputs"] == first["outputs"]  # a fully cached run still lists its outputs


def test_history_entry_has_comfyui_shape_and_timings(server: ServerProcess) -> None:
    workflow = image_workflow(24, "hist/client")
    prompt_id, _, _ = run_recorded(server, workflow, extra_data={"note": "kept"})
    entry = wait_history(server, prompt_id)
    number, item_id, graph, extra, outputs = entry["prompt"]
    assert item_id == prompt_id and graph == workflow and sorted(outputs) == ["3", "4"]
    assert extra["note"] == "kept" and isinstance(extra["create_time"], int)
    assert isinstance(number, int) and "client_id" in extra
    assert entry["outputs"]["3"] == {"images": [{"filename": "client_00001_.png",
                                                 "subfolder": "hist", "type": "output"}]}
    assert entry["outputs"]["4"]["images"][0]["type"] == "temp"
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached",
                                                           "execution_success"]
    assert entry["meta"]["3"] == {"node_id": "3", "display_node": "3", "parent_node": None,
                                  "real_node_id": "3"}
    assert set(entry["timings"]) == {"1", "2", "3", "4"}
    assert entry["timings"]["1"]["cached"] is False


def test_a_cached_re_run_times_no_node_and_names_the_cached_ones_once(
        server: ServerProcess) -> None:
    workflow = value_workflow(41)
    run_recorded(server, workflow)
    prompt_id, _, _ = run_recorded(server, workflow)
    entry = wait_history(server, prompt_id)
    assert entry["timings"] == {}
    cached = [data for name, data in entry["status"]["messages"] if name == "execution_cached"]
    assert [sorted(data["nodes"]) for data in cached] == [["1", "3"]]
    assert entry["outputs"]["3"] == {"text": ["value=41"]}


def test_editor_format_runs_and_its_graph_is_written_into_the_png(server: ServerProcess) -> None:
    workflow = editor_image_workflow(32, "editor/run")
    prompt_id, events, _ = run_recorded(server, workflow)
    assert ("execution_success",) in events
    entry = wait_history(server, prompt_id)
    assert entry["prompt"][2]["1"]["inputs"]["width"] == 32
    assert entry["prompt"][3]["extra_pnginfo"]["workflow"] == workflow
    with Image.open(server.base / "output" / "editor" / "run_00001_.png") as image:
        assert json.loads(image.text["workflow"]) == workflow
        assert json.loads(image.text["prompt"])["1"]["class_type"] == "EmptyImage"


def test_posted_workflow_reaches_the_saved_png(server: ServerProcess) -> None:
    editor_graph = {"nodes": [], "links": [], "version": 0.4, "marker": "from-the-editor"}
    prompt_id, _, _ = run_recorded(server, image_workflow(40, "api/run"),
                                   extra_data={"extra_pnginfo": {"workflow": editor_graph}})
    wait_history(server, prompt_id)
    with Image.open(server.base / "output" / "api" / "run_00001_.png") as image:
        assert json.loads(image.text["workflow"]) == editor_graph
        assert json.loads(image.text["prompt"]) == image_workflow(40, "api/run")


def test_node_failure_sends_execution_error_and_the_server_carries_on(
        server: ServerProcess) -> None:
    prompt_id, events, recorder = run_recorded(server, value_workflow(3, "LoomTestFail"))
    assert events == [("status", 1), ("status", 1), ("execution_start",),
                      ("execution_cached", ()), ("progress_state", (("1", "running"),)),
                      ("executing", "1"), ("progress_state", (("1", "finished"),)),
                      ("progress_state", (("1", "finished"), ("2", "running"))),
                      ("executing", "2"), ("execution_error",), ("status", 0),
                      ("executing", None)]
    error = recorder.of_type("execution_error")[0]["data"]
    assert error["node_id"] == "2" and error["node_type"] == "LoomTestFail"
    assert error["executed"] == ["1"] and error["exception_type"] == "RuntimeError"
    assert error["exception_message"] == "deliberate failure"
    entry = wait_history(server, prompt_id)
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1] == ["execution_error", error]
    _, after, _ = run_recorded(server, value_workflow(4))
    assert ("execution_success",) in after


def test_a_node_text_reaches_its_client_as_a_progress_text_frame(server: ServerProcess) -> None:
    prompt = {"1": {"class_type": "EmptyImage",
                    "inputs": {"width": 24, "height": 16, "batch_size": 2, "color": 0}},
              "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
              "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    _, _, recorder = run_recorded(server, prompt)
    (frame,) = [m for m in recorder.messages if isinstance(m, bytes)]
    kind, size = struct.unpack(">II", frame[:8])
    assert kind == 3 and frame[8:8 + size] == b"2"
    assert frame[8 + size:].decode() == "width: 24, height: 16\n batch size: 2"


def test_progress_and_previews_reach_only_the_submitting_client(server: ServerProcess) -> None:
    with EventRecorder(ws_url(server), {"supports_preview_metadata": True}) as editor, \
            EventRecorder(ws_url(server)) as bystander:
        editor.wait_for(lambda m: is_json(m, "feature_flags"))
        reply = submit(server, slow_workflow(5, steps=3, delay=0.01), editor.sid)
        editor.wait_end(reply["prompt_id"])
        bystander.wait_for(lambda m: is_json(m, "status")
                           and m["data"]["status"]["exec_info"]["queue_remaining"] == 0)
        steps = [summary(m) for m in editor.messages
                 if isinstance(m, bytes) or is_json(m, "progress")]
        assert steps == [("binary", 4), ("progress", "2", 1, 3), ("binary", 4),
                         ("progress", "2", 2, 3), ("binary", 4), ("progress", "2", 3, 3)]
        frame = next(m for m in editor.messages if isinstance(m, bytes))
        size = struct.unpack(">I", frame[4:8])[0]
        assert json.loads(frame[8:8 + size]) == {
            "node_id": "2", "prompt_id": reply["prompt_id"], "display_node_id": "2",
            "parent_node_id": None, "real_node_id": "2", "image_type": "image/jpeg"}
        assert frame[8 + size:8 + size + 2] == b"\xff\xd8"  # a JPEG
        assert {m["type"] for m in bystander.messages if isinstance(m, dict)} == {"status"}
        assert not any(isinstance(m, bytes) for m in bystander.messages)
        flags = editor.of_type("feature_flags")[0]["data"]
        assert flags["supports_preview_metadata"] is True
        assert flags == server.get_json("/features")
    with EventRecorder(ws_url(server)) as plain:
        reply = submit(server, slow_workflow(6, steps=2, delay=0.01), plain.sid)
        plain.wait_end(reply["prompt_id"])
        frames = [m for m in plain.messages if isinstance(m, bytes)]
        assert len(frames) == 2 and frames[0][:8] == struct.pack(">II", 1, 1)


def test_progress_state_carries_step_values(server: ServerProcess) -> None:
    _, _, recorder = run_recorded(server, slow_workflow(7, steps=2, delay=0.01))
    seen: list[tuple[object, str]] = []
    for message in recorder.of_type("progress_state"):
        state = message["data"]["nodes"].get("2")
        if state and (not seen or seen[-1] != (state["value"], state["state"])):
            seen.append((state["value"], state["state"]))
    assert seen == [(0, "running"), (1, "running"), (2, "running"), (2, "finished")]


def test_reconnecting_client_keeps_its_id(server: ServerProcess) -> None:
    with EventRecorder(ws_url(server) + "?clientId=my-tab") as recorder:
        assert recorder.sid == "my-tab"
        reply = submit(server, value_workflow(8), "my-tab")
        recorder.wait_end(reply["prompt_id"])
        texts = [m["data"]["output"]["text"] for m in recorder.of_type("executed")]
        assert texts == [["value=8"]]


def test_script_client_without_client_id_gets_its_result_from_history(
        server: ServerProcess) -> None:
    reply = submit(server, value_workflow(9))
    entry = wait_history(server, reply["prompt_id"])
    assert entry["outputs"] == {"3": {"text": ["value=9"]}}
    assert "client_id" not in entry["prompt"][3]


def test_api_prefix_and_bare_routes_answer_alike(server: ServerProcess) -> None:
    assert server.get_json("/api/prompt") == server.get_json("/prompt")
    status, reply = server.post_json("/api/prompt", {"prompt": value_workflow(10)})
    assert status == 200 and isinstance(reply, dict)
    wait_history(server, reply["prompt_id"])


def test_history_paging_and_deletion(server: ServerProcess) -> None:
    ids = [submit(server, value_workflow(100 + i))["prompt_id"] for i in range(3)]
    for prompt_id in ids:
        wait_history(server, prompt_id)
    everything = server.get_json("/history")
    assert isinstance(everything, dict) and list(everything)[-3:] == ids
    assert list(server.get_json("/history?max_items=2")) == ids[1:]
    total = len(everything)
    assert list(server.get_json(f"/history?max_items=2&offset={total - 3}")) == ids[:2]
    assert server.get_json("/history/no-such-prompt") == {}
    assert server.post_json("/history", {"delete": [ids[0]]}) == (200, None)
    assert ids[0] not in server.get_json("/history")
    assert server.get_json(f"/api/jobs/{ids[1]}")["status"] == "completed"


def test_saved_file_path_is_the_history_output(server: ServerProcess) -> None:
    prompt_id, _, _ = run_recorded(server, image_workflow(48, "paths/x"))
    image = wait_history(server, prompt_id)["outputs"]["3"]["images"][0]
    assert (server.base / "output" / image["subfolder"] / image["filename"]).is_file()


def test_free_memory_drops_cached_outputs(server: ServerProcess) -> None:
    run_recorded(server, image_workflow(56, "free/x"))
    assert server.post_json("/free", {"unload_models": True, "free_memory": True}) == (200, None)
    _, events, _ = run_recorded(server, image_workflow(56, "free/x"))
    assert ("execution_cached", ()) in events and ("executing", "1") in events


def test_log_has_no_tracebacks(server: ServerProcess) -> None:
    """Runs last in this module: nothing above crashed inside the server."""
    assert "Traceback" not in server.log(), server.log()


def test_a_10000_deep_chain_runs_and_its_re_post_is_answered_from_the_cache(
        server: ServerProcess) -> None:
    """Depth costs no recursion anywhere on the way (validation, keys, execution, events,
    history); the re-post announces every node cached in one message."""
    depth = 10_000
    chain = {"0": {"class_type": "LoomTestValue", "inputs": {"value": 1}}}
    for index in range(1, depth - 1):
        chain[str(index)] = {"class_type": "LoomTestIncrement",
                             "inputs": {"value": [str(index - 1), 0]}}
    chain[str(depth - 1)] = {"class_type": "LoomTestShow",
                             "inputs": {"value": [str(depth - 2), 0], "label": "end"}}
    first_id, _, _ = run_recorded(server, chain)
    assert wait_history(server, first_id)["outputs"][str(depth - 1)] == {
        "text": [f"end={depth - 1}"]}
    again_id, again, _ = run_recorded(server, chain)
    cached = [event for event in again if event[0] == "execution_cached"]
    assert len(cached) == 1 and len(cached[0][1]) == depth
    assert not [event for event in again if event[0] == "executing" and event[1] is not None]
    assert wait_history(server, again_id)["status"]["completed"]

"""The worker's listener calls replayed on the server: what a local run's listener would see."""

from __future__ import annotations

import queue

from engine.cluster.protocol import Batch
from engine.cluster.relay import RelayListener, replay
from engine.events import RecordingListener


def relayed() -> RecordingListener:
    stream: queue.Queue = queue.Queue()
    relay = RelayListener(stream, lambda output: [], "worker-1")
    relay.text("p", "7", "width: 8, height: 8\n batch size: 1")
    relay.event("executed", {"node": "7", "output": None, "prompt_id": "p"})
    batch = Batch([stream.get_nowait()[0] for _ in range(stream.qsize())])
    server_side = RecordingListener()
    replay(batch, server_side, "p", lambda output: output)
    return server_side


def test_a_node_text_from_a_worker_reaches_the_server_listener_in_order() -> None:
    server_side = relayed()
    assert server_side.texts == [("7", "width: 8, height: 8\n batch size: 1")]
    assert server_side.names() == ["executed"]

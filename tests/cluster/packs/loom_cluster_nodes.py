"""Test-only node for the cluster tests, copied into a server's custom_nodes/ folder: one that
kills the process running it (a worker actor), to test what a worker's death does."""

from __future__ import annotations

import os
import signal

from engine.context import NodeContext
from engine.node import Int, Link, Node, NodeSchema, Output


class LoomTestDie(Node):
    """SIGKILLs its own process, unless that is process `spare_pid` (the test itself)."""

    schema = NodeSchema("LoomTestDie", (Link("value", "INT"), Int("spare_pid", 0, min=0,
                                                                   max=2**31 - 1)),
                        (Output("INT"),), category="testing", idempotent=False)

    def execute(self, ctx: NodeContext, value: int, spare_pid: int) -> tuple[int]:
        if os.getpid() != spare_pid:
            os.kill(os.getpid(), signal.SIGKILL)
        return (value,)


NODE_CLASS_MAPPINGS = {"LoomTestDie": LoomTestDie}

"""POST /prompt remembers the latest body: the same bytes again reuse its parse and snapshot."""

from __future__ import annotations

import json

from web.routes_prompt import LastRequest

PROMPT = {"1": {"class_type": "Value", "inputs": {"value": 1}}}


def body_bytes(prompt: dict[str, object]) -> bytes:
    return json.dumps({"prompt": prompt, "client_id": "c"}).encode()


def test_a_body_sent_again_byte_for_byte_is_not_parsed_again() -> None:
    last = LastRequest()
    first = last.body(body_bytes(PROMPT))
    assert last.body(body_bytes(PROMPT)) is first


def test_a_changed_body_is_parsed_anew() -> None:
    last = LastRequest()
    last.body(body_bytes(PROMPT))
    changed = {"1": {"class_type": "Value", "inputs": {"value": 2}}}
    assert last.body(body_bytes(changed))["prompt"] == changed


def test_a_body_sent_again_keeps_its_snapshot_and_a_built_body_gets_its_own() -> None:
    last = LastRequest()
    raw = body_bytes(PROMPT)
    snapshot = last.snapshot(raw, PROMPT)
    assert last.snapshot(raw, PROMPT) is snapshot
    assert last.snapshot(None, PROMPT) is not snapshot

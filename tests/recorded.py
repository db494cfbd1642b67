"""The recorded reference data in tests/data (ComfyUI's node schemas and editor workflows, the
real checkpoint layouts): the one way tests open it. A missing file fails the test with its
name; it never skips, so a clone that lost a fixture cannot pass silently."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"


class MissingFixtureError(FileNotFoundError):
    """A recorded file that the repository ships under tests/data is not there."""


def data_path(relative: str) -> Path:
    """The path of tests/data/<relative>; raises MissingFixtureError naming it when absent."""
    path = DATA_DIR / relative
    if not path.is_file():
        raise MissingFixtureError(
            f"recorded fixture tests/data/{relative} is missing (looked for {path}); it is part"
            " of the repository (tests/data/README.md lists each file and its origin): restore"
            " it with `git checkout -- tests/data`")
    return path


def data_text(relative: str) -> str:
    """The text of tests/data/<relative>."""
    return data_path(relative).read_text(encoding="utf-8")


def data_json(relative: str) -> Any:
    """tests/data/<relative> parsed as JSON (a fresh object each call: callers may change it)."""
    return json.loads(data_text(relative))

"""The recorded reference data under tests/data: a missing file is an error naming it, every
file there is described in its README, and the two schema recordings agree."""

from __future__ import annotations

import pytest

from tests.recorded import DATA_DIR, MissingFixtureError, data_json, data_path


def test_a_missing_fixture_is_an_error_naming_the_file() -> None:
    with pytest.raises(MissingFixtureError, match=r"tests/data/compat/absent\.json is missing"):
        data_path("compat/absent.json")


def test_a_missing_fixture_is_a_file_not_found_error() -> None:
    with pytest.raises(FileNotFoundError, match="git checkout -- tests/data"):
        data_json("formats/absent.tsv")


def test_every_recorded_file_is_described_in_the_readme() -> None:
    readme = data_path("README.md").read_text(encoding="utf-8")
    files = [path for path in DATA_DIR.rglob("*") if path.is_file() and path.name != "README.md"]
    assert files
    undescribed = [str(path.relative_to(DATA_DIR)) for path in files
                   if f"`{path.name}`" not in readme]
    assert not undescribed, f"tests/data/README.md does not describe {undescribed}"


def test_the_full_schema_recording_holds_the_core_entries_unchanged() -> None:
    core = data_json("compat/object_info_core.json")
    full = data_json("compat/object_info_full.json")
    assert len(full) == 445
    assert {name: full.get(name) for name in core} == core

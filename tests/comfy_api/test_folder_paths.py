"""folder_paths reads and writes the process's Paths."""

from __future__ import annotations

from pathlib import Path

from tests.model_engine import ModelEngine


def test_folders_and_files_come_from_looms_paths(bound: ModelEngine) -> None:
    import folder_paths
    name = "folder_paths_probe.safetensors"
    (bound.base / "models" / "loras").mkdir(parents=True, exist_ok=True)
    (bound.base / "models" / "loras" / name).write_bytes(b"")
    assert name in folder_paths.get_filename_list("loras")
    assert folder_paths.get_full_path("loras", name) == str(bound.base / "models/loras" / name)
    assert folder_paths.get_full_path("loras", "absent.safetensors") is None
    assert folder_paths.get_output_directory() == str(bound.services.paths.output)
    assert folder_paths.models_dir == str(bound.base / "models")


def test_a_folder_a_pack_registers_is_searched_by_loom(bound: ModelEngine) -> None:
    import folder_paths
    assert bound.services.paths.folder_dirs("basics_models") == [
        bound.base / "models" / "basics_models"]
    folder_paths.add_model_folder_path("basics_models", str(bound.base / "more"))
    assert folder_paths.get_folder_paths("basics_models")[-1] == str(bound.base / "more")


def test_annotated_names_point_into_their_folder(bound: ModelEngine) -> None:
    import folder_paths
    assert folder_paths.get_annotated_filepath("a.png [output]") == str(
        Path(folder_paths.get_output_directory()) / "a.png")
    assert folder_paths.get_annotated_filepath("b.png") == str(
        Path(folder_paths.get_input_directory()) / "b.png")


def test_save_image_path_counts_past_existing_files(bound: ModelEngine) -> None:
    import folder_paths
    output = Path(folder_paths.get_output_directory()) / "sub"
    output.mkdir(parents=True, exist_ok=True)
    (output / "shot_00004_.png").write_bytes(b"")
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        "sub/shot", folder_paths.get_output_directory(), 64, 64)
    assert (Path(folder), filename, counter, subfolder) == (output, "shot", 5, "sub")

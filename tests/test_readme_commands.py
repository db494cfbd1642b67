"""The README's `python -m` commands name modules that exist, and its checkpoint-writing command
writes a checkpoint Loom detects (so moving a module cannot silently break the quick start)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from engine.diffusion.checkpoints.detect import detect_checkpoint
from engine.diffusion.checkpoints.state_files import open_state_file

README = Path(__file__).resolve().parent.parent / "README.md"
MODULE_COMMAND = re.compile(r"python -m ([\w.]+)(.*)")


def readme_module_commands() -> list[tuple[str, str]]:
    return [(match[1], match[2].strip())
            for match in MODULE_COMMAND.finditer(README.read_text(encoding="utf-8"))]


def test_every_readme_module_command_names_an_existing_module() -> None:
    commands = readme_module_commands()
    assert commands
    assert [module for module, _ in commands if importlib.util.find_spec(module) is None] == []


def test_the_readme_checkpoint_command_writes_a_detectable_sd15_checkpoint(tmp_path: Path) -> None:
    module, arguments = next((module, arguments) for module, arguments in readme_module_commands()
                             if module.endswith(".writer"))
    target = tmp_path / Path(arguments.split()[0]).name
    subprocess.run([sys.executable, "-m", module, str(target), *arguments.split()[1:]],
                   check=True, cwd=README.parent, capture_output=True)
    assert detect_checkpoint(open_state_file(target).tensors).family == "sd1"

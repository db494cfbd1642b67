"""What engine/custom_nodes.py installs before packs load: the MODEL/CLIP/VAE value bridge and
the importer for ComfyUI internals Loom does not reproduce."""

from __future__ import annotations

from typing import Any

from loom_internals import install_finder
from loom_values import ValueBridge


def install(host: Any) -> None:
    host.values = ValueBridge()
    install_finder()

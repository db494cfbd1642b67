"""ComfyUI's `comfy.comfy_types.node_typing`: IO (the socket type names, as strings) and the
typing helpers classic node classes may inherit from."""

from __future__ import annotations

import enum
from abc import ABC
from typing import Any


class IO(enum.StrEnum):
    """Socket type names; each member is the plain string the protocol uses."""

    STRING = "STRING"
    IMAGE = "IMAGE"
    MASK = "MASK"
    LATENT = "LATENT"
    BOOLEAN = "BOOLEAN"
    INT = "INT"
    FLOAT = "FLOAT"
    COMBO = "COMBO"
    CONDITIONING = "CONDITIONING"
    SAMPLER = "SAMPLER"
    SIGMAS = "SIGMAS"
    GUIDER = "GUIDER"
    NOISE = "NOISE"
    CLIP = "CLIP"
    CONTROL_NET = "CONTROL_NET"
    VAE = "VAE"
    MODEL = "MODEL"
    CLIP_VISION = "CLIP_VISION"
    CLIP_VISION_OUTPUT = "CLIP_VISION_OUTPUT"
    STYLE_MODEL = "STYLE_MODEL"
    GLIGEN = "GLIGEN"
    UPSCALE_MODEL = "UPSCALE_MODEL"
    AUDIO = "AUDIO"
    WEBCAM = "WEBCAM"
    POINT = "POINT"
    FACE_ANALYSIS = "FACE_ANALYSIS"
    BBOX = "BBOX"
    SEGS = "SEGS"
    VIDEO = "VIDEO"
    ANY = "*"
    NUMBER = "FLOAT,INT"
    PRIMITIVE = "STRING,FLOAT,INT,BOOLEAN"


InputTypeDict = dict[str, Any]
InputTypeOptions = dict[str, Any]


class ComfyNodeABC(ABC):  # noqa: B024 - ComfyUI's marker base with no abstract methods
    """Optional base of classic node classes (a typing aid in ComfyUI)."""

    DESCRIPTION: str = ""
    CATEGORY: str = ""

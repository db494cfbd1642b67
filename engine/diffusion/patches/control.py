"""ControlNets and T2I-Adapters at sampling time: the CONTROL_NET value (`ControlModel`) and the
control objects that ControlNetApply(Advanced) store in a conditioning entry's
`options["control"]`.

Contract with the sampling guidance (`ControlProvider` in sampling/conditioning.py), per
control attached to the entries of one sampling run:

    control.prepare(model, latent_shape)   # once per run, before the first call
    down, mid = control.residuals(x_in, timestep, context, y, sigma)       # every UNet call
    extra = control.input_residuals(x_in, timestep, context, y, sigma)    # every UNet call
    unet(x_in, timestep, context, y, down_residuals=down, mid_residual=mid,
         input_residuals=extra)

`x_in` is the UNet's input (c_in-scaled latent, maybe cropped to an area; extra inpainting
channels are ignored) and may batch several entries that share this control (cond and uncond);
`timestep` is the UNet's timestep, `context`/`y` what the UNet gets, `sigma` the noise level.
Every method walks the chain of `previous` controls (several ControlNets on one conditioning)
and returns the sum of their residuals; any part may be None (nothing to add). ControlNets
give `down`/`mid`; T2I-Adapters give `extra` (added to the input blocks' outputs, as ComfyUI
does) and, for SDXL adapters, `mid`. `prepare` binds start/end percents to the model's sigma
schedule and tells batched entries apart for the hint batch rule; without it only the full
0..1 range works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.diffusion.networks.controlnet import HINT_DOWNSCALE, ControlNet
from engine.diffusion.networks.t2i_adapter import AdapterFeatures, T2IAdapter
from engine.diffusion.patches.model_handle import ModelHandle
from engine.image_ops import center_crop

Residuals = tuple[list[Tensor] | None, Tensor | None]
ALWAYS = (math.inf, 0.0)  # (start sigma, end sigma) of a 0..1 percent range


@dataclass(frozen=True, eq=False)
class ControlModel:
    """A CONTROL_NET value: a loaded ControlNet or T2I-Adapter, shared by every control made
    from it. `global_average_pooling` (shuffle ControlNets) averages each residual over space;
    `control_type` holds the ControlNet-Union type numbers SetUnionControlNetType selected
    (empty: "auto"; other networks ignore it)."""

    network: ControlNet | T2IAdapter
    name: str = ""
    global_average_pooling: bool = False
    control_type: tuple[int, ...] = ()

    @property
    def is_adapter(self) -> bool:
        return isinstance(self.network, T2IAdapter)

    def __loom_digest__(self) -> None:
        """Not content-hashable: downstream cache keys use the loader's key instead."""
        return None

    def __loom_nbytes__(self) -> int:
        """Weights are accounted by the model manager, not the output cache."""
        return 0


def resize_hint(images: Tensor, height: int, width: int) -> Tensor:
    """ComfyUI's hint rule: centre-crop (B, C, H, W) to the target aspect ratio, then
    nearest-exact resize to height x width."""
    return F.interpolate(center_crop(images, width, height), size=(height, width),
                         mode="nearest-exact")


def broadcast_hint(images: Tensor, batch: int, chunks: int = 1) -> Tensor:
    """Hint images for a model batch of `chunks` equal parts (conds batched in one call): one
    image is shared by all; otherwise each part takes the images in order, cycling when there
    are fewer images than latents and dropping the extras (ComfyUI's broadcast_image_to)."""
    count = images.shape[0]
    if count == 1 or count == batch:
        return images
    per_chunk = batch // chunks
    part = images.repeat(-(-per_chunk // count), 1, 1, 1)[:per_chunk]
    return part.repeat(chunks, 1, 1, 1)


def _add(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    if first is None:
        return second
    return first if second is None else first + second


def _add_lists(first: Sequence[Tensor | None] | None, second: Sequence[Tensor | None] | None
               ) -> list[Any] | None:
    if first is None or second is None:
        return None if first is None and second is None else list(first or second or ())
    if len(first) != len(second):
        raise ValueError(f"chained controls give {len(first)} and {len(second)} residuals; "
                         "chain only ControlNets/adapters made for the same model family")
    return [_add(a, b) for a, b in zip(first, second, strict=True)]


@dataclass
class _RunState:
    """What `prepare` binds and what is computed once per hint size (one entry each)."""

    sigma_range: tuple[float, float] | None = None
    latent_batch: int | None = None
    hint_key: tuple[Any, ...] | None = None
    hint: Tensor | None = None
    features: AdapterFeatures | None = None


@dataclass(frozen=True, eq=False)
class Control:
    """One ControlNet/T2I-Adapter applied to a conditioning with a hint image.

    `hint` is (B, C, H, W) in 0..1 (the IMAGE moved to channels-first); it is resized to the
    latent's pixel size at sampling time. `previous` is the control this one was chained onto;
    its residuals are added to this one's. `vae` is accepted for ControlNets whose hint lives
    in latent space; the SD1.x/SD2.x/SDXL ControlNets and adapters read pixels and ignore it.
    """

    model: ControlModel
    hint: Tensor
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: Control | None = None
    vae: Any = None
    _state: _RunState = field(default_factory=_RunState, repr=False)

    def chain(self) -> list[Control]:
        """This control and everything it was chained onto, newest first."""
        links, link = [], self
        while link is not None:
            links.append(link)
            link = link.previous
        return links

    def prepare(self, model: ModelHandle, latent_shape: Sequence[int]) -> None:
        """Bind the chain to the model about to be sampled: its sigma schedule (start/end
        percent -> sigmas), device, and latent batch. Call once per sampling run."""
        for link in self.chain():
            link._bind(model, latent_shape)

    def residuals(self, x_in: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None,
                  sigma: Tensor) -> Residuals:
        """(down residuals, one per UNet input block; middle-block residual) of the chain."""
        down: list[Tensor] | None = None
        mid: Tensor | None = None
        for link in self.chain():
            if link.active(sigma):
                link_down, link_mid = link._own_residuals(x_in, timestep, context, y)
                down, mid = _add_lists(down, link_down), _add(mid, link_mid)
        return down, mid

    def input_residuals(self, x_in: Tensor, timestep: Tensor, context: Tensor,
                        y: Tensor | None, sigma: Tensor) -> list[Tensor | None] | None:
        """Residuals added to each UNet input block's output (T2I-Adapters; None otherwise)."""
        total: list[Tensor | None] | None = None
        for link in self.chain():
            if link.model.is_adapter and link.active(sigma):
                features = link._adapter_features(x_in)
                total = _add_lists(total, [link._scaled(f) for f in features.input])
        return total

    def active(self, sigma: Tensor) -> bool:
        """Whether sigma lies in this control's start..end percent range."""
        start, end = self._state.sigma_range or self._unbound_range()
        value = float(sigma.reshape(-1)[0])
        return end <= value <= start

    def cleanup(self) -> None:
        """Drop the cached hint and adapter features (after sampling)."""
        for link in self.chain():
            link._state.hint_key = link._state.hint = link._state.features = None

    def __loom_digest__(self) -> None:
        return None

    def __loom_nbytes__(self) -> int:
        return sum(link.hint.numel() * link.hint.element_size() for link in self.chain())

    # --- internals -------------------------------------------------------------------------

    def _bind(self, model: ModelHandle, latent_shape: Sequence[int]) -> None:
        self._check_fits(model)
        network = self.model.network
        if network.device != model.device:
            network.to(model.device)  # shared module: every control of it follows the model
        sampling = model.sampling
        self._state.sigma_range = (sampling.percent_to_sigma(self.start_percent),
                                   sampling.percent_to_sigma(self.end_percent))
        self._state.latent_batch = int(latent_shape[0])

    def _check_fits(self, model: ModelHandle) -> None:
        network = self.model.network
        if isinstance(network, ControlNet):
            ours = network.config.unet
            if (ours.context_dim, ours.adm_in_channels) != (model.config.context_dim,
                                                            model.config.adm_in_channels):
                raise ValueError(
                    f"ControlNet {self.model.name!r} attends to context width "
                    f"{ours.context_dim} (adm {ours.adm_in_channels}) but the model "
                    f"{model.name!r} ({model.family}) uses {model.config.context_dim} (adm "
                    f"{model.config.adm_in_channels}); use a ControlNet made for {model.family}")
        elif network.config.xl != (model.family == "sdxl"):
            raise ValueError(
                f"T2I-Adapter {self.model.name!r} is for {'SDXL' if network.config.xl else 'SD1.x'}"
                f" but the model {model.name!r} is {model.family}; use a matching adapter")

    def _unbound_range(self) -> tuple[float, float]:
        if self.start_percent <= 0.0 and self.end_percent >= 1.0:
            return ALWAYS
        raise RuntimeError(
            f"control with start_percent={self.start_percent}, end_percent={self.end_percent} "
            "was used before prepare(model, latent_shape): the percents need the model's sigma "
            "schedule; call prepare once before sampling")

    def _scaled(self, residual: Tensor | None) -> Tensor | None:
        if residual is None:
            return None
        if self.model.global_average_pooling:
            residual = residual.mean(dim=(2, 3), keepdim=True).expand_as(residual)
        return residual * self.strength

    def _own_residuals(self, x_in: Tensor, timestep: Tensor, context: Tensor,
                       y: Tensor | None) -> Residuals:
        network = self.model.network
        if isinstance(network, T2IAdapter):
            return None, self._scaled(self._adapter_features(x_in).middle)
        latent = x_in[:, :network.config.unet.in_channels]
        hint = self._hint(x_in, latent.shape[2] * HINT_DOWNSCALE,
                          latent.shape[3] * HINT_DOWNSCALE)
        with torch.no_grad():
            down, mid = network(latent, hint, timestep, context, y, self.model.control_type)
        return [self._scaled(r) for r in down], self._scaled(mid)

    def _adapter_features(self, x_in: Tensor) -> AdapterFeatures:
        network = self.model.network
        assert isinstance(network, T2IAdapter)
        hint = self._hint(x_in, *network.hint_size(x_in.shape[2], x_in.shape[3]))
        if self._state.features is None:
            with torch.no_grad():
                self._state.features = network(hint)
        return self._state.features

    def _hint(self, x_in: Tensor, height: int, width: int) -> Tensor:
        """The hint at height x width for x_in's batch, on the network's device (cached)."""
        network = self.model.network
        batch = x_in.shape[0]
        latent_batch = self._state.latent_batch
        chunks = batch // latent_batch if latent_batch and batch % latent_batch == 0 else 1
        key = (height, width, batch, chunks, network.device)
        if self._state.hint_key != key:
            resized = resize_hint(self.hint.to(network.device, torch.float32), height, width)
            self._state.hint = broadcast_hint(resized, batch, chunks).to(network.dtype)
            self._state.hint_key, self._state.features = key, None
        assert self._state.hint is not None
        return self._state.hint

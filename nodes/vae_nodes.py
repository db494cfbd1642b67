"""VAE encode/decode nodes (plain and tiled). LATENT samples are raw VAE latents, as in
ComfyUI; the model family's scale is applied by the samplers, not here."""

from __future__ import annotations

from torch import Tensor

from engine.context import NodeContext
from engine.diffusion.networks.vae_model import VAE
from engine.node import Int, Link, Node, NodeSchema, Output
from engine.values import Latent


def _tile_inputs(tile_step: int) -> tuple:
    return (Int("tile_size", 512, min=64, max=4096, step=tile_step),
            Int("overlap", 64, min=0, max=4096, step=32),
            Int("temporal_size", 64, min=8, max=4096, step=4),
            Int("temporal_overlap", 8, min=4, max=4096, step=4))


class VAEDecode(Node):
    schema = NodeSchema("VAEDecode", (Link("samples", "LATENT"), Link("vae", "VAE")),
                        (Output("IMAGE"),), category="latent", display_name="VAE Decode",
                        description="Decodes latents into images.")

    def execute(self, ctx: NodeContext, samples: Latent, vae: VAE) -> tuple[Tensor]:
        return (vae.decode(Latent.of(samples).samples),)


class VAEEncode(Node):
    schema = NodeSchema("VAEEncode", (Link("pixels", "IMAGE"), Link("vae", "VAE")),
                        (Output("LATENT"),), category="latent", display_name="VAE Encode")

    def execute(self, ctx: NodeContext, pixels: Tensor, vae: VAE) -> tuple[Latent]:
        return (Latent(vae.encode(pixels[..., :3])),)


class VAEDecodeTiled(Node):
    schema = NodeSchema("VAEDecodeTiled",
                        (Link("samples", "LATENT"), Link("vae", "VAE"), *_tile_inputs(32)),
                        (Output("IMAGE"),), category="_for_testing",
                        display_name="VAE Decode (Tiled)")

    def execute(self, ctx: NodeContext, samples: Latent, vae: VAE, tile_size: int,
                overlap: int, temporal_size: int, temporal_overlap: int) -> tuple[Tensor]:
        return (vae.decode_tiled(Latent.of(samples).samples, tile_size=tile_size,
                                 overlap=overlap, progress=ctx.progress),)


class VAEEncodeTiled(Node):
    schema = NodeSchema("VAEEncodeTiled",
                        (Link("pixels", "IMAGE"), Link("vae", "VAE"), *_tile_inputs(64)),
                        (Output("LATENT"),), category="_for_testing",
                        display_name="VAE Encode (Tiled)")

    def execute(self, ctx: NodeContext, pixels: Tensor, vae: VAE, tile_size: int,
                overlap: int, temporal_size: int, temporal_overlap: int) -> tuple[Latent]:
        return (Latent(vae.encode_tiled(pixels[..., :3], tile_size=tile_size, overlap=overlap,
                                        progress=ctx.progress)),)


NODE_TYPES = (VAEDecode, VAEEncode, VAEDecodeTiled, VAEEncodeTiled)

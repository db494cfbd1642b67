"""The torch modules, named after their checkpoint keys: UNet and its blocks, attention, VAE,
CLIP and OpenCLIP text encoders, CLIP vision, ControlNet, T2I-Adapter, style model, spandrel
upscaler, plus the networks' eps/v parameterisation (model_sampling) and tiled VAE calls.
May import memory and kernels; never reads files (that is checkpoints)."""

"""ComfyUI's `comfy.k_diffusion` package: its samplers are Loom's, under k-diffusion's names."""

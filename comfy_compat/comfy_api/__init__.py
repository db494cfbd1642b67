"""ComfyUI's `comfy_api` package for custom-node packs: the V3 node API (`comfy_api.latest`)."""

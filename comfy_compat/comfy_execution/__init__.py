"""ComfyUI's `comfy_execution` package for custom-node packs (graph helpers)."""

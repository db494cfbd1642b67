"""ComfyUI's `comfy_extras` package for custom-node packs. Each `comfy_extras.nodes_*` module
exposes, as classic classes, the Loom nodes ComfyUI defines in it (comfy_node_modules.json),
so new built-in nodes appear there as soon as they are registered; files here add the helper
functions packs also import from those modules."""

"""An example custom-node pack in ComfyUI's classic protocol, which Loom loads unmodified.

Copy this folder next to it under custom_nodes/, rename it and the classes, and restart Loom.
A pack is a folder with an __init__.py (or a single .py file) that defines the module-level
dicts NODE_CLASS_MAPPINGS and, optionally, NODE_DISPLAY_NAME_MAPPINGS and WEB_DIRECTORY.
A pack that fails to import is reported at start-up and in the editor; the others still load.
"""


class LoomExampleTextConcat:
    """Joins two texts with a separator."""

    # The inputs, as {"required": {...}, "optional": {...}, "hidden": {...}}. Each entry is
    # (TYPE, options): TYPE is a type name ("STRING", "INT", "FLOAT", "BOOLEAN", "IMAGE",
    # "LATENT", ...) or a list of choices for a drop-down. Widget options: default, min, max,
    # step, multiline, tooltip... The dict order is the widget order saved in workflows.
    # A classmethod, so that choices may be computed when the editor asks for them.
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_a": ("STRING", {"default": "", "multiline": True}),
                "text_b": ("STRING", {"default": "", "multiline": True}),
                "separator": (["space", "comma", "newline", "none"], {"default": "space"}),
            },
            # Optional inputs may be left unset; give the method's parameter a default.
            "optional": {
                "repeat": ("INT", {"default": 1, "min": 1, "max": 16,
                                   "tooltip": "How many times the joined text is repeated."}),
            },
        }

    RETURN_TYPES = ("STRING",)  # one type per output; note the comma of a 1-tuple
    RETURN_NAMES = ("text",)  # labels shown on the outputs (optional)
    OUTPUT_TOOLTIPS = ("The two texts joined by the separator.",)
    FUNCTION = "concat"  # the method Loom calls, with the inputs as keyword arguments
    CATEGORY = "examples/text"  # where the node appears in the editor's Add Node menu
    DESCRIPTION = "Joins two texts with a separator (an example classic node)."

    SEPARATORS = {"space": " ", "comma": ", ", "newline": "\n", "none": ""}

    def concat(self, text_a, text_b, separator, repeat=1):
        joined = text_a + self.SEPARATORS[separator] + text_b
        return (joined * repeat,)  # always a tuple, one value per RETURN_TYPES entry


class LoomExampleShowText:
    """Shows a text in the editor and passes it on."""

    @classmethod
    def INPUT_TYPES(cls):
        # forceInput makes a STRING an input socket instead of a text box. A hidden input is
        # filled by the engine: UNIQUE_ID is this node's id (PROMPT, EXTRA_PNGINFO also exist).
        return {
            "required": {"text": ("STRING", {"forceInput": True})},
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("STRING",)
    FUNCTION = "show"
    CATEGORY = "examples/text"
    OUTPUT_NODE = True  # an output node: running a workflow runs what its output nodes need

    def show(self, text, node_id):
        # "ui" is sent to the editor (the "executed" message); "result" feeds the outputs.
        return {"ui": {"text": [text]}, "result": (text,)}

    # Other optional hooks Loom supports:
    #   IS_CHANGED(cls, **inputs) -> a value; when it differs from the last run (or is
    #       float("nan")), the node runs again instead of reusing its cached result.
    #   VALIDATE_INPUTS(cls, name, ...) -> True or an error message; the inputs it names skip
    #       the built-in range and choice checks.
    #   check_lazy_status(self, **inputs) -> names of {"lazy": True} inputs still needed.
    #   INPUT_IS_LIST = True / OUTPUT_IS_LIST = (True,) for ComfyUI's list semantics.
    #   NOT_IDEMPOTENT = True for nodes whose result must never be shared or reused.


# class_type -> class. The class_type is what workflows save; keep it unique across packs.
NODE_CLASS_MAPPINGS = {
    "LoomExampleTextConcat": LoomExampleTextConcat,
    "LoomExampleShowText": LoomExampleShowText,
}

# class_type -> the title shown in the editor.
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoomExampleTextConcat": "Text Concat (example)",
    "LoomExampleShowText": "Show Text (example)",
}

# A folder of JavaScript editor extensions, relative to this file, would be declared as:
# WEB_DIRECTORY = "./js"

"""The model stack, one subpackage per concern, listed in `LAYERS` from the bottom up.

A subpackage imports only those below it (tests/test_layering.py holds this): memory decides
where weights live; kernels hold native code; networks are the torch modules; patches change a
network reversibly (LoRA, merges, hypernetworks, ControlNet residuals) and hold the MODEL value;
text turns prompts into conditioning; checkpoints read, detect, convert and write model files;
sampling runs the denoising loop with guidance. Modules here may also use engine's leaf helpers
(engine.image_ops, engine.values), never nodes/ or web/."""

LAYERS = ("memory", "kernels", "networks", "patches", "text", "checkpoints", "sampling")

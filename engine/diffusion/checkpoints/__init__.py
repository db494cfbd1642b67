"""Model files: opening them (safetensors memory-mapped; pickles only when allowed), detecting
what a file holds, converting foreign key layouts (text encoders, diffusers ControlNets),
loading checkpoints, ControlNets, LoRAs, hypernetworks and upscalers into values, saving
models back, and writing random test checkpoints in the real layouts.
May import every layer below it: memory, kernels, networks, patches, text."""

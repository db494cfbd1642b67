"""Where weights live: the device and dtype policy, the model manager (one loaded copy of each
file within RAM and VRAM budgets), offloading and partial loading, and oneDNN-packed conv
weights. The lowest layer: imports nothing else of engine.diffusion."""

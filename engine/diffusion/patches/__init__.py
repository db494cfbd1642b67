"""Changing a shared network reversibly, per clone: the patch protocol, the MODEL value that
carries patches (model_handle), weight deltas and merges, LoRA (its file formats, its key
names, and how it becomes weight deltas: lora.py), hypernetworks and ControlNet/T2I-Adapter
residuals. May import memory, kernels and networks."""

"""Prompts to conditioning: CLIP's BPE tokenizer with its vocabulary (data/), ComfyUI's prompt
weighting and 77-token windows, and the encoding rules of each family (clip skip, pooled
output, which encoders) in the CLIP value, TextEncoderStack.
May import memory, kernels, networks and patches."""

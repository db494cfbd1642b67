"""Native code: the bf16 flash-attention kernel (flash_attention_bf16.c) and its loader, which
compiles it on first use and falls back to PyTorch where the CPU cannot run it.
May import memory."""

"""Extract the Lotus null-prompt embedding from ComfyUI's comfy_extras/nodes_lotus.py into a
safetensors file (data, not code: the output of Lotus's frozen text encoder on an empty prompt,
which ComfyUI inlines as a tensor literal).

`python scripts/extract_lotus_embedding.py PATH/TO/nodes_lotus.py OUT.safetensors`

The file is parsed, never run: the one `torch.tensor(<nested list of numbers>)` call in it is
read with `ast.literal_eval` and stored as float32 (the dtype `torch.tensor` gives a list of
Python floats), shape (1, 2, 1024), under the key `prompt_embeds`."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

KEY = "prompt_embeds"
SHAPE = (1, 2, 1024)  # two tokens: what ComfyUI inlines


def tensor_literal(source: str) -> list:
    """The nested number list of the single `torch.tensor(...)` call with a literal argument."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "tensor" and node.args
                and isinstance(node.args[0], ast.List)):
            found.append(ast.literal_eval(node.args[0]))
    if len(found) != 1:
        raise ValueError(f"expected one torch.tensor([...]) literal, found {len(found)}")
    return found[0]


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    source, out = Path(argv[0]), Path(argv[1])
    values = torch.tensor(tensor_literal(source.read_text(encoding="utf-8")),
                          dtype=torch.float32)
    if tuple(values.shape) != SHAPE:
        raise ValueError(f"the literal has shape {tuple(values.shape)}, expected {SHAPE}")
    save_file({KEY: values.contiguous()}, str(out),
              metadata={"source": "ComfyUI 0.8.0 comfy_extras/nodes_lotus.py",
                        "what": "Lotus null-prompt embedding (frozen text encoder, empty prompt)"})
    print(f"wrote {out}: {KEY} {SHAPE} float32")


if __name__ == "__main__":
    main(sys.argv[1:])

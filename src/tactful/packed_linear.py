"""Linear layers with pre-packed weights for CPU decoding (oneDNN).

A decode step multiplies a few dozen rows by every weight matrix of the model. `F.linear` hands
each call to MKL's sgemm, which lays the weight out for its kernel on every call; at 32-64 rows
the products then run at about half the rate of a large matmul (the LM head, 49152 x 576, at ~50
GFLOP/s on one thread). oneDNN can lay each weight out once, ahead of time, and then runs the same
products at ~95-105 GFLOP/s: 1.25-1.30x generated tokens/s (benchmarks/README.md). The cost: one
packed copy of every weight while generating (the model's size again) and the packing itself,
once per `generate` call. Results agree with `F.linear` to float32 rounding, not bit for bit, so
greedy replies can differ where two tokens tie to the last bits: it is opt-in
(`HFGenerator(packed_linear=True)`, or TACTFUL_PACKED_LINEAR=1 in the environment of any tactful
command), off where recorded replies must reproduce. `tactful demo` turns it on (its card came out
the same to the digit with and without it; TACTFUL_PACKED_LINEAR=0 turns it off there).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch


def available() -> bool:
    """oneDNN's packed linear in this torch build (CPU builds for x86 have it)."""
    return bool(torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _packable(m: torch.nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (isinstance(m, torch.nn.Linear) and isinstance(w, torch.Tensor) and w.dtype == torch.float32
            and w.device.type == "cpu" and w.dim() == 2)


@contextlib.contextmanager
def packed_linears(model: Any, rows: int = 32) -> Iterator[int]:
    """Within the block, every float32 CPU nn.Linear of `model` (LoRA base layers and the LM head
    included) multiplies by a weight packed once for about `rows` rows; on exit the modules are as
    they were. Yields how many layers were packed (0 where oneDNN is missing: nothing changes)."""
    if not available():
        yield 0
        return
    patched = []
    try:
        with torch.no_grad():
            for m in model.modules():
                if not _packable(m) or "forward" in vars(m):
                    continue
                packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows)
                bias = None if m.bias is None else m.bias.detach()

                def forward(x: torch.Tensor, _p: torch.Tensor = packed, _b: Any = bias) -> torch.Tensor:
                    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), _p, _b, "none", [], "")

                m.forward = forward  # an instance attribute: the class's forward is untouched
                patched.append(m)
        yield len(patched)
    finally:
        for m in patched:
            del m.forward


ENV = "TACTFUL_PACKED_LINEAR"


@contextlib.contextmanager
def on_unless_asked_off() -> Iterator[bool]:
    """Within the block, generators made without an explicit `packed_linear` pack their weights,
    unless the environment already says TACTFUL_PACKED_LINEAR=0 (or anything else); afterwards the
    environment is as it was. Yields whether packing is on."""
    before = os.environ.get(ENV)
    if before is None:
        os.environ[ENV] = "1"
    try:
        yield os.environ[ENV] == "1"
    finally:
        if before is None:
            os.environ.pop(ENV, None)

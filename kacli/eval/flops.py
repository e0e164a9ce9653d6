"""Model size: parameter count and GFLOPs at a given input.

Convention. ``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per multiply-add of the
matrix products and convolutions (bias additions, norms, softmax and activations are not counted).
The paper's "FLOPs" column (Table I, e.g. 12.7G for DETR-R50 at 512 px) counts multiply-adds, so
the number to compare with it is ``gflops_mac`` = counted FLOPs / 2 / 1e9; ``gflops`` is the
FlopCounterMode total / 1e9.

Two attention kernels are invisible to the counter, so counting avoids both: the CPU fused
``scaled_dot_product_attention`` kernel (counting runs under the math SDPA backend, whose two
matrix products are counted) and ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``'s
inference fast path (switched off with ``torch.backends.mha.set_fastpath_enabled(False)`` while
counting, then restored).
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

CONVENTION = (
    "gflops_mac = multiply-adds / 1e9 (the paper's 'FLOPs'); gflops = 2 x multiply-adds / 1e9 "
    "(torch FlopCounterMode); matrix products and convolutions only, attention included"
)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (trainable or frozen; buffers such as frozen BatchNorm statistics excluded).
    Parameters shared between modules are counted once."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def gflops(model: torch.nn.Module, example_inputs: tuple) -> dict:
    """Count the FLOPs of one forward pass of ``model(*example_inputs)`` in eval mode.

    Args:
        model: any module; its train/eval mode is restored afterwards.
        example_inputs: positional inputs, e.g. ``(images (1,3,H,W), mask (1,H,W))``.

    Returns:
        ``{"gflops_mac": float, "gflops": float, "macs": int, "convention": str}`` (see the module
        docstring); ``macs`` is the exact multiply-add count.
    """
    was_training = model.training
    model.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    counter = FlopCounterMode(display=False)
    # The counter's module tracker hooks autograd on inputs that require grad; a parameter
    # passed as a module input (DETR's query embeddings) would trip it under no_grad.
    grads = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), counter:
            model(*example_inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
        for p, flag in grads:
            p.requires_grad_(flag)
    total = counter.get_total_flops()
    return {"gflops_mac": total / 2 / 1e9, "gflops": total / 1e9, "macs": total // 2, "convention": CONVENTION}

"""bitsandbytes' AdamW8bit with the update of a large tensor done in slices.

bitsandbytes' CPU kernel for the 8-bit blockwise update dequantises both moments to fp32, copies
the gradient and the parameter to fp32 and builds ``sqrt(v)`` and its ``+ eps``: several fp32
copies of the *whole* tensor being updated. For the 32000 x 2048 embedding of the 1b preset that
is about 1.25 GB of temporaries, the largest single item of an all-levers step's peak after the
weights (docs/results.md, section (f)). The update is elementwise and the moments are quantised
in independent blocks of 256 numbers, so running the same kernel on consecutive block-aligned
slices of the flattened tensors gives bit-identical parameters and moments
(``tests/test_optim.py``) while its temporaries shrink to the slice's size.

Only the update call is sliced: the state (``state1``/``state2`` uint8, ``absmax1``/``absmax2``,
``qmap``, ``step``) is bitsandbytes' own, so checkpoints of either class load into the other.
"""

from __future__ import annotations

import torch
from bitsandbytes import functional as bnb_functional
from bitsandbytes.optim import AdamW8bit

BLOCK = 256  # numbers per quantisation block of bitsandbytes' blockwise 8-bit state


class SlicedAdamW8bit(AdamW8bit):
    """``bitsandbytes.optim.AdamW8bit`` whose 8-bit update of a tensor with more than
    ``slice_numel`` numbers runs over block-aligned slices of at most ``slice_numel`` numbers."""

    def __init__(self, params, *args, slice_numel: int, **kwargs):
        if slice_numel <= 0 or slice_numel % BLOCK:
            raise ValueError(f"slice_numel={slice_numel} must be a positive multiple of {BLOCK}")
        super().__init__(params, *args, **kwargs)
        self.slice_numel = slice_numel

    @torch.no_grad()
    def update_step(self, group, p, gindex, pindex):
        state = self.state[p]
        if state["state1"].dtype != torch.uint8 or p.numel() <= self.slice_numel:
            return super().update_step(group, p, gindex, pindex)
        p.data = p.data.contiguous()
        p.grad = p.grad.contiguous()
        config = self.get_config(gindex, pindex, group)
        state["step"] += 1
        flat = [t.view(-1) for t in (p.grad, p.data, state["state1"], state["state2"])]
        for start in range(0, p.numel(), self.slice_numel):
            stop = min(start + self.slice_numel, p.numel())
            grad, param, state1, state2 = (t[start:stop] for t in flat)
            blocks = slice(start // BLOCK, -(-stop // BLOCK))
            bnb_functional.optimizer_update_8bit_blockwise(
                self.optimizer_name, grad, param, state1, state2,
                config["betas"][0], config["betas"][1], config["betas"][2] if len(config["betas"]) >= 3 else 0.0,
                config.get("alpha", 0.0), config["eps"], state["step"], config["lr"],
                state["qmap1"], state["qmap2"], state["absmax1"][blocks], state["absmax2"][blocks],
                config["weight_decay"], gnorm_scale=1.0, skip_zeros=config["skip_zeros"],
            )

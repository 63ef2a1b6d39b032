"""Candidate LOST forwards (input-channel axis), timed against each other in one process.

    flock /tmp/lostlm-cpu.lock python bench/lost_impls.py            # layer fwd+bwd at 60m shapes

``before`` is the forward as it was (two output GEMMs, a scale and an add over b×m);
``cat`` (what layers.py now does) is one GEMM over the concatenated inner dimension r+k.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from lostlm.layers import LOSTLinear
from lostlm.runtime import autocast_context

BF16 = autocast_context(torch.device("cpu"), torch.bfloat16)  # the timings compare bf16 forwards


def before(self, x):
    lowrank = F.linear(self._act(F.linear(x, self.lowrank_down)), self.lowrank_up)
    sparse = F.linear(x.index_select(-1, self.channel_index), self.sparse_weight)
    return torch.add(self.gamma * lowrank, sparse, alpha=1.0 - self.gamma)


def addmm(self, x):
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    h = self._act(F.linear(x2, self.lowrank_down))
    sparse = F.linear(x2.index_select(-1, self.channel_index), self.sparse_weight)
    y = torch.addmm(sparse, h, self.lowrank_up.t(), beta=1.0 - self.gamma, alpha=self.gamma)
    return y.view(*shape[:-1], -1)


def cat(self, x):
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    h = self._act(F.linear(x, self.lowrank_down))
    z = torch.cat([h, x.index_select(-1, self.channel_index)], dim=-1)
    w = torch.cat([self.gamma * self.lowrank_up, (1.0 - self.gamma) * self.sparse_weight], dim=1)
    return F.linear(z, w)


class _DownAndGather(torch.autograd.Function):
    """(x Aᵀ, x[:, I]) with a backward that adds the gathered columns' gradient in place into the
    GEMM's grad_x (no zero-filled b×n buffer, no scatter into it, no extra b×n add)."""

    @staticmethod
    def forward(ctx, x, down, index):
        w = down.to(x.dtype)
        ctx.save_for_backward(x, w, index)
        ctx.down_dtype = down.dtype
        return F.linear(x, w), x.index_select(-1, index)

    @staticmethod
    def backward(ctx, grad_h, grad_g):
        x, w, index = ctx.saved_tensors
        grad_x = grad_h @ w
        grad_x.index_add_(-1, index, grad_g.to(grad_x.dtype))
        grad_w = grad_h.reshape(-1, grad_h.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_w.to(ctx.down_dtype), None


def fused(self, x):
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    with torch.autocast(x.device.type, enabled=False):
        pre, gathered = _DownAndGather.apply(x, self.lowrank_down, self.channel_index)
        stacked = torch.cat([self._act(pre), gathered], dim=-1)
        weight = torch.cat([self.gamma * self.lowrank_up, (1.0 - self.gamma) * self.sparse_weight], dim=1)
        return F.linear(stacked, weight.to(stacked.dtype))


IMPLS = {"before": before, "addmm": addmm, "cat": cat, "fused": fused, "current": LOSTLinear.forward}


def main() -> None:
    torch.manual_seed(0)
    shapes = [(512, 512), (1376, 512), (512, 1376)]  # 60m: attention, gate/up, down
    tokens = 16 * 256
    layers = [LOSTLinear(torch.randn(m, n) * 0.02, 128, density=0.03) for m, n in shapes]
    xs = [torch.randn(16, 256, n, requires_grad=True) for m, n in shapes]
    for layer, x in zip(layers, xs):  # same math
        ref = before(layer, x)
        for name, fn in IMPLS.items():
            assert torch.allclose(fn(layer, x), ref, atol=1e-5), name
            gx = torch.autograd.grad(fn(layer, x).square().sum(), [x, layer.lowrank_down, layer.sparse_weight])
            gr = torch.autograd.grad(before(layer, x).square().sum(), [x, layer.lowrank_down, layer.sparse_weight])
            assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(gx, gr)), name
    results = {name: [] for name in IMPLS}
    for _ in range(7):
        for name, fn in IMPLS.items():
            t0 = time.perf_counter()
            for layer, x in zip(layers, xs):
                for _ in range(2):
                    with BF16():
                        y = fn(layer, x)
                    y.float().sum().backward()
            results[name].append(time.perf_counter() - t0)
    base = statistics.median(results["before"])
    for name, ts in results.items():
        med = statistics.median(ts)
        print(f"{name:8s} {med * 1e3:8.1f} ms (3 layers x 2 fwd+bwd, {tokens} tokens, bf16)  x{base / med:.2f} vs before")


if __name__ == "__main__":
    main()

"""Layer-level speed: forward + backward of one projection, per method, at the shapes of a preset.

    PYTHONPATH=src python bench/layer_speed.py                          # 60m, 350m, 1b; 4096 tokens
    PYTHONPATH=src python bench/layer_speed.py --presets 60m --repeats 21 --profile

Every preset's three projection shapes (attention d→d, gate/up d→ffn, down ffn→d) at the
preset's rank, with bf16 autocast on CPU by default (``--fp32`` turns it off). Methods run
round-robin, one fwd+bwd each per round, so drifts in machine load hit all alike; the figure
per method is the median over rounds. The input is fp32 and needs a gradient (as the output of
an RMSNorm does), the output gradient is a fixed tensor of the output's dtype, and parameter
gradients are dropped before every call (no accumulation add).

Methods: ``dense`` (nn.Linear), ``cola`` (LowRankLinear, σ = SiLU), ``lowrank`` (LowRankLinear,
σ = identity), ``lost`` (LOSTLinear as it is now) and ``lost-concat`` (the previous LOST
forward: torch.cat of [σ(xA), x_I] and of the weights, one F.linear, plain autograd — kept
here only for this comparison) and ``lost-onegemm`` (the current layer with x's gradient from
one GEMM over [A; E_I] instead of a GEMM over A plus an in-place index_add_ of k columns),
``lost-pad16`` / ``lost-pad64`` (the current layer with r+k padded to a multiple of 16 / 64),
``lost-auto`` (padded as a training run pads by default, ``layer.lost_pad_to`` = 0: 16 at
r = 128, 64 at r ≥ 256; ``lost`` itself is the unpadded layer, ``layer.lost_pad_to=1``). ``--profile`` adds torch.profiler tables of ``lost`` and
``cola`` at the first preset's shapes.

Writes bench/results/layer-speed-<tag>.json and .md (and -profile.txt with --profile), with
the CPU model, its relevant flags, the thread count and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lostlm.configs import PRESETS
from lostlm.layers import LOSTLinear, LowRankLinear, _LOSTInputChannels, lost_pad_multiple

METHODS = ("dense", "cola", "lowrank", "lost", "lost-auto", "lost-pad16", "lost-pad64", "lost-onegemm", "lost-concat")
# How many of each projection a LLaMA block has: q, k, v, o (d→d); gate, up (d→ffn); down (ffn→d).
BLOCK_COUNTS = {"attn": 4, "up": 2, "down": 1}


def lost_concat_forward(self: LOSTLinear, x: torch.Tensor) -> torch.Tensor:
    """The LOST forward before bench/layer_speed.py existed (commit 2bd5ec8), for comparison."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    hidden = self._act(F.linear(x, self.lowrank_down))
    stacked = torch.cat([hidden, x.index_select(-1, self.channel_index)], dim=-1)
    weight = torch.cat([self.gamma * self.lowrank_up, (1.0 - self.gamma) * self.sparse_weight], dim=1)
    return F.linear(stacked, weight, self.bias)


class LostConcat(LOSTLinear):
    forward = lost_concat_forward


class LostOneGemm(LOSTLinear):
    """The current LOST layer with x's gradient from ONE GEMM over [A; E_I] (E_I the one-hot
    selection of the k kept channels) instead of g_pre·A plus an in-place index_add_."""

    def forward(self, x):
        _LOSTInputChannels.grad_x_one_gemm = True  # read at forward time, kept for the backward
        try:
            return super().forward(x)
        finally:
            _LOSTInputChannels.grad_x_one_gemm = False


class LostPad16(LOSTLinear):
    """The current LOST layer with the inner width r+k padded by zero columns to a multiple of 16."""

    pad_to = 16

    def forward(self, x):
        _LOSTInputChannels.pad_to = self.pad_to
        try:
            return super().forward(x)
        finally:
            _LOSTInputChannels.pad_to = 1


class LostPad64(LostPad16):
    """... to a multiple of 64 (bench/gemm_widths.py: GEMMs over r+k = 286, 338, 573, 675 run
    slower per FLOP than over a multiple of 64 on this AVX2 CPU)."""

    pad_to = 64


class LostAuto(LostPad16):
    """... to the multiple a training run picks by default (``layer.lost_pad_to`` = 0, auto:
    :func:`lostlm.layers.lost_pad_multiple` of the rank)."""

    def __init__(self, w0, rank, **kwargs):
        super().__init__(w0, rank, **kwargs)
        self.pad_to = lost_pad_multiple(rank)


# the LOST layer as lostlm trains it, and the forward-pass variants timed against it
LOST_FORMS = {"lost": LOSTLinear, "lost-pad16": LostPad16, "lost-pad64": LostPad64, "lost-auto": LostAuto,
              "lost-onegemm": LostOneGemm, "lost-concat": LostConcat}


def build(method: str, out_features: int, in_features: int, rank: int, density: float, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out_features, in_features, generator=g) * 0.02
    if method == "dense":
        layer = nn.Linear(in_features, out_features, bias=False)
        with torch.no_grad():
            layer.weight.copy_(w0)
        return layer
    if method == "cola":
        return LowRankLinear(w0, rank, init="random", activation="silu", generator=g)
    if method == "lowrank":
        return LowRankLinear(w0, rank, init="random", activation="identity", generator=g)
    if method in LOST_FORMS:
        return LOST_FORMS[method](w0, rank, density=density)
    raise ValueError(method)


def lost_ratios(times: dict[str, float]) -> dict[str, float]:
    """{LOST variant: its time / CoLA's} for every ``lost*`` method timed (none without cola)."""
    if "cola" not in times:
        return {}
    return {k: v / times["cola"] for k, v in times.items() if k.startswith("lost")}


def shapes_of(preset: str) -> dict[str, tuple[int, int, int]]:
    p = PRESETS[preset]
    d, ffn, r = p["hidden_size"], p["intermediate_size"], p["rank"]
    return {"attn": (d, d, r), "up": (ffn, d, r), "down": (d, ffn, r)}  # name: (out, in, rank)


def step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, autocast: bool) -> None:
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    torch.autograd.backward(y, grad.to(y.dtype))


def cpu_summary() -> dict:
    model, flags = platform.processor(), []
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            if key.strip() == "Flags":
                wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8", "fma")
                flags = [f for f in value.split() if f in wanted]
    except OSError:
        pass
    return {"model": model, "flags": flags}


def loadavg() -> list[float]:
    return list(os.getloadavg())


def other_processes() -> list[str]:
    """Processes using CPU besides this one (ps), to note contention in the results."""
    out = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True, check=False).stdout
    rows = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0] != str(os.getpid()) and float(parts[1]) >= 5.0:
            rows.append(" ".join(parts))
    return rows


def profile(preset: str, tokens: int, density: float, autocast: bool, methods=("lost", "cola")) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    text = []
    for method in methods:
        layers, inputs = [], []
        for name, (m, n, r) in shapes_of(preset).items():
            layers.append(build(method, m, n, r, density, seed=0))
            inputs.append((torch.randn(tokens, n, requires_grad=True), torch.randn(tokens, m)))
        for layer, (x, g) in zip(layers, inputs):
            step(layer, x, g, autocast)
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(3):
                for layer, (x, g) in zip(layers, inputs):
                    step(layer, x, g, autocast)
        text.append(f"==== {method}: {preset} shapes {list(shapes_of(preset).values())} (out, in, rank), {tokens} tokens, "
                    f"3 rounds x 3 shapes fwd+bwd, {'bf16 autocast' if autocast else 'fp32'}")
        text.append(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25,
                                                                        max_name_column_width=40))
    return "\n".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["60m", "350m", "1b"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=15, help="rounds (median over them); fewer at 1b by --repeats-1b")
    ap.add_argument("--repeats-1b", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--density", type=float, default=0.03)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fp32", action="store_true", help="no autocast")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tag", default=None, help="file name part; default: the date and the CPU")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    autocast = not args.fp32
    cpu = cpu_summary()
    meta = {"command": "PYTHONPATH=src python bench/layer_speed.py " + " ".join(os.sys.argv[1:]),
            "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "tokens": args.tokens,
            "precision": "bf16 autocast" if autocast else "fp32", "density": args.density,
            "loadavg_before": loadavg(), "other_processes_before": other_processes(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"CPU: {cpu['model']}  flags: {' '.join(cpu['flags'])}  threads: {meta['threads']}  torch {torch.__version__}  "
          f"load {meta['loadavg_before']}", flush=True)
    results = {}
    for preset in args.presets:
        repeats = args.repeats_1b if preset == "1b" else args.repeats
        results[preset] = {}
        for shape_name, (m, n, r) in shapes_of(preset).items():
            x = torch.randn(args.tokens, n, requires_grad=True, generator=torch.Generator().manual_seed(1))
            grad = torch.randn(args.tokens, m, generator=torch.Generator().manual_seed(2))
            layers = {meth: build(meth, m, n, r, args.density, seed=0) for meth in args.methods}
            times = {meth: [] for meth in args.methods}
            for i in range(args.warmup + repeats):
                for meth, layer in layers.items():
                    t0 = time.perf_counter()
                    step(layer, x, grad, autocast)
                    if i >= args.warmup:
                        times[meth].append(time.perf_counter() - t0)
            med = {meth: statistics.median(ts) * 1e3 for meth, ts in times.items()}
            results[preset][shape_name] = {"out": m, "in": n, "rank": r, "median_ms": med,
                                           "all_ms": {k: [round(t * 1e3, 3) for t in v] for k, v in times.items()}}
            line = "  ".join(f"{k} {v:7.2f}" for k, v in med.items())
            ratio = "".join(f"  {k}/cola {v:.3f}" for k, v in lost_ratios(med).items())
            print(f"{preset:5s} {shape_name:5s} {m:5d}x{n:5d} r{r:4d}  {line} ms{ratio}", flush=True)
        block = {meth: sum(BLOCK_COUNTS[s] * results[preset][s]["median_ms"][meth] for s in BLOCK_COUNTS) for meth in args.methods}
        results[preset]["block"] = {"median_ms": block}
        ratios = "  ".join(f"{k}/cola {v:.3f}" for k, v in lost_ratios(block).items())
        print(f"{preset:5s} block (4 attn + 2 up + 1 down)  {ratios}", flush=True)
    meta["loadavg_after"] = loadavg()
    meta["other_processes_after"] = other_processes()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or time.strftime("%Y%m%d") + "-" + ("amx" if "amx_bf16" in cpu["flags"] else "avx512bf16" if "avx512_bf16" in cpu["flags"] else "cpu")
    (out / f"layer-speed-{tag}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = [f"# Layer speed, fwd + bwd, {args.tokens} tokens, {meta['precision']}",
          "", f"Command: `{meta['command']}`", "",
          f"CPU: {cpu['model']}; flags: {' '.join(cpu['flags'])}; torch {torch.__version__}; {meta['threads']} threads; "
          f"load average before {meta['loadavg_before']}, after {meta['loadavg_after']}; "
          f"other busy processes before: {meta['other_processes_before'] or 'none'}; after: {meta['other_processes_after'] or 'none'}.",
          "", "Median ms per fwd+bwd (round-robin, one process). `block` = 4·attn + 2·up + 1·down.", "",
          "| preset | shape (out×in, r) | " + " | ".join(args.methods) + "".join(f" | {k} / cola" for k in lost_ratios(
              {m: 1.0 for m in args.methods})) + " |",
          "|---|---|" + "---|" * (len(args.methods) + len(lost_ratios({m: 1.0 for m in args.methods})))]
    for preset, shapes in results.items():
        for shape_name, row in shapes.items():
            med = row["median_ms"]
            label = f"{shape_name} {row['out']}×{row['in']}, {row['rank']}" if shape_name != "block" else "block"
            md.append(f"| {preset} | {label} | " + " | ".join(f"{med[m]:.2f}" for m in args.methods)
                      + "".join(f" | {v:.3f}" for v in lost_ratios(med).values()) + " |")
    (out / f"layer-speed-{tag}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / f'layer-speed-{tag}.json'} and .md")
    if args.profile:
        text = profile(args.presets[0], args.tokens, args.density, autocast)
        header = f"CPU: {cpu['model']}; flags: {' '.join(cpu['flags'])}; {meta['threads']} threads; torch {torch.__version__}\n"
        (out / f"layer-speed-{tag}-profile.txt").write_text(header + text + "\n")
        print(text)


if __name__ == "__main__":
    main()

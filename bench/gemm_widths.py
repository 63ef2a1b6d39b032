"""Where LOST's layer time over CoLA's goes: its GEMMs, one by one, against CoLA's (fp32).

    PYTHONPATH=src python bench/gemm_widths.py                  # 60m, 350m, 1b shapes, 4096 tokens
    PYTHONPATH=src python bench/gemm_widths.py --presets 350m --repeats 5

A CoLA layer (y = σ(x Aᵀ) Bᵀ, rank r) runs six GEMMs per forward + backward; LOST's layer
(``lostlm.layers._LOSTInputChannels``) runs the same six with the up-projection's three over
the inner width r + k (k = ⌊ρ n⌋ kept input channels) and the down-projection's two backward
GEMMs on ``grad_pre``, a strided view (row stride r + k) of the b×(r+k) gradient. Each GEMM is
timed here alone (fastest of ``--repeats`` rounds, every GEMM of every variant in turn per
round), in the shapes and memory layouts the layers use, plus two variants that a
future layer could use: the inner width padded with zero columns to a multiple of 64, and the
up-projection split into an r-wide GEMM plus a k-wide one (``addmm`` into the same output, no
concatenated buffer, contiguous ``grad_pre``). The FLOP ratio LOST / CoLA is printed beside
the time ratios, so a time ratio above it is GEMM efficiency (width, stride), not arithmetic.

Writes bench/results/gemm-widths-<tag>.json with the CPU model, flags, threads and load.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lostlm.configs import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def _time_sequential(calls: dict, repeats: int) -> dict:
    """Median of ``repeats`` timings of each call after one warm-up call, the calls one after
    another (the first version of this script; bench/results/gemm-widths-fp32-epyc-avx2.json)."""
    out = {}
    for key, fn in calls.items():
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[key] = sorted(times)[len(times) // 2]
    return out


def _time_round_robin(calls: dict, repeats: int) -> dict:
    """Fastest of ``repeats`` timings of every call, the calls taken in turn each round (a
    warm-up round first), so a burst of load on a shared machine hits every variant alike."""
    times = {key: [] for key in calls}
    for round_ in range(repeats + 1):
        for key, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            if round_:
                times[key].append(time.perf_counter() - t0)
    return {key: min(ts) for key, ts in times.items()}


def gemms(b: int, m: int, n: int, r: int, k: int, variant: str) -> dict:
    """The GEMM calls of one fwd+bwd, as closures over tensors of the right shapes/layouts."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, generator=g)
    gy = torch.randn(b, m, generator=g)
    a = torch.randn(r, n, generator=g)
    if variant == "cola":
        h, bw = torch.randn(b, r, generator=g), torch.randn(m, r, generator=g)
        gpre = torch.randn(b, r, generator=g)
        return {"fwd down x·Aᵀ": lambda: torch.mm(x, a.t()), "fwd up h·Bᵀ": lambda: torch.mm(h, bw.t()),
                "bwd g_y·B": lambda: torch.mm(gy, bw), "bwd g_yᵀ·h": lambda: torch.mm(gy.t(), h),
                "bwd g_pre·A": lambda: torch.mm(gpre, a), "bwd g_preᵀ·x": lambda: torch.mm(gpre.t(), x)}
    if variant == "split":  # r-wide and k-wide GEMMs, contiguous everything
        h, xi = torch.randn(b, r, generator=g), torch.randn(b, k, generator=g)
        bw, ws = torch.randn(m, r, generator=g), torch.randn(m, k, generator=g)
        gpre = torch.randn(b, r, generator=g)
        return {"fwd down x·Aᵀ": lambda: torch.mm(x, a.t()),
                "fwd up h·Bᵀ + x_I·W_sᵀ": lambda: torch.addmm(torch.mm(h, bw.t()), xi, ws.t()),
                "bwd g_y·[B, W_s]": lambda: (torch.mm(gy, bw), torch.mm(gy, ws)),
                "bwd g_yᵀ·[h, x_I]": lambda: (torch.mm(gy.t(), h), torch.mm(gy.t(), xi)),
                "bwd g_pre·A": lambda: torch.mm(gpre, a), "bwd g_preᵀ·x": lambda: torch.mm(gpre.t(), x)}
    width = r + k if variant == "lost" else -(-(r + k) // 64) * 64  # "pad64"
    z, w = torch.randn(b, width, generator=g), torch.randn(m, width, generator=g)
    gz = torch.randn(b, width, generator=g)
    gpre = gz[:, :r]  # the layer's strided view
    return {"fwd down x·Aᵀ": lambda: torch.mm(x, a.t()),
            "fwd up z·Wᵀ": lambda: torch.mm(z, w.t()), "bwd g_y·W": lambda: torch.mm(gy, w),
            "bwd g_yᵀ·z": lambda: torch.mm(gy.t(), z), "bwd g_pre·A (strided)": lambda: torch.mm(gpre, a),
            "bwd g_preᵀ·x (strided)": lambda: torch.mm(gpre.t(), x)}


def flops(b: int, m: int, n: int, r: int, k: int, lost: bool) -> float:
    inner = r + k if lost else r
    return 2.0 * b * (2 * r * n + 3 * inner * m) / 1e9  # down: fwd + g_A + g_x over r; up: 3 GEMMs over inner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["60m", "350m", "1b"])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--density", type=float, default=0.03)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="fp32")
    ap.add_argument("--sequential", action="store_true", help="median per GEMM, one GEMM after another (not round-robin)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")), "")
    out = {"cpu": model, "flags": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags],
           "threads": args.threads, "tokens": args.tokens, "torch": torch.__version__,
           "timing": "sequential median" if args.sequential else "round-robin fastest",
           "loadavg_before": os.getloadavg(), "rows": []}
    variants = ("cola", "lost", "pad64", "split")
    for preset in args.presets:
        p = PRESETS[preset]
        d, ffn, r = p["hidden_size"], p["intermediate_size"], p["rank"]
        for shape, (m, n) in {"attn": (d, d), "up": (ffn, d), "down": (d, ffn)}.items():
            k = max(1, int(args.density * n))
            row = {"preset": preset, "shape": shape, "m": m, "n": n, "r": r, "k": k,
                   "flop_ratio": flops(args.tokens, m, n, r, k, True) / flops(args.tokens, m, n, r, k, False)}
            calls = {(variant, name): fn for variant in variants
                     for name, fn in gemms(args.tokens, m, n, r, k, variant).items()}
            timed = (_time_sequential if args.sequential else _time_round_robin)(calls, args.repeats)
            for variant in variants:
                row[variant] = {name: t * 1e3 for (v, name), t in timed.items() if v == variant}
                row[variant + "_ms"] = sum(row[variant].values())
            for variant in variants[1:]:
                row[variant + "/cola"] = row[variant + "_ms"] / row["cola_ms"]
            out["rows"].append(row)
            print(f"{preset} {shape} {m}x{n} r={r} k={k}: flops {row['flop_ratio']:.3f}, "
                  + ", ".join(f"{v} {row[v + '_ms']:.1f} ms" for v in variants)
                  + f"; lost/cola {row['lost/cola']:.3f} pad64/cola {row['pad64/cola']:.3f} split/cola {row['split/cola']:.3f}",
                  flush=True)
    counts = {"attn": 4, "up": 2, "down": 1}  # per LLaMA block
    for preset in args.presets:
        rows = [r for r in out["rows"] if r["preset"] == preset]
        block = {v: sum(counts[r["shape"]] * r[v + "_ms"] for r in rows) for v in variants}
        fl = [sum(counts[r["shape"]] * flops(args.tokens, r["m"], r["n"], r["r"], r["k"], lost) for r in rows) for lost in (True, False)]
        out.setdefault("block", {})[preset] = {**{v + "_ms": t for v, t in block.items()}, "flop_ratio": fl[0] / fl[1],
                                               **{v + "/cola": block[v] / block["cola"] for v in variants[1:]}}
        print(f"{preset} block: flops {fl[0] / fl[1]:.3f}, " + ", ".join(f"{v}/cola {block[v] / block['cola']:.3f}" for v in variants[1:]))
    out["loadavg_after"] = os.getloadavg()
    path = ROOT / "bench" / "results" / f"gemm-widths-{args.tag}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

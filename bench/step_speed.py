"""Time (and optionally profile) training steps of each method in ONE process, so the ratios
between methods are comparable (the machine is shared and noisy: compare within a run).

    flock /tmp/lostlm-cpu.lock python bench/step_speed.py --preset 60m --methods full lost sltrain
    flock /tmp/lostlm-cpu.lock python bench/step_speed.py --preset 60m --methods lost --profile bench/results/profile-lost-60m.txt

A step is exactly the trainer's: autocast forward in the trainer's dtype (``train.precision``
through :func:`lostlm.runtime.autocast_dtype`: bf16 where the CPU has native bf16 matmuls),
per-sequence loss, backward, grad clipping, AdamW (GaLoreAdamW for galore), zero_grad — on
random tokens (speed does not depend on the text). Methods are interleaved round-robin so
drifts in machine load hit all alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lostlm.configs import load_config
from lostlm.build import build_model
from lostlm.costs import forward_flops_per_token
from lostlm.optim import build_optimizer
from lostlm.runtime import autocast_context, autocast_dtype
from lostlm.losses import sequence_losses

DEVICE = torch.device("cpu")  # the timed steps run on the CPU (the batch is made there)


def make(spec: str, preset: str, vocab: int, extra: list[str], compile_: bool):
    """``spec`` is a method, or ``lost:IMPL`` to swap in a candidate forward from lost_impls.py."""
    method, _, impl = spec.partition(":")
    cfg = load_config(None, [f"model.preset={preset}", f"layer.method={method}", "layer.galore_rank=128", *extra])
    model, _ = build_model(cfg, vocab)
    if impl:
        import types

        from lost_impls import IMPLS
        from lostlm.layers import LOSTLinear

        for module in model.modules():
            if isinstance(module, LOSTLinear):
                module.forward = types.MethodType(IMPLS[impl], module)
    opt = build_optimizer(model, cfg)
    run = torch.compile(model) if compile_ else model
    return cfg, model, run, opt


def training_dtype(cfg) -> torch.dtype | None:
    """The trainer's autocast dtype for this config on the CPU (None: fp32)."""
    return autocast_dtype(cfg.train.precision, DEVICE)


def step(model, run, opt, batch, dtype: torch.dtype | None):
    with autocast_context(DEVICE, dtype)():
        logits = run(batch[:, :-1])
    loss = sequence_losses(logits, batch[:, 1:]).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def write_profile(args, built: dict, batch: torch.Tensor) -> None:
    """A torch.profiler table of one step per method, written to ``args.profile``."""
    from torch.profiler import ProfilerActivity, profile

    with open(args.profile, "w") as fh:
        for m, (cfg, model, run, opt) in built.items():
            dtype = training_dtype(cfg)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
                step(model, run, opt, batch, dtype)
            precision = f"{str(dtype).replace('torch.', '')} autocast" if dtype else "fp32"
            fh.write(f"==== {m} ({args.preset}, batch {args.batch}x{args.seq}, {precision}{', compiled' if args.compile else ''})\n")
            table = prof.key_averages(group_by_input_shape=args.shapes).table(sort_by="self_cpu_time_total", row_limit=40,
                                                                              max_name_column_width=40, max_shapes_column_width=90)
            fh.write(table + "\n\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="60m")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--methods", nargs="+", default=["full", "lowrank", "lowrank-svd", "cola", "sltrain", "galore", "lost"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (after 2 warm-up steps)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--profile", help="write a torch.profiler table of one step per method to this file")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--peak", action="store_true", help="also measure the matmul ceiling here (same threads/load) for MFU")
    p.add_argument("--shapes", action="store_true", help="profile with input shapes (group rows by shape)")
    p.add_argument("--override", nargs="*", default=[], help="extra section.key=value for every method")
    p.add_argument("--json", help="write the timings here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    built = {m: make(m, args.preset, args.vocab, args.override, args.compile) for m in args.methods}
    times = {m: [] for m in args.methods}
    for m, (cfg, model, run, opt) in built.items():
        t0 = time.perf_counter()
        for _ in range(2):
            step(model, run, opt, batch, training_dtype(cfg))
        print(f"{m}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(args.steps):
        for m, (cfg, model, run, opt) in built.items():
            t0 = time.perf_counter()
            step(model, run, opt, batch, training_dtype(cfg))
            times[m].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    peak = None
    if args.peak:
        from lostlm.peak import measure_peak_flops

        dtype = training_dtype(built[args.methods[0]][0]) or torch.float32
        peak = max(measure_peak_flops(DEVICE, dtype, size=n, seconds=1.5) for n in (1024, 2048, 4096))
        print(f"peak {str(dtype).replace('torch.', '')} matmul: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    out = {"_peak_flops_per_s": peak, "_threads": torch.get_num_threads()}
    base = statistics.median(times[args.methods[0]])
    for m in args.methods:
        med = statistics.median(times[m])
        fl = 3 * forward_flops_per_token(built[m][1], args.seq) * tokens
        out[m] = {"step_s_median": med, "tokens_per_s": tokens / med, "model_gflops_per_s": fl / med / 1e9,
                  "speedup_vs_first": base / med, "all_steps_s": times[m]}
        mfu = f"  MFU {fl / med / peak:.2f}" if peak else ""
        print(f"{m:12s} {med:7.3f} s/step  {tokens / med:8.0f} tok/s  {fl / med / 1e9:6.1f} GFLOP/s  x{base / med:.2f} vs {args.methods[0]}{mfu}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": out}, fh, indent=1)
    if args.profile:
        write_profile(args, built, batch)
        print(f"profile: {args.profile}")


if __name__ == "__main__":
    main()

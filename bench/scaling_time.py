"""Estimate the wall time of a scaling recipe's ladder from a short timed run of every shape.

    bench/quiet.sh python bench/scaling_time.py bench/scaling.yaml --methods full lost cola --threads 2

Per method and shape: a few training steps through the real Trainer (the first two not timed:
the trainer's median step rate) and one validation pass of the recipe's ``data.val_tokens``,
then ladder time = sum over runs of tokens / rate + evaluations × validation time. Prints the
machine (lscpu model, threads) with the figures; a JSON line per shape and the total per method.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lostlm.bench.ladder import ladder_runs, load_ladder
from lostlm.bench.recipe import run_config
from lostlm.bench.report import machine_info
from lostlm.train import Trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    ladder = load_ladder(args.recipe)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores; train.threads={args.threads}; {args.steps} steps per shape")
    totals: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m, shape, tokens, variant, seed in ladder_runs(ladder, args.methods):
            cfg = run_config(ladder.bench, variant, seed, lr=ladder.lrs[m.name][0])
            evals = cfg.train.steps // cfg.train.eval_every
            short = cfg
            short.train.steps, short.train.eval_every, short.train.threads = args.steps, 10**6, args.threads
            short.train.checkpoint_every, short.train.out_dir = 0, str(Path(tmp) / variant.name)
            trainer = Trainer(short)
            summary = trainer.train()  # ends with one validation pass
            start = time.perf_counter()
            trainer.evaluate()
            eval_s = time.perf_counter() - start
            rate = summary["tokens_per_s_median_step"]
            run_s = tokens / rate + evals * eval_s
            totals[m.name] = totals.get(m.name, 0.0) + run_s
            print(json.dumps({"method": m.name, "shape": shape.name, "tok_per_s": round(rate), "eval_s": round(eval_s, 1),
                              "run_s_estimate": round(run_s)}), flush=True)
    for name, total in totals.items():
        print(f"{name}: ladder estimate {total / 3600:.2f} h ({total:,.0f} s) at {args.threads} threads")


if __name__ == "__main__":
    main()

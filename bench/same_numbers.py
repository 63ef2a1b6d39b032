"""Train the same short runs under two source trees and check that every logged number is equal.

    git worktree add --detach /tmp/old <commit before the edit>
    PYTHONPATH=src python bench/same_numbers.py --old /tmp/old/src --new src

The evidence ``bench/rekey.py`` asks for before it moves run folders: a small model of the tiny
preset's shape family (d = 64, 2 layers, the bundled corpus, fp32, 12 steps with an evaluation
at 6 and 12) per method, trained once with each tree, one process per run; the training losses,
gradient norms and validation losses in ``metrics.jsonl`` must be bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ["full", "lowrank", "lowrank-svd", "cola", "sltrain", "galore", "lost"]
SHORT = ["model.hidden_size=64", "model.intermediate_size=176", "model.num_heads=4", "model.num_layers=2",
         "train.steps=12", "train.batch_size=4", "train.eval_every=6", "train.log_every=1", "train.checkpoint_every=0",
         "train.precision=fp32", "train.progress=false", "train.threads=1", "train.peak_flops=1e9",
         "data.val_tokens=4096", "layer.galore_rank=16", "layer.galore_update_gap=5"]
COMPARED = ("step", "loss", "grad_norm", "val_loss")


def numbers(src: Path, method: str, extra: list[str], out: Path, config: str) -> list[tuple]:
    """The compared fields of every metrics line of one run trained with the code in ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    cmd = [sys.executable, "-m", "lostlm", "train", config, *SHORT, f"layer.method={method}", f"train.out_dir={out}", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {method} under {src} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [tuple(line.get(k) for k in COMPARED) for line in lines if "loss" in line or "val_loss" in line]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="the src folder of the code before the edit")
    parser.add_argument("--new", type=Path, required=True, help="the src folder of the code after it")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="one more override for every run (e.g. --set train.optimizer=adamw8bit); repeatable")
    args = parser.parse_args(argv)
    differ = 0
    with tempfile.TemporaryDirectory(prefix="lostlm-same-") as tmp:
        for method in args.methods:
            old = numbers(args.old, method, args.overrides, Path(tmp) / method / "old", args.config)
            new = numbers(args.new, method, args.overrides, Path(tmp) / method / "new", args.config)
            same = old == new and len(old) > 0
            differ += not same
            last = new[-1] if new else None
            print(f"{method}: {'bit-identical' if same else 'DIFFERENT'} over {len(new)} metrics lines (last: {last})", flush=True)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

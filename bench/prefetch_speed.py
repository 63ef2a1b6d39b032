"""Training tokens/s with and without the data prefetch thread, in ONE process (alternating).

    python bench/prefetch_speed.py --out bench/results/prefetch-speed.json

Source ``hf`` streaming from a local JSON-lines file (the default corpus, cached by
``lostlm train``; ``--corpus`` to pass another), so every batch is read and *tokenised* on the
fly: the case where loading costs most. Model: the ``tiny`` preset shape with a 2-layer body
(so a step is short and loading matters), bf16 autocast where available. Each setting runs
``--steps`` steps, twice, alternating, in fresh run folders; tokens/s is the summary's median-step
figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from lostlm.configs import load_config
from lostlm.data.common import cache_root
from lostlm.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", default=None, help="a .jsonl with a text field (default: the cached default corpus)")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    corpus = Path(args.corpus or cache_root(load_config().data) / "corpus" / "default-v1.jsonl")
    folder = Path(tempfile.mkdtemp(prefix="lostlm-prefetch-"))
    (folder / "data").mkdir()
    os.symlink(corpus.resolve(), folder / "data" / "train.jsonl")
    results: dict[str, list[float]] = {"prefetch=0": [], "prefetch=2": []}
    for repeat in range(args.repeats):
        for name in results:
            cfg = load_config(None, [
                "data.source=hf", f"data.hf_name={folder / 'data'}", "data.hf_subset=null", "data.hf_val_split=null",
                "data.bpe_vocab_size=2048", "data.seq_len=256", "data.val_tokens=2048", "data.max_documents=300", f"data.{name}",
                "model.num_layers=2", "layer.method=lost", "train.batch_size=8", f"train.steps={args.steps}",
                "train.eval_every=1000000", "train.checkpoint_every=0", "train.progress=false", "train.peak_flops=1e9",
                "train.threads=1", f"train.out_dir={folder / f'{name}-{repeat}'}"])
            summary = Trainer(cfg).train()
            results[name].append(summary["tokens_per_s_median_step"])
            print(name, results[name][-1], flush=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    report = {"cpu": next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?"),
              "threads": 1, "load_average_1min": os.getloadavg()[0], "steps": args.steps,
              "tokens_per_s_median_step": results, "ratio": statistics.median(results["prefetch=2"]) /
              statistics.median(results["prefetch=0"])}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

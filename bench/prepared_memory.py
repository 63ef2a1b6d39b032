"""Peak RSS of training from prepared token shards of two sizes: memory must not grow with the corpus.

    python bench/prepared_memory.py --sizes-mb 100 1000 --out bench/results/prepared-memory.json

For each size, random token ids (uint16, vocabulary 4096) are written as a prepared folder
(``write_prepared``: 100 M-token shards, manifest, tokenizer) in a scratch folder, then a
fresh ``lostlm train`` process trains a small model from it (``data.source=prepared``, the
default prefetch thread, steps spread over the whole corpus by the random order) and its peak
RSS (``ru_maxrss`` of that child, from ``os.wait4``) is recorded. The scratch folders are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lostlm.data.prepared import write_prepared

VOCAB = 4096


def word_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<eos>": VOCAB - 1}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<eos>")), eos_token="<eos>")


def random_tokens(total: int, seed: int, chunk: int = 50_000_000):
    rng = np.random.default_rng(seed)
    for start in range(0, total, chunk):
        yield rng.integers(0, VOCAB, size=min(chunk, total - start), dtype=np.uint16)


def measure(folder: Path, steps: int) -> dict:
    out = folder.parent / (folder.name + "-run")
    command = [sys.executable, "-m", "lostlm", "train", "data.source=prepared", f"data.prepared_dir={folder}",
               "data.seq_len=128", "data.val_tokens=2048", "model.hidden_size=64", "model.intermediate_size=128",
               "model.num_heads=4", "model.num_layers=2", "layer.method=lost", "layer.rank=16", "train.batch_size=8",
               f"train.steps={steps}", "train.eval_every=1000000", "train.checkpoint_every=0", "train.progress=false",
               "train.peak_flops=1e9", "train.threads=1", f"train.out_dir={out}"]
    start = time.perf_counter()
    with open(folder.parent / "train.log", "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode:
        raise SystemExit((folder.parent / "train.log").read_text()[-2000:])
    peak_kb = usage.ru_maxrss
    summary = json.loads((out / "summary.json").read_text())
    return {"peak_rss_mb": peak_kb / 1024, "seconds": seconds, "tokens_per_s": summary.get("tokens_per_s")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--scratch", default=None, help="folder for the token files (default: a temp folder)")
    parser.add_argument("--out")
    args = parser.parse_args()
    results = []
    for size in args.sizes_mb:
        scratch = Path(tempfile.mkdtemp(prefix="lostlm-prepared-", dir=args.scratch))
        try:
            tokens = size * 1_000_000 // 2
            folder = write_prepared(scratch / "corpus", word_tokenizer(),
                                    {"train": random_tokens(tokens, 0), "val": random_tokens(100_000, 1)},
                                    {"corpus": {"source": "random", "tokens": tokens}})
            on_disk = sum(p.stat().st_size for p in folder.glob("*.bin"))
            row = {"corpus_mb": on_disk / 1e6, "train_tokens": tokens, **measure(folder, args.steps)}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        print(json.dumps(row), flush=True)
        results.append(row)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
    report = {"cpu": model, "steps": args.steps, "load_average_1min": os.getloadavg()[0], "runs": results}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Tokens/s with and without the data prefetch thread, in ONE process (settings alternating).

    bench/quiet.sh python bench/prefetch_speed.py --repeats 5 --out bench/results/prefetch-speed.json

The data path imitated: streaming web text from the hub (``data.source=hf``) and tokenising it
on the fly with the byte-level BPE. Here: the default corpus (``--corpus``: another .jsonl) cut
after sentences or lines into documents of about ``--doc-chars`` characters (web-page sized;
C4's median is ~2 KB), streamed from a local JSON-lines file, BPE 512, batch 64 x 256 tokens
(one GPU's share of ``configs/60m.yaml`` on 8 GPUs: 512 / 8 sequences).
The loader alone is timed first (seconds per batch, no model): L. With a step's compute C,
no prefetch costs about L + C per step, a perfect overlap max(L, C).

Two measurements per repeat, the settings alternating:

* ``trainer`` (``data.prefetch`` 0 and 2 = the default, ``--trainer-steps`` steps): real
  ``lostlm`` training (``Trainer``) of a dense model small enough that its CPU step is within a
  few times L (d=32, 1 layer, 1 torch thread, fp32); the summary's
  ``tokens_per_s`` (all training tokens over the timed seconds of all steps, loading included:
  the mean, since loading comes in bursts and a median step would hide it). On a CPU such a
  small step is mostly Python and dispatch overhead, which holds the GIL the producer thread
  also needs, and the spare core may be taken by other processes.
* ``accelerator-like`` (``data.prefetch`` 0, 2, 8; ``--steps`` batches after one untimed
  batch that opens the stream): the data objects alone, each batch followed by ``time.sleep(L)``: the
  host's view of a step on an accelerator (the training thread launches kernels and then waits
  for the device with the GIL released, as in ``torch.cuda.synchronize``), with C = L, where
  the ideal overlap gives 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lostlm.configs import load_config
from lostlm.data import build_data
from lostlm.data.common import cache_root
from lostlm.train import Trainer

SETTINGS = ("prefetch=0", "prefetch=2", "prefetch=8")
TRAINER_SETTINGS = SETTINGS[:2]


def web_sized(corpus: Path, out: Path, doc_chars: int) -> int:
    """Write `corpus`'s documents cut after sentences or lines into pieces of about `doc_chars`
    characters; return the count."""
    count = 0
    with open(corpus, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for line in src:
            piece = ""
            for sentence in re.split(r"(?<=[.!?\n])\s+", json.loads(line)["text"]):
                piece = f"{piece} {sentence}" if piece else sentence
                if len(piece) >= doc_chars:
                    dst.write(json.dumps({"text": piece}) + "\n")
                    piece, count = "", count + 1
            if piece.strip():
                dst.write(json.dumps({"text": piece}) + "\n")
                count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", default=None, help="a .jsonl with a text field (default: the cached default corpus)")
    parser.add_argument("--doc-chars", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--trainer-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    corpus = Path(args.corpus or cache_root(load_config().data) / "corpus" / "default-v1.jsonl")
    folder = Path(tempfile.mkdtemp(prefix="lostlm-prefetch-"))
    (folder / "data").mkdir()
    documents = web_sized(corpus, folder / "data" / "train.jsonl", args.doc_chars)

    def overrides(setting: str, out: str) -> list[str]:
        return ["data.source=hf", f"data.hf_name={folder / 'data'}", "data.hf_subset=null", "data.hf_val_split=null",
                f"data.cache_dir={folder / 'cache'}", "data.bpe_vocab_size=512", "data.seq_len=256",
                "data.val_tokens=2048", f"data.{setting}", "layer.method=full", "model.hidden_size=32",
                "model.intermediate_size=64", "model.num_heads=2", "model.num_layers=1", "train.precision=fp32",
                f"train.batch_size={args.batch_size}", f"train.steps={args.trainer_steps}", "train.eval_every=1000000", "train.log_every=1000000",
                "train.checkpoint_every=0", "train.progress=false", "train.peak_flops=1e9", "train.threads=1",
                f"train.out_dir={folder / out}"]

    loader = build_data(load_config(None, overrides("prefetch=0", "loader")).data, 0)  # also trains the BPE once
    loader.next_batch(args.batch_size)  # opens the stream: not timed
    start = time.perf_counter()
    for _ in range(args.steps):
        loader.next_batch(args.batch_size)
    loader_s = (time.perf_counter() - start) / args.steps

    results: dict[str, dict[str, list[float]]] = {"trainer": {n: [] for n in TRAINER_SETTINGS},
                                                    "accelerator_like": {n: [] for n in SETTINGS}}
    for repeat in range(args.repeats):
        for name in SETTINGS:
            if name in TRAINER_SETTINGS:
                summary = Trainer(load_config(None, overrides(name, f"{name}-{repeat}"))).train()
                results["trainer"][name].append(summary["tokens_per_s"])
            data = build_data(load_config(None, overrides(name, "unused")).data, 0)
            data.next_batch(args.batch_size)  # opens the stream (and starts the thread): not timed
            start = time.perf_counter()
            for _ in range(args.steps):
                data.next_batch(args.batch_size)
                time.sleep(loader_s)  # the device step: the host waits with the GIL released
            results["accelerator_like"][name].append(args.batch_size * 256 * args.steps / (time.perf_counter() - start))
            if hasattr(data, "close"):
                data.close()
            print(name, {k: round(v[name][-1]) for k, v in results.items() if name in v}, flush=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    field = {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in cpu.splitlines() if ":" in l)}
    median = {part: {name: statistics.median(v) for name, v in values.items()} for part, values in results.items()}
    report = {"cpu": field.get("Model name", "?"), "cpus": field.get("CPU(s)", "?"), "torch_threads": 1,
              "load_average_1min_at_end": os.getloadavg()[0], "steps": args.steps, "trainer_steps": args.trainer_steps,
              "repeats": args.repeats, "python_switch_interval_s": sys.getswitchinterval(),
              "documents": documents, "doc_chars": args.doc_chars, "tokens_per_batch": args.batch_size * 256,
              "loader_alone_s_per_batch": loader_s, "tokens_per_s": results, "median": median,
              "ratio_over_prefetch0": {part: {name: v / m["prefetch=0"] for name, v in m.items() if name != "prefetch=0"}
                                       for part, m in median.items()}}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

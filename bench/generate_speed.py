"""Generation speed of ``lost_llama`` with and without the KV cache, in ONE process.

    flock /tmp/lostlm-cpu.lock python bench/generate_speed.py --out bench/results/generate-speed.json

The ``tiny`` preset (LOST layers, vocab 8192 as the default BPE, random weights: speed does not
depend on them) is wrapped as :class:`~lostlm.interop.lost_llama.LostLlamaForCausalLM` and
generates ``--tokens`` tokens greedily from a one-token prompt through transformers'
``generate``, alternately with ``use_cache=True`` (DynamicCache: one position per token) and
``use_cache=False`` (the whole prefix per token). Both must give the same tokens.
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

from lostlm.build import build_model
from lostlm.configs import load_config
from lostlm.interop.lost_llama import to_hf


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--method", default="lost")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, [f"model.preset={args.preset}", f"layer.method={args.method}"])
    model, _ = build_model(cfg, 8192)
    hf = to_hf(model, layer=cfg.layer, rank=cfg.resolved_rank()).eval()
    prompt = torch.tensor([[1]])
    options = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=0,
                   eos_token_id=None, attention_mask=torch.ones_like(prompt))
    times: dict[str, list[float]] = {"cache": [], "no_cache": []}
    outputs = {}
    with torch.no_grad():
        hf.generate(prompt, use_cache=True, **{**options, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
            for name, use_cache in (("cache", True), ("no_cache", False)):
                start = time.perf_counter()
                outputs[name] = hf.generate(prompt, use_cache=use_cache, **options)
                times[name].append(time.perf_counter() - start)
    same = torch.equal(outputs["cache"], outputs["no_cache"])
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {"load_average_1min": os.getloadavg()[0], "preset": args.preset, "method": args.method, "tokens": args.tokens, "threads": args.threads,
              "cpu": cpu_model(), "torch": torch.__version__, "seconds": times, "median_seconds": median,
              "tokens_per_s": {name: args.tokens / s for name, s in median.items()},
              "speedup": median["no_cache"] / median["cache"], "same_tokens": same}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Sample text from a trained run (or an exported folder), streaming tokens as they come.

    lostlm generate runs/lost-tiny --prompt "The old man"
    lostlm generate runs/lost-tiny --prompt "The king" --max-new-tokens 100 --temperature 0.7 --seed 3
    lostlm generate out/llama --prompt "The king" --temperature 0          # greedy, an exported folder

This is transformers' ``generate`` with a ``TextStreamer`` on our
:class:`~lostlm.interop.lost_llama.LostLlamaForCausalLM`, so sampling (temperature, top-k, top-p) is the
library's. The same seed gives the same text on the same machine. A KV cache (transformers'
``DynamicCache``) makes each new token cost one position instead of the whole prefix;
``--no-cache`` recomputes the prefix (slower, same greedy text; ``bench/generate_speed.py``).
The text goes to stdout, the one-line description of the model to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from .errors import LostLMError
from .runtime import device_kind


def load_for_generation(path: str | Path, device: str = "cpu") -> tuple[Any, Any, str]:
    """(transformers model, tokenizer, description) of a run folder, a checkpoint folder, or
    an exported folder (lost_llama or llama, recognised by its config.json)."""
    from .interop.lost_llama import load_hf_folder, to_hf

    folder = Path(path)
    if (folder / "config.json").is_file():
        model, tokenizer = load_hf_folder(folder, device)
        return model, tokenizer, f"{folder} ({model.config.model_type})"
    from .loading import load_trained_run

    run = load_trained_run(folder)
    model = to_hf(run).to(device).eval()
    return model, run.tokenizer, f"{run.checkpoint} ({run.config.layer.method}, step {run.step})"


@torch.no_grad()
def generate_text(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 50, temperature: float = 0.8,
                  top_k: int = 50, top_p: float = 0.95, seed: int = 0, stream: bool = False, use_cache: bool = True) -> str:
    """The prompt and its continuation as text. ``temperature=0``: greedy decoding;
    ``top_k=0`` / ``top_p=1``: that filter off. ``stream``: print tokens to stdout as they come.
    ``use_cache=False``: no KV cache (each token recomputes the prefix)."""
    from transformers import TextStreamer

    if max_new_tokens < 1:
        raise LostLMError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if not 0.0 < top_p <= 1.0 or top_k < 0 or temperature < 0:
        raise LostLMError("--top-p must be in (0, 1], --top-k and --temperature must be >= 0")
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"] if prompt else torch.zeros(1, 0, dtype=torch.long)
    if ids.shape[1] == 0:  # an empty prompt starts a new document, as after an EOS in training
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise LostLMError("the prompt is empty and the tokenizer has no bos/eos token to start from; pass --prompt")
        ids = torch.tensor([[start]])
    limit = model.config.max_position_embeddings
    if ids.shape[1] + max_new_tokens > limit:
        raise LostLMError(f"prompt ({ids.shape[1]} tokens) + --max-new-tokens {max_new_tokens} exceeds the model's "
                          f"{limit} positions; ask for fewer tokens")
    sampling = temperature > 0
    options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=sampling,
                                   pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                                   eos_token_id=tokenizer.eos_token_id, use_cache=use_cache)
    if sampling:
        options.update(temperature=temperature, top_k=top_k, top_p=top_p)
    else:  # keep the model's generation_config sampling defaults from warning about unused flags
        options.update(temperature=None, top_k=None, top_p=None)
    streamer = TextStreamer(tokenizer, skip_special_tokens=True) if stream else None
    torch.manual_seed(seed)
    ids = ids.to(device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **options)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a run or an exported folder, streamed")
    p.add_argument("path", help="run folder, checkpoints/step_* folder, or an exported (lost_)llama folder")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0: greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0: off")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1: off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix per token (no KV cache)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    device = device_kind(args.device)
    if device == "cuda" and not torch.cuda.is_available():
        raise LostLMError("--device cuda but no CUDA device is available; use --device cpu")
    model, tokenizer, description = load_for_generation(args.path, device)
    print(f"model: {description}", file=sys.stderr)
    generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                  args.seed, stream=True, use_cache=not args.no_cache)
    return 0

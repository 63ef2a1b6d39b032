"""``lostlm convert-pretrained``: the projections of a local transformers Llama converted into LOST (or any method).

    lostlm convert-pretrained path/to/llama --out out/lost-init layer.rank=128 layer.activation=identity

The conversion is exactly the one ``lostlm train model.init_from=DIR`` does at the start of
training (same ``train.seed`` ⇒ same layers): the command prints the per-layer relative error
of the converted weights and the ``lostlm train`` command that continues pre-training, and
writes the converted model as a lost_llama folder with ``--out``.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from ..configs import LayerConfig, apply_overrides, config_from_dict
from ..convert import ConvertedLayer, convert_linear_layers
from ..errors import LostLMError
from ..model import LlamaLM
from .llama_reader import llama_from_pretrained
from .lost_llama import save_hf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def convert_pretrained(hf_dir: str | Path, overrides: list[str], out_dir: str | Path | None = None,
                       seed: int = 0) -> tuple[LlamaLM, list[ConvertedLayer], LayerConfig, int]:
    """Convert the projections of a local transformers Llama into ``layer.*`` (default LOST) from
    the SVD of its real weights, exactly as ``lostlm train model.init_from=DIR`` (same
    ``train.seed``) does. Returns (model, per-layer report, layer config, rank); writes a
    lost_llama folder (with the source's tokenizer, if it has one) when ``out_dir`` is given."""
    for item in overrides:
        if not item.strip().startswith("layer."):
            raise LostLMError(f"override {item!r} is not a layer.* key; convert-pretrained takes layer overrides such as "
                              "layer.rank=128 layer.density=0.05")
    cfg = config_from_dict(apply_overrides({}, overrides))
    model = llama_from_pretrained(hf_dir)
    rank = cfg.layer.rank if cfg.layer.rank is not None else max(1, model.config.hidden_size // 4)
    report = convert_linear_layers(model, cfg.layer, rank, seed=seed + 1, init_std=model.config.init_std)
    if out_dir is not None:
        save_hf(model, out_dir, tokenizer=source_tokenizer(Path(hf_dir)), layer=cfg.layer, rank=rank)
    return model, report, cfg.layer, rank


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def source_tokenizer(folder: Path) -> Any:
    """The tokenizer saved beside a Llama checkpoint, or None (with a warning when unreadable)."""
    if not has_tokenizer_files(folder):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        print(f"warning: tokenizer of {folder} not copied ({exc.__class__.__name__})", file=sys.stderr)
        return None


def format_report(report: list[ConvertedLayer]) -> str:
    """One line per converted layer: name, shape, relative reconstruction error."""
    width = max((len(r.name) for r in report), default=10)
    lines = [f"{'layer':<{width}}  {'shape':>11}  rel. error ‖W-W0‖/‖W0‖"]
    for r in report:
        error = "n/a" if math.isnan(r.relative_error) else f"{r.relative_error:.4f}"
        lines.append(f"{r.name:<{width}}  {r.shape[0]:>5}x{r.shape[1]:<5}  {error}")
    finite = [r.relative_error for r in report if not math.isnan(r.relative_error)]
    if finite:
        lines.append(f"{len(report)} layers: mean {sum(finite) / len(finite):.4f}, max {max(finite):.4f}")
    else:
        lines.append(f"{len(report)} layers: no error to report (a SiLU between the factors is not a linear map; "
                     "lost with layer.activation=identity has one)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# command line


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-pretrained", help="convert a local transformers Llama into LOST layers (SVD of its weights)")
    p.add_argument("hf_dir", help="local folder of a transformers LlamaForCausalLM (config.json + safetensors)")
    p.add_argument("overrides", nargs="*", help="layer.key=value overrides, e.g. layer.rank=128 layer.activation=identity")
    p.add_argument("--out", help="write the converted model here as a lost_llama folder (default: only print the report)")
    p.add_argument("--seed", type=int, default=0, help="train.seed the run will use (random channel scores/inits)")
    p.set_defaults(func=cmd_convert_pretrained)


def cmd_convert_pretrained(args: argparse.Namespace) -> int:
    _, report, layer, rank = convert_pretrained(args.hf_dir, args.overrides, args.out, args.seed)
    print(format_report(report))
    if args.out:
        print(f"wrote {args.out}: lost_llama (import lostlm first)")
    given = {o.split("=", 1)[0].strip()[len("layer."):]: o.split("=", 1)[1] for o in args.overrides}
    settings = {"method": layer.method, **given, "rank": rank}
    words = ["lostlm", "train", f"model.init_from={args.hf_dir}"]
    has_tokenizer = has_tokenizer_files(Path(args.hf_dir))
    words.append(f"data.tokenizer={args.hf_dir}" if has_tokenizer else "data.tokenizer=TOKENIZER_DIR")
    words += [f"layer.{key}={value}" for key, value in settings.items()]
    if args.seed:
        words.append(f"train.seed={args.seed}")
    print("continue pre-training from these weights (the same conversion is redone at the start of training) with:\n  "
          + " ".join(shlex.quote(w) for w in words))
    if not has_tokenizer:
        print(f"({args.hf_dir} has no tokenizer files: set TOKENIZER_DIR to the folder of the model's tokenizer)")
    return 0

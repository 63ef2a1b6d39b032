"""Export a trained run for use outside lostlm, and convert a pretrained Llama into LOST.

    lostlm export runs/lost-tiny --out out/lost-hf            # lost_llama folder (needs `import lostlm`)
    lostlm export runs/lost-tiny --dense --out out/llama      # plain LlamaForCausalLM (transformers alone)
    lostlm convert-pretrained path/to/llama --out out/lost-init layer.rank=128 layer.activation=identity

``--dense`` merges every factorised layer into one matrix with ``merged_weight()``: full,
galore, lowrank, lowrank-svd, sltrain, and lost with ``layer.activation=identity``. cola and
lost with SiLU have a nonlinearity between the factors, so no dense matrix equals them: those
are refused (export them without ``--dense``). The folder holds config.json (model_type
llama), model.safetensors and the tokenizer; its logits equal the run's to float32 rounding.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import LostLMError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------
# dense export


@torch.no_grad()
def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every factorised layer replaced by ``<name>.weight`` =
    its merged dense matrix. Raises NotMergeable (a LostLMError) for SiLU layers."""
    from .layers import LOSTLinear, LowRankLinear, SLTrainLinear

    factorised = {name: module for name, module in model.named_modules()
                  if isinstance(module, (LOSTLinear, LowRankLinear, SLTrainLinear))}
    state = {}
    for name, tensor in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner not in factorised:
            state[name] = tensor
    for name, module in factorised.items():
        if module.bias is not None:
            raise LostLMError(f"layer {name} has a bias, which transformers' Llama does not have; it cannot be exported dense")
        state[f"{name}.weight"] = module.merged_weight()
    return state


def llama_config(model_cfg: Any, tokenizer: Any = None, dtype: str = "float32") -> Any:
    """transformers LlamaConfig of our ModelConfig (the mapping used by export and tests)."""
    from transformers import LlamaConfig

    from .hf import special_token_ids

    return LlamaConfig(vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size,
                       intermediate_size=model_cfg.intermediate_size, num_hidden_layers=model_cfg.num_layers,
                       num_attention_heads=model_cfg.num_heads, num_key_value_heads=model_cfg.num_kv_heads,
                       max_position_embeddings=model_cfg.max_seq_len, rope_theta=model_cfg.rope_theta,
                       rms_norm_eps=model_cfg.norm_eps, initializer_range=model_cfg.init_std,
                       tie_word_embeddings=model_cfg.tie_embeddings, hidden_act="silu", attention_bias=False,
                       mlp_bias=False, architectures=["LlamaForCausalLM"], dtype=dtype,
                       **{"bos_token_id": None, "eos_token_id": None, **special_token_ids(tokenizer)})


def save_dense(model: nn.Module, out_dir: str | Path, tokenizer: Any = None, dtype: str = "float32") -> Path:
    """Write a LlamaLM (any mergeable parametrisation) as a plain LlamaForCausalLM folder."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaForCausalLM

    from .weights import state_for_saving
    from .hf import special_token_ids

    if dtype not in DTYPES:
        raise LostLMError(f"--dtype {dtype} is not valid; use one of: {', '.join(DTYPES)}")
    state = dense_state_dict(model)
    config = llama_config(model.config, tokenizer, dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    # Check names and shapes against transformers' own class (built on meta: no memory, no init).
    with torch.device("meta"):
        reference = LlamaForCausalLM(config).state_dict()
    if config.tie_word_embeddings:
        reference.pop("lm_head.weight", None)
    bad = sorted(set(reference) ^ set(state)) or [k for k in state if tuple(state[k].shape) != tuple(reference[k].shape)]
    if bad:
        raise LostLMError(f"the merged model does not fit transformers' LlamaForCausalLM (first mismatch: {bad[0]}); "
                          "this is a bug in lostlm's export, please report it")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state_for_saving(state).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    GenerationConfig(**special_token_ids(tokenizer)).save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def export_dense(run_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """A trained run (folder or checkpoint folder) as a plain transformers Llama folder."""
    from .loading import load_trained_run

    run = load_trained_run(Path(run_path))
    return save_dense(run.model, out_dir, run.tokenizer, dtype)


def export_lost(run_path: str | Path, out_dir: str | Path) -> Path:
    """A trained run as a lost_llama folder (loads with AutoModelForCausalLM after ``import lostlm``)."""
    from .hf import save_hf
    from .loading import load_trained_run

    return save_hf(load_trained_run(Path(run_path)), out_dir)


# ----------------------------------------------------------------------------------------
# a pretrained Llama converted to LOST


def convert_pretrained(hf_dir: str | Path, overrides: list[str], out_dir: str | Path | None = None,
                       seed: int = 0) -> tuple[Any, list[Any], Any, int]:
    """Convert the projections of a local transformers Llama into ``layer.*`` (default LOST) from
    the SVD of its real weights, exactly as ``lostlm train model.init_from=DIR`` (same
    ``train.seed``) does. Returns (model, per-layer report, layer config, rank); writes a
    lost_llama folder (with the source's tokenizer, if it has one) when ``out_dir`` is given."""
    from .configs import apply_overrides, config_from_dict
    from .convert import convert_linear_layers
    from .hf import llama_from_pretrained, save_hf

    for item in overrides:
        if not item.strip().startswith("layer."):
            raise LostLMError(f"override {item!r} is not a layer.* key; convert-pretrained takes layer overrides such as "
                              "layer.rank=128 layer.density=0.05")
    cfg = config_from_dict(apply_overrides({}, overrides))
    model = llama_from_pretrained(hf_dir)
    rank = cfg.layer.rank if cfg.layer.rank is not None else max(1, model.config.hidden_size // 4)
    report = convert_linear_layers(model, cfg.layer, rank, seed=seed + 1, init_std=model.config.init_std)
    if out_dir is not None:
        save_hf(model, out_dir, tokenizer=_source_tokenizer(Path(hf_dir)), layer=cfg.layer, rank=rank)
    return model, report, cfg.layer, rank


def _source_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def _source_tokenizer(folder: Path) -> Any:
    if not _source_tokenizer_files(folder):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        print(f"warning: tokenizer of {folder} not copied ({exc.__class__.__name__})", file=sys.stderr)
        return None


def format_report(report: list[Any]) -> str:
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
    p = sub.add_parser("export", help="write a run as a transformers folder (lost_llama, or --dense plain llama)")
    p.add_argument("path", help="run folder (uses its latest checkpoint) or a checkpoints/step_* folder")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--dense", action="store_true",
                   help="merge the layers into a plain LlamaForCausalLM (needs a mergeable method)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="--dense: dtype of the saved weights")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert-pretrained", help="convert a local transformers Llama into LOST layers (SVD of its weights)")
    p.add_argument("hf_dir", help="local folder of a transformers LlamaForCausalLM (config.json + safetensors)")
    p.add_argument("overrides", nargs="*", help="layer.key=value overrides, e.g. layer.rank=128 layer.activation=identity")
    p.add_argument("--out", help="write the converted model here as a lost_llama folder (default: only print the report)")
    p.add_argument("--seed", type=int, default=0, help="train.seed the run will use (random channel scores/inits)")
    p.set_defaults(func=cmd_convert_pretrained)


def cmd_export(args: argparse.Namespace) -> int:
    out = export_dense(args.path, args.out, args.dtype) if args.dense else export_lost(args.path, args.out)
    kind = "llama (transformers alone)" if args.dense else "lost_llama (import lostlm first)"
    print(f"wrote {out}: {kind}")
    return 0


def cmd_convert_pretrained(args: argparse.Namespace) -> int:
    _, report, layer, rank = convert_pretrained(args.hf_dir, args.overrides, args.out, args.seed)
    print(format_report(report))
    if args.out:
        print(f"wrote {args.out}: lost_llama (import lostlm first)")
    given = {o.split("=", 1)[0].strip()[len("layer."):]: o.split("=", 1)[1] for o in args.overrides}
    settings = {"method": layer.method, **given, "rank": rank}
    words = ["lostlm", "train", f"model.init_from={args.hf_dir}"]
    has_tokenizer = _source_tokenizer_files(Path(args.hf_dir))
    words.append(f"data.tokenizer={args.hf_dir}" if has_tokenizer else "data.tokenizer=TOKENIZER_DIR")
    words += [f"layer.{key}={value}" for key, value in settings.items()]
    if args.seed:
        words.append(f"train.seed={args.seed}")
    print("continue pre-training from these weights (the same conversion is redone at the start of training) with:\n  "
          + " ".join(shlex.quote(w) for w in words))
    if not has_tokenizer:
        print(f"({args.hf_dir} has no tokenizer files: set TOKENIZER_DIR to the folder of the model's tokenizer)")
    return 0

"""Load a trained run back: its config, tokenizer and model weights (for eval, generate, export)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from . import checkpoint as ckpt_io
from .configs import Config, apply_overrides, config_from_dict, read_config_file
from .build import build_model
from .errors import LostLMError
from .model import LlamaLM


@dataclass
class TrainedRun:
    config: Config
    model: LlamaLM
    tokenizer: PreTrainedTokenizerBase
    checkpoint: Path
    step: int


def locate(path: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) for a run folder or one of its checkpoint folders."""
    path = Path(path)
    if not path.exists():
        raise LostLMError(f"{path} does not exist; pass a run folder (train.out_dir) or a checkpoints/step_* folder")
    ckpt = ckpt_io.find_checkpoint(path)  # verified; a damaged newest one falls back with a warning
    if ckpt is None:
        raise LostLMError(f"{path} holds no checkpoint; train first (lostlm train) or pass a checkpoints/step_* folder")
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else path
    return run_dir, ckpt


def load_trained_run(path: Path, overrides: list[str] | None = None) -> TrainedRun:
    """Rebuild the model of a run exactly as trained (same layers, same channel indices) and load
    the weights of its latest checkpoint (or of the given checkpoint folder)."""
    run_dir, ckpt = locate(path)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise LostLMError(f"{run_dir} has no config.yaml next to its checkpoints; it is not a lostlm run folder")
    cfg = config_from_dict(apply_overrides(read_config_file(config_file), overrides or []))
    tokenizer_dir = run_dir / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise LostLMError(f"{run_dir} has no tokenizer/ folder; it is not a complete lostlm run folder")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    weights = ckpt_io.load_model_state(ckpt)
    vocab = weights["model.embed_tokens.weight"].shape[0]
    model, _ = build_model(cfg, vocab)
    ckpt_io.load_weights_into(model, weights, ckpt)
    step = ckpt_io.read_state(ckpt)["step"]
    return TrainedRun(cfg, model.eval(), tokenizer, ckpt, step)

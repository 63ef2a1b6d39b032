"""Command line: ``lostlm train | eval | ...``.

    lostlm train                                   # the default job: LOST, tiny preset, bundled corpus
    lostlm train configs/tiny.yaml --method full   # a recipe, another parametrisation
    lostlm train configs/60m.yaml train.lr=1e-3 layer.rank=64 --out runs/60m-r64
    lostlm eval runs/default                       # validation loss/perplexity of a run's latest checkpoint

Every ``section.key=value`` argument overrides one config key (values are parsed as YAML).
Errors in the user's input are printed as one ``error: ...`` line with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

from .configs import METHODS, load_config
from .errors import LostLMError


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pre-train a model (no arguments: the default LOST job)")
    p.add_argument("config", nargs="?", help="recipe .yaml/.toml (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-3")
    p.add_argument("--method", choices=METHODS, help="parametrisation (layer.method)")
    p.add_argument("--preset", help="model preset (model.preset)")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--out", help="run folder (train.out_dir); default runs/<method>-<preset>")
    p.add_argument("--seed", type=int, help="seed (train.seed)")
    p.set_defaults(func=cmd_train)


def _train_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).exists():  # only overrides were given
        overrides.insert(0, config)
        config = None
    for flag, key in (("method", "layer.method"), ("preset", "model.preset"), ("steps", "train.steps"),
                      ("out", "train.out_dir"), ("seed", "train.seed")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    return config, overrides


def cmd_train(args: argparse.Namespace) -> int:
    config, overrides = _train_overrides(args)
    cfg = load_config(config, overrides)
    from .summary import format_summary
    from .train import Trainer

    trainer = Trainer(cfg)
    if trainer.env.is_main:
        print(f"run folder: {cfg.train.out_dir}   (resuming at step {trainer.step})" if trainer.step else
              f"run folder: {cfg.train.out_dir}", file=sys.stderr)
        print(f"data: {json.dumps(trainer.data.describe())}", file=sys.stderr)
    summary = trainer.train()
    if trainer.env.is_main:
        print(format_summary(summary))
        print(f"curves: {Path(cfg.train.out_dir) / 'curves.png'}   summary: {Path(cfg.train.out_dir) / 'summary.json'}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity of a run or checkpoint")
    p.add_argument("path", help="run folder (uses its latest checkpoint) or a checkpoints/step_* folder")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the run's config (e.g. data.val_tokens=...)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(Path(args.path), args.overrides)
    finite = all(math.isfinite(v) for v in result.values() if isinstance(v, float))
    # Strict JSON: a non-finite number is printed as null, and the exit status says it failed.
    print(json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in result.items()}, indent=1))
    if not finite:
        raise LostLMError(f"the validation loss of {result['checkpoint']} is not finite; the weights are damaged "
                          "or diverged: evaluate an earlier checkpoint (checkpoints/step_*)")
    return 0


# Modules that contribute sub-commands through a ``register(subparsers)`` function.
COMMAND_MODULES: tuple[str, ...] = ("generate", "export", "interop.pretrained", "bench", "bench.scaling_command", "estimate",
                                     "data.prepared")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lostlm", description="Pre-train LLaMA models with LOST and its baselines.")
    sub = parser.add_subparsers(dest="command")
    _add_train(sub)
    _add_eval(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(f"lostlm.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if argv[0] not in commands:
        parser.parse_args(argv)  # prints usage/help and exits
        return 2
    # Per command, so that key=value overrides may come before or after --options.
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    try:
        return args.func(args)
    except LostLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment, not the code: disk full, permissions, a vanished file
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"error: {exc.strerror or exc}{where}; free disk space or fix the path/permissions and run again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the training loop (which saves and stops cleanly itself)
        print("error: interrupted; nothing was being saved, run the same command again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

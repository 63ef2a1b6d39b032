"""The run folder and its resume policy.

A run folder (``train.out_dir``) holds ``config.yaml``, ``tokenizer/``, ``metrics.jsonl``,
``checkpoints/`` (see :mod:`lostlm.checkpoint`), ``summary.json`` and ``curves.png``. Running
the same command again continues the run from its latest checkpoint, provided the config
differs at most in :data:`OPERATIONAL_KEYS` (which do not change the math); anything else is
refused, so a folder never mixes two different runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import checkpoint as ckpt_io
from .configs import Config, read_config_file, save_config
from .errors import LostLMError
from .runtime import atomic_write_text

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"

# Keys that may change between a checkpoint and its resume (they do not change the math).
OPERATIONAL_KEYS = {"train": {"steps", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints", "out_dir",
                              "resume", "device", "threads", "progress", "compile", "peak_flops", "loggers"},
                    "data": {"cache_dir", "prefetch"}}


def significant_differences(saved: dict, current: dict) -> list[str]:
    """Config keys whose change would make a resumed run differ from an uninterrupted one."""
    diffs = []
    for section, values in current.items():
        for key, value in values.items():
            if key in OPERATIONAL_KEYS.get(section, set()):
                continue
            old = saved.get(section, {}).get(key)
            if old != value:
                diffs.append(f"{section}.{key}: {old!r} -> {value!r}")
    return diffs


def check_config(run_dir: Path, cfg: Config) -> None:
    """Refuse a folder that holds a run with a significantly different config."""
    config_file = Path(run_dir) / CONFIG_FILE
    if not config_file.is_file():
        return
    diffs = significant_differences(read_config_file(config_file), cfg.to_dict())
    if diffs:
        raise LostLMError(f"train.out_dir={run_dir} holds a run with a different config ({diffs[0]}"
                          f"{f' and {len(diffs) - 1} more' if len(diffs) > 1 else ''}); "
                          "use another train.out_dir, or the run's own config to continue it")


def checkpoint_to_resume(run_dir: Path, cfg: Config) -> Path | None:
    """The checkpoint this run continues from (None: a fresh start), after the config check
    and ``train.resume`` (``never`` refuses a folder that already holds a checkpoint)."""
    latest = ckpt_io.latest_checkpoint(run_dir)
    check_config(run_dir, cfg)
    if latest is not None and cfg.train.resume == "never":
        raise LostLMError(f"train.out_dir={run_dir} already holds a checkpoint ({latest.name}); "
                          "use another train.out_dir, or train.resume=auto to continue it")
    return latest


def write_run_files(run_dir: Path, cfg: Config, tokenizer, step: int) -> None:
    """(Rank 0) the folder, its config.yaml and tokenizer/, and a metrics log trimmed to ``step``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    trim_metrics(run_dir, step)


def trim_metrics(run_dir: Path, step: int) -> None:
    """After a resume, drop log lines from steps the checkpoint does not contain."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def append_metrics(run_dir: Path, record: dict) -> None:
    """Add one JSON line to the run's metrics log (:class:`lostlm.loggers.Loggers` calls this;
    the line is flushed at once so ``tail -f`` and a crash see every logged step)."""
    with open(Path(run_dir) / METRICS_FILE, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()

"""The run folder and its resume policy.

A run folder (``train.out_dir``) holds ``config.yaml``, ``tokenizer/``, ``metrics.jsonl``,
``checkpoints/`` (see :mod:`lostlm.checkpoint`), ``summary.json`` and ``curves.png``. Running
the same command again continues the run from its latest checkpoint, provided the config
differs at most in :data:`OPERATIONAL_KEYS` (which do not change the math); anything else is
refused, so a folder never mixes two different runs. The trainer holds the folder's lock
(:mod:`lostlm.runlock`) while it checks and writes, so two trainers never interleave.

``metrics.jsonl`` is strict JSON, one object a line: a non-finite number is written as
``null`` (a skipped step's loss, for instance). A damaged line (a partial last line after a
crash, or anything that does not parse) is dropped with a one-line warning when the run resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

from . import checkpoint as ckpt_io
from .configs import Config, read_config_file, save_config
from .errors import LostLMError
from .optim import lr_at
from .runtime import atomic_write_text, precision_name

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"

# Keys that may change between a checkpoint and its resume: they cannot change a single number
# of the model or of its training metrics. Not here, on purpose: train.steps (the warmup and
# cosine schedule depend on it), train.threads (intra-op parallel reductions sum in another
# order), train.device and train.compile (other kernels, other rounding), train.max_bad_steps
# (decides whether a run stops). train.steps is a special case (see steps_change_is_safe):
# it may change when the learning rate of every step already taken stays the same.
OPERATIONAL_KEYS = {"train": {"eval_every", "log_every", "checkpoint_every", "keep_checkpoints", "out_dir",
                              "resume", "progress", "peak_flops", "loggers",
                              "diagnostics", "release_freed_memory"},
                    "data": {"cache_dir", "prefetch"}}


def significant_differences(saved: dict, current: dict) -> list[str]:
    """Config keys whose change would make a resumed run differ from an uninterrupted one. A key
    missing from a saved section (a config written before that key existed) counts as its
    default, so a run started with an older lostlm resumes under a newer one."""
    defaults = Config().to_dict()
    diffs = []
    for section, values in current.items():
        for key, value in values.items():
            if key in OPERATIONAL_KEYS.get(section, set()):
                continue
            old_values = saved.get(section)
            old = old_values.get(key, defaults.get(section, {}).get(key)) if isinstance(old_values, dict) else None
            if old != value:
                diffs.append(f"{section}.{key}: {old!r} -> {value!r}")
    return diffs


def steps_change_is_safe(old_steps, cfg: Config, done: int) -> bool:
    """A new train.steps keeps the run exact when the schedule of the ``done`` steps is unchanged."""
    if not isinstance(old_steps, int) or old_steps <= 0:
        return False
    old = SimpleNamespace(train=dataclasses.replace(cfg.train, steps=old_steps))
    return all(lr_at(i, old) == lr_at(i, cfg) for i in range(done))


def check_config(run_dir: Path, cfg: Config, done: int = 0, trained_in: str | None = None) -> None:
    """Refuse a folder that holds a run with a significantly different config (``done``: the
    steps its checkpoint has taken; ``trained_in``: the precision it recorded, see below)."""
    config_file = Path(run_dir) / CONFIG_FILE
    if not config_file.is_file():
        return
    saved = read_config_file(config_file)
    diffs = significant_differences(saved, cfg.to_dict())
    old_steps = saved.get("train", {}).get("steps") if isinstance(saved.get("train"), dict) else None
    if any(d.startswith("train.steps:") for d in diffs) and steps_change_is_safe(old_steps, cfg, done):
        diffs = [d for d in diffs if not d.startswith("train.steps:")]
    if trained_in is not None:
        # The checkpoint says what it trained in: that decides, not the text of train.precision
        # (``auto`` is fp32 on a CPU without native bf16 and bf16 on one with it).
        diffs = [d for d in diffs if not d.startswith("train.precision:")]
        now = precision_name(cfg.train.precision, cfg.train.device)
        if trained_in != now:
            setting = {"float32": "fp32", "bfloat16": "bf16"}.get(trained_in) if isinstance(trained_in, str) else None
            fix = f"set train.precision={setting} to continue it exactly" if setting else \
                "the checkpoint is damaged; move it away"
            raise LostLMError(f"train.out_dir={run_dir} holds a run trained in {str(trained_in)[:40]!r}, but "
                              f"train.precision={cfg.train.precision} trains in {now} here; {fix}")
    if diffs:
        raise LostLMError(f"train.out_dir={run_dir} holds a run with a different config ({diffs[0]}"
                          f"{f' and {len(diffs) - 1} more' if len(diffs) > 1 else ''}); "
                          "use another train.out_dir, or the run's own config to continue it")


def checkpoint_to_resume(run_dir: Path, cfg: Config) -> Path | None:
    """The checkpoint this run continues from (None: a fresh start), after the config check
    and ``train.resume`` (``never`` refuses a folder that already holds a checkpoint)."""
    latest = ckpt_io.find_checkpoint(run_dir)
    state = ckpt_io.read_state(latest) if latest is not None else {}
    check_config(run_dir, cfg, state.get("step", 0), state.get("precision"))
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


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``metrics.jsonl``; damaged lines are dropped with a one-line warning."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            ckpt_io.warn(f"{path} line {number} is damaged (a write cut short by a crash?); dropped")
            continue
        records.append(record)
    return records


def trim_metrics(run_dir: Path, step: int) -> None:
    """After a resume, drop log lines from steps the checkpoint does not contain (and damaged ones)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [r for r in read_metrics(run_dir) if isinstance(r.get("step", 0), int) and r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))


def _finite_or_null(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def append_metrics(run_dir: Path, record: dict) -> None:
    """Add one strict-JSON line to the run's metrics log (non-finite numbers become null); flushed
    at once so ``tail -f`` and a crash see every logged step. :class:`lostlm.loggers.Loggers` calls this."""
    line = json.dumps({k: _finite_or_null(v) for k, v in record.items()}, allow_nan=False)
    with open(Path(run_dir) / METRICS_FILE, "a") as fh:
        fh.write(line + "\n")
        fh.flush()

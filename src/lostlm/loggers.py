"""Where training metrics go: ``metrics.jsonl`` always, TensorBoard and Weights & Biases on request.

``train.loggers`` lists the sinks; ``jsonl`` is always on (resume, plots and ``lostlm bench``
read ``metrics.jsonl``), so ``train.loggers=[tensorboard,wandb]`` adds the two trackers::

    lostlm train train.loggers=[jsonl,tensorboard]    # then: tensorboard --logdir runs/
    lostlm train train.loggers=[jsonl,wandb]          # offline; later: wandb sync runs/<run>/wandb/offline-run-*

Only rank 0 writes (the trainer builds a :class:`Loggers` with ``enabled=False`` elsewhere).
Every sink gets the same records under the same names as the JSONL (``loss``, ``lr``,
``grad_norm``, ``tok_per_s``, ``val_loss`` ..., x-axis ``step``), the run's config once at the
start, and the summary at the end. TensorBoard writes ``<run>/tensorboard/``; W&B runs in
offline mode (never the network; ``WANDB_MODE`` may override it) under ``<run>/wandb/``, and
a resumed run continues the same W&B run (its id is kept in ``<run>/wandb-run-id``). The
trackers are optional extras: ``pip install 'lostlm[tensorboard]'`` / ``'lostlm[wandb]'``.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from . import rundir
from .errors import LostLMError

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_ID_FILE = "wandb-run-id"


def _missing(name: str, module: str) -> LostLMError:
    return LostLMError(f"train.loggers includes {name} but {module} is not installed; "
                       f"pip install 'lostlm[{name}]' (or drop {name} from train.loggers)")


def flat_numbers(record: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) record as ``{"a/b": value}`` (booleans and text dropped)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_numbers(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


class TensorBoardSink:
    def __init__(self, run_dir: Path, config: dict) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises this when the tensorboard package is absent
            raise _missing("tensorboard", "the tensorboard package") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), flush_secs=10)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```")

    def log(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for name, value in flat_numbers(record).items():
            if name != "step":
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def summary(self, summary: dict) -> None:
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=1) + "\n```")
        for name, value in flat_numbers(summary).items():
            self.writer.add_scalar(f"summary/{name}", value, int(summary.get("step", 0)))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: Path, config: dict) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "the wandb package") from None
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        (run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lostlm"), name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"),
                              settings=wandb.Settings(silent=True, console="off"))

    def log(self, record: dict) -> None:
        values = {k: v for k, v in flat_numbers(record).items() if k != "step"}
        self.run.log(values, step=int(record.get("step", 0)))

    def summary(self, summary: dict) -> None:
        self.run.summary.update(flat_numbers(summary))

    def close(self) -> None:
        self.run.finish()


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


class Loggers:
    """The run's metric sinks. ``log(record)`` appends to metrics.jsonl and forwards the record;
    ``summary(dict)`` hands over the end-of-run summary; ``close()`` flushes and ends them.
    With ``enabled=False`` (ranks other than 0) every call does nothing."""

    def __init__(self, run_dir: str | Path, names: list[str], config: dict, enabled: bool = True) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.sinks: list[Any] = []
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.sinks = [SINKS[name](self.run_dir, config) for name in dict.fromkeys(names) if name in SINKS]

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        rundir.append_metrics(self.run_dir, record)
        for sink in self.sinks:
            sink.log(record)

    def summary(self, summary: dict) -> None:
        for sink in self.sinks:
            sink.summary(summary)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

"""Shared fixtures: a small generated English-like corpus and a fully offline environment."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

# Nothing in the tests may reach a hub: fail at once instead of retrying for ~20 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_SUBJECTS = ["the old man", "a young sailor", "the king", "my brother", "the whale", "our captain", "the queen", "a stranger"]
_VERBS = ["saw", "followed", "praised", "feared", "remembered", "called", "answered", "carried"]
_OBJECTS = ["the sea", "a letter", "the golden crown", "his ship", "the quiet town", "an old song", "the long road", "her friend"]
_ENDINGS = ["at dawn", "in silence", "with great care", "before the storm", "without a word", "once again"]


def generate_documents(count: int, seed: int = 0, sentences: tuple[int, int] = (5, 30)) -> list[str]:
    """Deterministic documents of simple English sentences (a learnable, non-trivial language)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        n = rng.randint(*sentences)
        sents = [f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}."
                 for _ in range(n)]
        docs.append(" ".join(sents))
    return docs


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """A folder with the same generated corpus as .txt files and as one .jsonl file."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = generate_documents(200)
    for i in range(4):
        (folder / f"part{i}.txt").write_text("\n\n".join(docs[i * 50:(i + 1) * 50]) + "\n")
    with open(folder / "docs.jsonl", "w") as fh:
        for doc in docs:
            fh.write(json.dumps({"text": doc}) + "\n")
    return folder


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cache"
    folder.mkdir()
    return folder


def tiny_run_overrides(corpus_dir: Path, cache_dir: Path, out_dir: Path, **extra) -> list[str]:
    """key=value overrides of a seconds-long CPU run on the generated corpus."""
    values = {
        "data.source": "files", "data.paths": f"[{corpus_dir}/docs.jsonl]", "data.cache_dir": str(cache_dir),
        "data.bpe_vocab_size": 400, "data.seq_len": 32, "data.val_tokens": 1024, "data.val_fraction": 0.1,
        "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_heads": 4, "model.num_layers": 2,
        "layer.rank": 8, "layer.density": 0.1, "train.batch_size": 8, "train.steps": 6, "train.lr": 3e-3,
        "train.precision": "fp32", "train.progress": False, "train.peak_flops": 1e9, "train.eval_every": 3,
        "train.log_every": 1, "train.checkpoint_every": 3, "train.out_dir": str(out_dir),
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def tiny_run(corpus_dir: Path, cache_dir: Path, tmp_path: Path):
    """Factory: tiny_run(out_name, **overrides) -> list of overrides (use train__steps=... for train.steps)."""
    def make(name: str = "run", **extra) -> list[str]:
        return tiny_run_overrides(corpus_dir, cache_dir, tmp_path / name, **extra)
    return make


@pytest.fixture
def interrupted_run(tiny_run, monkeypatch):
    """Factory: interrupted_run(name, step=3, **overrides) trains run ``name`` until a
    KeyboardInterrupt arrives half-way through the step after ``step`` (that step must not count),
    checks the trainer's one-line error and returns its text; the run then resumes from there."""
    from lostlm.configs import load_config
    from lostlm.errors import LostLMError
    from lostlm.train import Trainer

    def run(name: str, step: int = 3, **extra) -> str:
        trainer = Trainer(load_config(None, tiny_run(name, **extra)))
        real_step = Trainer.train_step

        def step_then_interrupt(self, batch):
            if self.step == step:
                raise KeyboardInterrupt
            return real_step(self, batch)

        monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)
        try:
            with pytest.raises(LostLMError, match=f"interrupted at step {step}") as caught:
                trainer.train()
        finally:
            monkeypatch.setattr(Trainer, "train_step", real_step)
        return str(caught.value)

    return run

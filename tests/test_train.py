"""The training loop: learning, exact resume, gradient accumulation, clear errors."""

import json

import pytest
import torch

from lostlm.checkpoint import latest_checkpoint, load_model_state
from lostlm.cli import main
from lostlm.configs import load_config
from lostlm.errors import LostLMError
from lostlm.train import Trainer


def losses(run_dir):
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def test_loss_falls_well_below_its_start(tiny_run, tmp_path):
    cfg = load_config(None, tiny_run("learn", train__steps=60, train__lr=1e-2, train__eval_every=60,
                                     train__checkpoint_every=0, layer__method="lost"))
    summary = Trainer(cfg).train()
    curve = losses(tmp_path / "learn")
    assert curve[0] > 5.5  # ~log(400) at the start
    assert sum(curve[-5:]) / 5 < 0.6 * curve[0]
    assert summary["val_ppl"] < summary["unigram_ppl"] / 2  # learned context, not just word frequencies
    assert (tmp_path / "learn" / "curves.png").stat().st_size > 1000
    assert summary["tokens"] == 60 * 8 * 32 and summary["mfu"] > 0 and summary["peak_memory_bytes"] > 0


@pytest.mark.parametrize("method", ["lost", "galore"])
def test_resume_is_exact(tiny_run, tmp_path, interrupted_run, method):
    """N steps straight == N/2 steps, Ctrl-C, same command again for the rest."""
    extra = dict(layer__method=method, layer__galore_rank=4, layer__galore_update_gap=2, train__checkpoint_every=0)
    Trainer(load_config(None, tiny_run("straight", **extra))).train()

    assert "interrupted at step 3; saved" in interrupted_run("resumed", **extra)  # half-way through step 4
    resumed = Trainer(load_config(None, tiny_run("resumed", **extra)))
    assert resumed.step == 3
    resumed.train()
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    a = load_model_state(latest_checkpoint(tmp_path / "straight"))
    b = load_model_state(latest_checkpoint(tmp_path / "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_equals_one_big_batch(tiny_run):
    one = Trainer(load_config(None, tiny_run("one", train__steps=1)))
    four = Trainer(load_config(None, tiny_run("four", train__steps=1, train__micro_batch_size=2)))
    assert four.accumulation == 4
    batch = one.data.next_batch(8)
    stats_one, stats_four = one.train_step(batch), four.train_step(batch)
    assert stats_one["loss"] == pytest.approx(stats_four["loss"], abs=1e-6)
    for (name, p), q in zip(one.model.named_parameters(), four.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_z_loss_is_logged_and_changes_the_update(tiny_run):
    plain = Trainer(load_config(None, tiny_run("plain", train__steps=1)))
    zl = Trainer(load_config(None, tiny_run("zl", train__steps=1, train__z_loss=1e-1)))
    batch = plain.data.next_batch(8)
    plain.train_step(batch)
    stats = zl.train_step(batch)
    assert stats["z_loss"] > 0
    assert not torch.allclose(plain.model.lm_head.weight, zl.model.lm_head.weight)


def test_checkpoint_from_a_different_config_is_refused(tiny_run):
    Trainer(load_config(None, tiny_run("run", train__steps=3))).train()
    with pytest.raises(LostLMError, match=r"holds a run with a different config \(layer.method: 'lost' -> 'full'\)"):
        Trainer(load_config(None, tiny_run("run", layer__method="full", train__steps=3)))
    with pytest.raises(LostLMError, match="already holds a checkpoint"):
        Trainer(load_config(None, tiny_run("run", train__resume="never", train__steps=3)))


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    """The CLI's error: exactly one 'error:' line, last, and no traceback (progress lines may precede it)."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and sum(l.startswith("error:") for l in lines) == 1 and lines[-1].startswith("error: "), err
    return lines[-1]


def test_cli_train_eval_and_errors(tiny_run, tmp_path, capsys):
    code, out, err = run_cli(["train", *tiny_run("cli"), "--method", "full"], capsys)
    assert code == 0 and "validation loss" in out and "tokens/s" in out and "MFU" in out
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    code, out, err = run_cli(["eval", str(tmp_path / "cli")], capsys)
    result = json.loads(out)
    assert code == 0 and result["step"] == 6 and result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    for args, fragment in [
        (["train", "train.lrr=1"], "unknown config key train.lrr (did you mean train.lr?)"),
        (["train", str(tmp_path / "nope.yaml")], "does not exist"),
        (["train", *tiny_run("x", data__paths=f"[{tmp_path}/missing/*.txt]")], "data.paths"),
        (["eval", str(tmp_path / "nothing")], "does not exist"),
        (["train", *tiny_run("cli", model__hidden_size=64)], "different config"),
    ]:
        code, out, err = run_cli(args, capsys)
        assert code == 2 and fragment in one_error_line(err), (args, err)


def test_unreadable_checkpoint_gives_clear_error(tiny_run, tmp_path, capsys):
    Trainer(load_config(None, tiny_run("broken", train__steps=3))).train()
    ckpt = latest_checkpoint(tmp_path / "broken")
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    code, out, err = run_cli(["train", *tiny_run("broken")], capsys)
    assert code == 2 and "model.safetensors" in one_error_line(err)
    assert (ckpt / "state.json").is_file()  # nothing was deleted


def test_sigterm_saves_a_checkpoint_before_stopping(tiny_run, tmp_path):
    """A pre-empted job (SIGTERM) keeps its work: checkpoint saved, one error line, exit 2."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = tiny_run("term", train__steps=100000, train__checkpoint_every=0, train__eval_every=100000)
    proc = subprocess.Popen([sys.executable, "-m", "lostlm", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: interrupted at step") and "Traceback" not in err
    ckpt = latest_checkpoint(tmp_path / "term")
    assert ckpt is not None and json.loads((ckpt / "state.json").read_text())["step"] >= 3

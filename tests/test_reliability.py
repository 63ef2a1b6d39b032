"""Reliability: data-only checkpoint state, checksums and fallback, non-finite steps, signals,
one writer per run folder, durable saves, metrics repair, config ranges. (The long fault sweep
is bench/fault_sweep.py.)"""

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lostlm import checkpoint as ckpt_io
from lostlm import rundir, statecodec
from lostlm.cli import main
from lostlm.configs import load_config
from lostlm.errors import LostLMError
from lostlm.runlock import RunLock
from lostlm.train import Trainer


def small_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


def make_checkpoints(run, steps=(1, 2)):
    for step in steps:
        ckpt_io.save_checkpoint(run, step, small_state(step), {"state": {0: {"m": torch.ones(2)}}, "param_groups": []},
                                {"data": {}, "tokens": 0}, keep=5)
    return [run / "checkpoints" / f"step_{s:08d}" for s in steps]


# -- crafted state: nothing imported, built or deleted ------------------------------------

@pytest.mark.parametrize("crafted", [
    {"__object__": "evil_sweep_mod:Thing", "attrs": {"__dict__": []}},
    {"__dict__": [["state", {"__dict__": [[0, {"__object__": "evil_sweep_mod:Thing", "attrs": []}]]}]]},
    {"__class__": "evil_sweep_mod.Thing"},
    {"__tensor__": "evil_sweep_mod:Thing"},
    {"__tensor__": "opt.x", "stride": [10 ** 12]},
    {"__dict__": [[["evil_sweep_mod"], 1]]},
    {"__galore_projector__": {"rank": "evil_sweep_mod", "verbose": False, "update_proj_gap": 2, "scale": 1.0,
                              "proj_type": "std", "ortho_matrix": None}},
    {"__galore_projector__": {"rank": 2, "verbose": False, "update_proj_gap": 2, "scale": 1.0, "proj_type": "std",
                              "ortho_matrix": None, "__module__": "evil_sweep_mod"}},
    "DEEP",
])
def test_crafted_state_is_refused_and_imports_nothing(tmp_path, monkeypatch, capsys, crafted):
    marker = tmp_path / "marker"
    marker.write_text("keep")
    (tmp_path / "evil_sweep_mod.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).unlink()\nclass Thing: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    older, newest = make_checkpoints(tmp_path / "run")
    state = json.loads((newest / "state.json").read_text())
    state["optimizer"] = crafted
    text = json.dumps(state)
    if crafted == "DEEP":
        text = text.replace('"DEEP"', "[" * 50000 + "]" * 50000)
    (newest / "state.json").write_text(text)
    before = set(sys.modules)
    with pytest.raises(LostLMError) as info:
        ckpt_io.verify(newest)
    assert "\n" not in str(info.value) and str(newest) in str(info.value)
    assert ckpt_io.find_checkpoint(tmp_path / "run") == older  # falls back, with a warning naming it
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning:") and newest.name in warning[0]
    assert set(sys.modules) - before == set() and marker.read_text() == "keep" and newest.is_dir()


def test_galore_projector_round_trip_is_exact_and_explicit():
    from galore_torch.galore_projector import GaLoreProjector

    proj = GaLoreProjector(3, update_proj_gap=7, scale=0.5, proj_type="std")
    proj.ortho_matrix = torch.randn(6, 6)[:, :3].t()  # a transposed slice: its layout must survive
    tensors = {}
    data = statecodec.encode({"state": {0: {"projector": proj, "step": 4}}}, tensors, "opt")
    json.dumps(data)  # data only
    back = statecodec.decode(json.loads(json.dumps(data)), tensors)["state"][0]["projector"]
    assert type(back) is GaLoreProjector and back is not proj
    assert (back.rank, back.update_proj_gap, back.scale, back.proj_type, back.verbose) == (3, 7, 0.5, "std", False)
    assert torch.equal(back.ortho_matrix, proj.ortho_matrix) and back.ortho_matrix.stride() == proj.ortho_matrix.stride()
    with pytest.raises(LostLMError, match="cannot checkpoint optimizer state of type"):
        statecodec.encode({"x": object()}, {}, "opt")


# -- integrity and durable saves ----------------------------------------------------------

def test_flipped_bit_falls_back_to_the_previous_checkpoint_and_keeps_the_bad_one(tmp_path, capsys):
    older, newest = make_checkpoints(tmp_path / "run")
    state = json.loads((newest / "state.json").read_text())
    model_file = newest / ckpt_io.MODEL_FILE
    assert state["files"][ckpt_io.MODEL_FILE] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    data = bytearray(model_file.read_bytes())
    data[-3] ^= 0x01
    model_file.write_bytes(bytes(data))
    assert ckpt_io.find_checkpoint(tmp_path / "run") == older
    err = capsys.readouterr().err
    assert "model.safetensors does not match its recorded sha256" in err and newest.name in err and model_file.is_file()
    with pytest.raises(LostLMError, match="sha256"):
        ckpt_io.find_checkpoint(newest)  # an explicit checkpoint folder: no silent fallback


def test_failed_save_keeps_the_previous_checkpoint_and_cleans_up(tmp_path, monkeypatch):
    (older,) = make_checkpoints(tmp_path / "run", steps=(1,))

    def full_disk(tensors, path, metadata=None):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt_io, "save_file", full_disk)
    with pytest.raises(LostLMError, match=r"could not save checkpoint step 2 .*No space left.*previous checkpoint is kept"):
        make_checkpoints(tmp_path / "run", steps=(2,))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", older.name]
    assert ckpt_io.find_checkpoint(tmp_path / "run") == older


def test_non_finite_state_is_never_written(tmp_path):
    (older,) = make_checkpoints(tmp_path / "run", steps=(1,))
    bad = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(LostLMError, match="tensor w is not finite"):
        ckpt_io.save_checkpoint(tmp_path / "run", 2, bad, {}, {}, keep=1)
    with pytest.raises(LostLMError, match="tensor opt.0 is not finite"):
        ckpt_io.save_checkpoint(tmp_path / "run", 2, small_state(), [torch.tensor(float("inf"))], {}, keep=1)
    assert ckpt_io.find_checkpoint(tmp_path / "run") == older and len(list((tmp_path / "run" / "checkpoints").iterdir())) == 2


def test_metrics_stay_strict_json_and_a_partial_line_is_repaired(tmp_path, capsys):
    rundir.append_metrics(tmp_path, {"step": 1, "loss": float("nan"), "grad_norm": float("inf")})
    rundir.append_metrics(tmp_path, {"step": 2, "loss": 1.5})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')  # a crash in the middle of a write
    rundir.trim_metrics(tmp_path, 5)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": None, "grad_norm": None}, {"step": 2, "loss": 1.5}]
    assert "line 3 is damaged" in capsys.readouterr().err


# -- one writer ---------------------------------------------------------------------------

def test_second_writer_is_refused_naming_the_holder_and_a_dead_holder_does_not_block(tmp_path):
    first = RunLock(tmp_path / "run").acquire()
    with pytest.raises(LostLMError, match=f"in use by another trainer \\(pid {os.getpid()}\\)"):
        RunLock(tmp_path / "run").acquire()
    first.release()
    RunLock(tmp_path / "run").acquire().release()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, 'src');"
                               "from lostlm.runlock import RunLock; lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True);"
                               "time.sleep(60)", str(tmp_path / "run")], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LostLMError, match=f"pid {holder.pid}"):
        RunLock(tmp_path / "run").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run" / ".lock").is_file()
    RunLock(tmp_path / "run").acquire().release()  # the file stays, the lock went with the process


# -- config ranges and resume keys --------------------------------------------------------

@pytest.mark.parametrize("override", [
    "train.threads=0", "model.init_std=0", "model.init_std=-0.02", "train.beta1=1.0", "train.beta2=-0.1",
    "model.norm_eps=-1e-6", "model.norm_eps=0", "model.rope_theta=0", "train.lr=.nan", "train.lr=.inf",
    "train.out_dir=''", "train.max_bad_steps=-1", "model.max_seq_len=16",
])
def test_out_of_range_values_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(LostLMError, match=key.replace(".", r"\.")):
        load_config(None, ["data.seq_len=32", override])


def test_resume_keys_that_change_numbers_are_refused(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, [f"train.out_dir={run}", "train.steps=100", "train.warmup_steps=10"])
    rundir.save_config(cfg, run / "config.yaml") if run.mkdir() is None else None
    for override in ("train.threads=1", "train.device=cpu", "train.compile=true"):
        with pytest.raises(LostLMError, match="different config"):
            rundir.check_config(run, load_config(None, [f"train.out_dir={run}", "train.steps=100", "train.warmup_steps=10", override]), 5)
    longer = load_config(None, [f"train.out_dir={run}", "train.steps=200", "train.warmup_steps=10"])
    rundir.check_config(run, longer, 5)  # warmup steps only so far: the schedule is the same
    with pytest.raises(LostLMError, match="train.steps: 100 -> 200"):
        rundir.check_config(run, longer, 50)  # the cosine of steps 10..49 would differ


# -- the trainer: non-finite steps and signals ------------------------------------------

def test_non_finite_steps_are_skipped_then_stop_keeping_the_last_good_checkpoint(tiny_run, tmp_path, monkeypatch, capsys):
    from lostlm.model import LlamaLM

    real_hidden = LlamaLM.hidden_states  # both loss paths (chunked and plain) start from these
    poisoned = {"from": 2}

    def hidden_states(self, *args, **kwargs):
        out = real_hidden(self, *args, **kwargs)
        return out * float("nan") if self.training and trainer.step >= poisoned["from"] else out
    monkeypatch.setattr(LlamaLM, "hidden_states", hidden_states)
    trainer = Trainer(load_config(None, tiny_run("nan", train__checkpoint_every=1, train__max_bad_steps=1)))
    with pytest.raises(LostLMError, match=r"non-finite loss nan.* 2 steps in a row up to step 4 .*stopped without saving.*step_00000003"):
        trainer.train()
    run = tmp_path / "nan"
    assert ckpt_io.find_checkpoint(run).name == "step_00000003"
    w2 = load_file(str(run / "checkpoints" / "step_00000002" / "model.safetensors"))
    w3 = load_file(str(run / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # the skipped step changed no weight
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r.get("skipped")]
    assert [r["step"] for r in skipped] == [3] and skipped[0]["loss"] is None
    assert records[-1]["step"] == 3  # the step that stopped the run logged nothing

    # lostlm eval of a checkpoint whose weights are not finite (checksums intact): exit 2, JSON null
    monkeypatch.setattr(LlamaLM, "hidden_states", real_hidden)
    ckpt = run / "checkpoints" / "step_00000003"
    weights = {k: v * float("nan") if v.is_floating_point() else v for k, v in w3.items()}
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    state = json.loads((ckpt / "state.json").read_text())
    state["files"]["model.safetensors"] = ckpt_io.sha256_file(ckpt / "model.safetensors")
    (ckpt / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["eval", str(ckpt)]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["val_loss"] is None and err.strip().splitlines()[-1].startswith("error: the validation loss")


def test_sigterm_during_evaluation_saves_after_it_and_resume_is_exact(tiny_run, tmp_path, monkeypatch):
    Trainer(load_config(None, tiny_run("straight"))).train()
    handler_before = signal.getsignal(signal.SIGTERM)
    real_evaluate = Trainer.evaluate

    def evaluate_with_signal(self):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the first evaluation (step 3) runs
        return real_evaluate(self)
    monkeypatch.setattr(Trainer, "evaluate", evaluate_with_signal)
    with pytest.raises(LostLMError, match=r"interrupted at step 3 \(SIGTERM\); saved"):
        Trainer(load_config(None, tiny_run("resumed"))).train()
    monkeypatch.setattr(Trainer, "evaluate", real_evaluate)
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the trainer's handler is gone again
    resumed = Trainer(load_config(None, tiny_run("resumed")))
    assert resumed.step == 3
    resumed.train()
    drop = ("time", "tok_per_s")
    metrics = [[{k: v for k, v in json.loads(line).items() if k not in drop} for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("straight", "resumed")]
    assert metrics[0] == metrics[1] and any("val_loss" in r and r["step"] == 3 for r in metrics[1])
    a, b = (load_file(str(ckpt_io.latest_checkpoint(tmp_path / n) / "model.safetensors")) for n in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_moved_to_a_machine_where_auto_means_another_precision_is_refused(tiny_run, tmp_path, monkeypatch):
    """``train.precision: auto`` trains fp32 on a CPU without native bf16 and bf16 on one with it:
    the checkpoint records what it trained in, and a resume that would switch is refused with
    the setting that continues it exactly; that setting resumes even though its text differs."""
    monkeypatch.setattr("lostlm.runtime.cpu_supports_bf16", lambda: False)
    Trainer(load_config(None, tiny_run("moved", train__precision="auto", train__steps=3))).train()
    ckpt = ckpt_io.find_checkpoint(tmp_path / "moved")
    assert ckpt_io.read_state(ckpt)["precision"] == "float32"

    monkeypatch.setattr("lostlm.runtime.cpu_supports_bf16", lambda: True)  # the same folder, another machine
    with pytest.raises(LostLMError, match=r"trained in 'float32', but train.precision=auto trains in bfloat16 here; "
                                          r"set train.precision=fp32 to continue it exactly"):
        Trainer(load_config(None, tiny_run("moved", train__precision="auto", train__steps=3)))
    resumed = Trainer(load_config(None, tiny_run("moved", train__precision="fp32", train__steps=3)))
    assert resumed.step == 3 and resumed.amp_dtype is None
    resumed.close()
    # the folder's config now says fp32; without a recorded precision (older checkpoints) the text decides
    with pytest.raises(LostLMError, match="train.precision: 'fp32' -> 'auto'"):
        rundir.check_config(tmp_path / "moved", load_config(None, tiny_run("moved", train__precision="auto", train__steps=3)), 3)


def test_a_config_saved_before_a_key_existed_resumes_at_that_keys_default():
    """A run folder written by an older lostlm lacks newer keys (e.g. layer.lost_pad_to): they
    count as their default, while a non-default value is still a difference."""
    from lostlm.configs import load_config
    from lostlm.rundir import significant_differences

    saved = load_config(None, []).to_dict()
    del saved["layer"]["lost_pad_to"]
    assert significant_differences(saved, load_config(None, []).to_dict()) == []
    assert significant_differences(saved, load_config(None, ["layer.lost_pad_to=64"]).to_dict()) == [
        "layer.lost_pad_to: 0 -> 64"]

"""Fault-injection sweep of the trainer through the real CLI (long; resumable).

    PYTHONPATH=src python bench/fault_sweep.py                 # everything, appends to the results
    PYTHONPATH=src python bench/fault_sweep.py --only signals  # one group: signals, state, nan, disk, lock, inputs
    PYTHONPATH=src python bench/fault_sweep.py --only signals --results bench/results/fault-sweep-rerun
                                                               # rerun every trial on today's code, beside the record

Every trial runs ``python -m lostlm``-equivalent children (this file with ``--child``, which calls
``lostlm.cli.main``) on a tiny model and a generated corpus, and records one JSON line in
``bench/results/fault-sweep/trials.jsonl``; a trial already recorded is skipped, so an
interrupted sweep continues where it stopped. ``counts.json`` is rewritten at the end.

Faults are injected by the child from the ``LOSTLM_SWEEP_FAULT`` environment variable, read
only here (no production code reads it): a signal sent to itself in the middle of a checkpoint
write (after the model file, before the rename) or of an evaluation, NaN logits from the model
forward from a given step, ENOSPC from the safetensors writer. Timed faults come from outside:
a signal after a random delay.

Groups and what "pass" means:
  signals  SIGKILL/SIGTERM/SIGINT x 10 moments (5 random + 3 mid-save + 2 mid-eval); after the
           fault the same command runs to the end (random moments: the first run's steps are
           paced, +PACE_S each, and the moment is drawn inside the paced loop, so a fast machine
           cannot finish before the signal); final weights bit-identical to the
           uninterrupted reference, metrics equal (no duplicates, timing fields ignored)
  state    crafted state.json files: exit 2 with one error line, marker file untouched, no
           module named in the file imported
  nan      NaN logits from step k (persistent and one-off): the latest checkpoint verifies, is
           finite, and is the last good one
  disk     ENOSPC in a save (simulated in-process; a 1 MiB tmpfs when mount works): one error
           line, previous checkpoint verifies, no .tmp folder, then resume is exact
  lock     a second trainer on a running folder is refused naming the pid; the first is exact
  inputs   >= 60 malformed configs, flags, data and run-folder files: 0 tracebacks, 0 silent
           acceptances
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "fault-sweep"
WORK = Path(os.environ.get("SWEEP_WORK", "/tmp/lostlm-fault-sweep"))
IGNORED = ("time", "tok_per_s", "mfu", "per_s")
PACE_S = 0.5  # seconds added to each step of a run that gets a signal at a random moment


# -- the child: the real CLI plus an optional fault ------------------------------------------

def child(argv: list[str]) -> int:
    sys.path.insert(0, os.getcwd())  # as `python -m lostlm` does: files beside the run would be importable
    # A child started from a background job inherits SIGINT as ignored (POSIX), so Ctrl-C trials
    # would test nothing before the trainer installs its handler: start as a terminal would.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    fault = json.loads(os.environ.get("LOSTLM_SWEEP_FAULT", "{}"))
    kind = fault.get("kind")
    sig = getattr(signal, fault.get("signal", "SIGTERM"))
    from lostlm import checkpoint, cli, model, train

    if kind == "save":  # signal after the model file of the n-th save is written
        real, calls = checkpoint.save_file, {"n": 0}

        def save_file(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            if path.endswith("model.safetensors"):
                calls["n"] += 1
                if calls["n"] == fault["n"]:
                    os.kill(os.getpid(), sig)
                    time.sleep(0.05)
        checkpoint.save_file = save_file
    elif kind == "slow":  # each training step takes `seconds` longer (keeps a run alive for the lock trial)
        real_slow_step = train.Trainer.train_step

        def slow_step(self, batch):
            time.sleep(fault["seconds"])
            return real_slow_step(self, batch)
        train.Trainer.train_step = slow_step
    elif kind == "eval":  # signal as the n-th evaluation starts
        real_eval, calls = train.Trainer.evaluate, {"n": 0}

        def evaluate(self):
            calls["n"] += 1
            if calls["n"] == fault["n"]:
                os.kill(os.getpid(), sig)
                time.sleep(0.05)
            return real_eval(self)
        train.Trainer.evaluate = evaluate
    elif kind == "nan":  # NaN logits in training steps [start, stop)
        real_step = train.Trainer.train_step

        def train_step(self, batch):
            poisoned = fault["start"] <= self.step < fault.get("stop", 10**9)
            original = model.LlamaLM.hidden_states  # feeds both loss paths (chunked and plain)
            if poisoned:
                model.LlamaLM.hidden_states = lambda m, *a, **k: original(m, *a, **k) * float("nan")
            try:
                return real_step(self, batch)
            finally:
                model.LlamaLM.hidden_states = original
        train.Trainer.train_step = train_step
    elif kind == "enospc":  # the n-th save fails with a full disk
        real, calls = checkpoint.save_file, {"n": 0}

        def save_file(tensors, path, metadata=None):
            if path.endswith("optimizer.safetensors"):
                calls["n"] += 1
                if calls["n"] == fault["n"]:
                    raise OSError(28, "No space left on device")
            real(tensors, path, metadata=metadata)
        checkpoint.save_file = save_file
    if argv[:1] == ["--batch"]:
        return child_batch(argv[1])
    return cli.main(argv)


# -- helpers --------------------------------------------------------------------------------

def run_child(args: list[str], fault: dict | None = None, timeout: float = 600, kill_after: float | None = None,
              kill_signal: int = signal.SIGKILL, after_first_metrics: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "LOSTLM_SWEEP_FAULT": json.dumps(fault or {})}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    if kill_after is not None:
        if after_first_metrics is not None:  # start the clock when training has begun
            while proc.poll() is None and not (after_first_metrics / "metrics.jsonl").is_file():
                time.sleep(0.05)
        try:
            out, err = proc.communicate(timeout=kill_after)
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            proc.send_signal(kill_signal)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def fresh_folder(rec: "Recorder", trial: str) -> Path | None:
    """``trial``'s work folder, emptied; None when the trial is already recorded (skipped)."""
    if rec.skip(trial):
        return None
    out = WORK / trial
    shutil.rmtree(out, ignore_errors=True)
    return out


def tiny_args(out: Path, corpus: Path, **extra) -> list[str]:
    values = {"data.source": "files", "data.paths": f"[{corpus}]", "data.cache_dir": str(WORK / "cache"),
              "data.bpe_vocab_size": 400, "data.seq_len": 32, "data.val_tokens": 8192, "data.val_fraction": 0.1,
              "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_heads": 4, "model.num_layers": 2,
              "layer.rank": 8, "layer.density": 0.1, "train.batch_size": 8, "train.steps": 12, "train.lr": 3e-3,
              "train.warmup_steps": 2, "train.precision": "fp32", "train.progress": False, "train.peak_flops": 1e9,
              "train.eval_every": 3, "train.log_every": 1, "train.checkpoint_every": 3, "train.threads": 1,
              "train.out_dir": str(out)}
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return ["train", *[f"{k}={v}" for k, v in values.items()]]


def clean_error(proc: subprocess.CompletedProcess) -> bool:
    """Exit status != 0, no traceback, and one final ``error: ...`` line (or argparse's usage error)."""
    lines = proc.stderr.strip().splitlines()
    if proc.returncode == 0 or "Traceback" in proc.stderr or not lines:
        return False
    if lines[-1].startswith("lostlm") and ": error: " in lines[-1]:  # argparse: usage line + error line
        return True
    return lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [{k: v for k, v in json.loads(line).items() if not any(i in k for i in IGNORED)}
            for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def same_run(a: Path, b: Path) -> tuple[bool, str]:
    from safetensors.torch import load_file
    from lostlm.checkpoint import find_checkpoint

    ca, cb = find_checkpoint(a), find_checkpoint(b)
    if ca is None or cb is None or ca.name != cb.name:
        return False, f"checkpoints {ca} vs {cb}"
    ta, tb = load_file(str(ca / "model.safetensors")), load_file(str(cb / "model.safetensors"))
    if ta.keys() != tb.keys() or not all(ta[k].equal(tb[k]) for k in ta):
        return False, "model tensors differ"
    ma, mb = metrics(a), metrics(b)
    if ma != mb:
        return False, f"metrics differ ({len(ma)} vs {len(mb)} records)"
    return True, "identical"


class Recorder:
    def __init__(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.path = RESULTS / "trials.jsonl"
        self.done = {json.loads(line)["id"] for line in self.path.read_text().splitlines() if line.strip()} \
            if self.path.is_file() else set()

    def skip(self, trial_id: str) -> bool:
        return trial_id in self.done

    def add(self, trial_id: str, group: str, ok: bool, **info) -> None:
        record = {"id": trial_id, "group": group, "ok": ok, **info}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.done.add(trial_id)
        print(("PASS " if ok else "FAIL ") + json.dumps(record)[:300], flush=True)


def setup() -> tuple[Path, Path, float]:
    """Corpus, cache and the uninterrupted reference run (its wall time sets the random moments)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import generate_documents

    WORK.mkdir(parents=True, exist_ok=True)
    corpus = WORK / "docs.jsonl"
    if not corpus.is_file():
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in generate_documents(200)))
    ref = WORK / "ref"
    start = time.time()
    if not (ref / "summary.json").is_file():
        shutil.rmtree(ref, ignore_errors=True)
        proc = run_child(tiny_args(ref, corpus))
        if proc.returncode != 0:
            sys.exit(f"reference run failed: {proc.stderr[-2000:]}")
    duration = json.loads((RESULTS / "reference.json").read_text())["wall_s"] if (RESULTS / "reference.json").is_file() \
        else time.time() - start
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reference.json").write_text(json.dumps({"wall_s": duration}))
    return corpus, ref, duration


# -- groups ---------------------------------------------------------------------------------

def group_signals(rec: Recorder, corpus: Path, ref: Path, duration: float) -> None:
    rng = random.Random(0)
    for name in ("SIGKILL", "SIGTERM", "SIGINT"):
        # random moments inside the training loop: counted from the first metrics line
        steps = int(dict(a.split("=", 1) for a in tiny_args(ref, corpus)[1:])["train.steps"])
        plans = [("random", {"delay": round(rng.uniform(0.0, 1.0) * steps * PACE_S, 2)}) for _ in range(5)]
        plans += [("save", {"n": n}) for n in (1, 2, 3)] + [("eval", {"n": n}) for n in (2, 3)]
        for i, (kind, plan) in enumerate(plans):
            trial = f"signals-{name}-{i}-{kind}"
            out = fresh_folder(rec, trial)
            if out is None:
                continue
            args = tiny_args(out, corpus)
            if kind == "random":
                first = run_child(args, {"kind": "slow", "seconds": PACE_S}, kill_after=plan["delay"],
                                  kill_signal=getattr(signal, name), after_first_metrics=out)
            else:
                first = run_child(args, {"kind": kind, "n": plan["n"], "signal": name})
            finished = first.returncode == 0
            # SIGTERM before the loop installs its handler (start-up) ends the process (-15): nothing to save yet
            stopped_ok = first.returncode == -9 if name == "SIGKILL" else (finished or clean_error(first) or first.returncode == -15)
            second = run_child(args)
            ok, why = same_run(out, ref) if second.returncode == 0 else (False, second.stderr[-400:])
            rec.add(trial, "signals", ok and stopped_ok and "Traceback" not in first.stderr, signal=name, kind=kind, **plan,
                    first_rc=first.returncode, finished_before_fault=finished, first_err=first.stderr.strip()[-200:],
                    result=why)
            shutil.rmtree(out, ignore_errors=True)


CRAFTED = {  # state.json "optimizer" entries that must never import or build anything
    "object-tag": {"__object__": "sweep_evil:Thing", "attrs": {"__dict__": []}},
    "object-in-dict": {"__dict__": [["state", {"__dict__": [[0, {"__object__": "this:x", "attrs": []}]]}]]},
    "unknown-tag": {"__class__": "os.system", "args": ["touch pwned"]},
    "module-path-string-tag": {"__tensor__": "sweep_evil:Thing"},
    "deep-nesting": "DEEP",
    "wrong-type-key": {"__dict__": [[[1, 2], 3]]},
    "projector-extra-field": {"__galore_projector__": {"rank": 4, "verbose": False, "update_proj_gap": 2, "scale": 0.25,
                                                       "proj_type": "std", "ortho_matrix": None, "__module__": "sweep_evil"}},
    "projector-wrong-type": {"__galore_projector__": {"rank": "sweep_evil", "verbose": False, "update_proj_gap": 2,
                                                      "scale": 0.25, "proj_type": "std", "ortho_matrix": None}},
    "huge-stride": {"__dict__": [["x", {"__tensor__": "rng.cpu", "stride": [10**15]}]]},
}
STATE_EDITS = {"missing-step": lambda s: s.pop("step"), "missing-optimizer": lambda s: s.pop("optimizer"),
               "missing-data": lambda s: s.pop("data"), "step-string": lambda s: s.update(step="12"),
               "data-wrong-type": lambda s: s.update(data=[1, 2]),
               "spikes-damaged": lambda s: s.update(loss_spikes={"recent_grad_norms": ["x"]})}
RESUME_EDITS = {"missing-data": "'data'", "data-wrong-type": "'data'", "spikes-damaged": "loss_spikes"}
"""Edits that only a resume reads (evaluation does not): the one-line error must name this."""


def group_state(rec: Recorder, corpus: Path, ref: Path) -> None:
    """Crafted newest checkpoint: refused with a warning naming it, resume falls back and ends exact."""
    cases = [("optimizer", k) for k in CRAFTED] + [("edit", k) for k in STATE_EDITS] + [("raw", "not-json"), ("raw", "array")]
    for how, key in cases:
        trial = f"state-{key}"
        out = fresh_folder(rec, trial)
        if out is None:
            continue
        shutil.copytree(ref, out)
        marker = WORK / f"marker-{key}"
        marker.write_text("keep me")
        (out / "sweep_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).unlink()\nclass Thing: pass\n")
        ckpt = out / "checkpoints" / "step_00000012"
        state = json.loads((ckpt / "state.json").read_text())
        if how == "optimizer":
            state["optimizer"] = CRAFTED[key]
            text = json.dumps(state) if key != "deep-nesting" else json.dumps(state).replace('"DEEP"', "[" * 100000 + "]" * 100000)
        elif how == "edit":
            STATE_EDITS[key](state)
            text = json.dumps(state)
        else:
            text = "{not json" if key == "not-json" else "[1, 2]"
        (ckpt / "state.json").write_text(text)
        if key in RESUME_EDITS:
            proc = run_child(tiny_args(out, corpus))
            rec.add(trial, "state", clean_error(proc) and RESUME_EDITS[key] in proc.stderr and marker.is_file(),
                    rc=proc.returncode, err=proc.stderr.strip()[-300:])
            shutil.rmtree(out, ignore_errors=True)
            continue
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "eval", str(out)], cwd=out,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src"),
                                                                   "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        warned = any(line.startswith("warning:") and "step_00000012" in line for line in proc.stderr.splitlines())
        evaluated = proc.returncode == 0 and json.loads(proc.stdout)["step"] == 9  # fell back to the previous one
        ok = marker.is_file() and "Zen of Python" not in proc.stdout and "Traceback" not in proc.stderr and warned and evaluated
        rec.add(trial, "state", ok, marker_kept=marker.is_file(), warned=warned, rc=proc.returncode,
                err=proc.stderr.strip()[-300:])
        shutil.rmtree(out, ignore_errors=True)


def group_nan(rec: Recorder, corpus: Path, ref: Path) -> None:
    from lostlm.checkpoint import find_checkpoint, non_finite_tensor
    from safetensors.torch import load_file

    for start, stop in ((0, None), (1, None), (4, None), (7, None), (10, None), (5, 6), (2, 4)):
        trial = f"nan-{start}-{stop}"
        out = fresh_folder(rec, trial)
        if out is None:
            continue
        proc = run_child(tiny_args(out, corpus), {"kind": "nan", "start": start, **({"stop": stop} if stop else {})})
        latest = find_checkpoint(out)
        finite = latest is not None and non_finite_tensor(load_file(str(latest / "model.safetensors"))) is None
        if stop is None and start + 4 <= 12:  # persistent: stops at the 4th bad step (max_bad_steps=3)
            expected = (start + 3) // 3 * 3  # skipped steps keep good weights, so their checkpoints are good
            ok = clean_error(proc) and "non-finite" in proc.stderr and finite and latest is not None \
                and int(latest.name[5:]) == expected
        elif stop is None:  # too few bad steps before the end: the run completes
            ok = proc.returncode == 0 and finite and latest.name == "step_00000012"
        else:  # one-off: the bad steps are skipped and the run completes
            ok = proc.returncode == 0 and finite and latest.name == "step_00000012" and \
                sum(1 for r in metrics(out) if r.get("skipped")) == stop - start
        rec.add(trial, "nan", bool(ok), rc=proc.returncode, latest=latest.name if latest else None, finite=finite,
                err=proc.stderr.strip()[-250:])
        shutil.rmtree(out, ignore_errors=True)


def group_disk(rec: Recorder, corpus: Path, ref: Path) -> None:
    from lostlm.checkpoint import find_checkpoint

    for n in (2, 3, 4):
        trial = f"disk-enospc-save{n}"
        out = fresh_folder(rec, trial)
        if out is None:
            continue
        args = tiny_args(out, corpus)
        proc = run_child(args, {"kind": "enospc", "n": n})
        latest = find_checkpoint(out)
        tmp_left = [p.name for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
        first_ok = clean_error(proc) and "could not save" in proc.stderr and latest is not None \
            and latest.name == f"step_{3 * (n - 1):08d}" and not tmp_left
        second = run_child(args)
        ok, why = same_run(out, ref) if second.returncode == 0 else (False, second.stderr[-300:])
        rec.add(trial, "disk", first_ok and ok, rc=proc.returncode, latest=latest.name if latest else None,
                tmp_left=tmp_left, result=why, err=proc.stderr.strip()[-200:])
        shutil.rmtree(out, ignore_errors=True)
    trial = "disk-tmpfs-1MiB"
    if rec.skip(trial):
        return
    mount = WORK / "tmpfs"
    mount.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        rec.add(trial, "disk", True, skipped="mount not permitted here")
        return
    try:
        out = mount / "run"
        proc = run_child(tiny_args(out, corpus, train__keep_checkpoints=3))
        latest = find_checkpoint(out) if (out / "checkpoints").is_dir() else None
        tmp_left = [p.name for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")] if latest else []
        ok = (proc.returncode == 0 or clean_error(proc)) and not tmp_left
        rec.add(trial, "disk", ok, rc=proc.returncode, latest=latest.name if latest else None, err=proc.stderr.strip()[-200:])
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def group_lock(rec: Recorder, corpus: Path, ref: Path) -> None:
    for i in range(3):
        trial = f"lock-second-writer-{i}"
        out = fresh_folder(rec, trial)
        if out is None:
            continue
        args = tiny_args(out, corpus)
        # The first trainer is slowed (3 s a step) so that it still holds the folder when the second,
        # which pays the whole start-up first, reaches the lock; without that the tiny run could end first.
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "LOSTLM_SWEEP_FAULT": json.dumps({"kind": "slow", "seconds": 3.0})}
        first = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "metrics.jsonl").is_file():
            time.sleep(0.1)
        time.sleep(0.5 * i)
        second = run_child(args)
        first_alive = first.poll() is None  # the trial means something only while the first still runs
        out1, err1 = first.communicate(timeout=1200)
        refused = first_alive and clean_error(second) and f"pid {first.pid}" in second.stderr
        ok, why = same_run(out, ref) if first.returncode == 0 else (False, err1[-300:])
        rec.add(trial, "lock", refused and ok, first_alive=first_alive, second_err=second.stderr.strip()[-200:], result=why)
        shutil.rmtree(out, ignore_errors=True)


def input_cases(corpus: Path, ref: Path) -> list[tuple[str, list[str], str]]:
    """(id, argv, expectation): 'error' = exit != 0 with one error line; 'warn' = repaired with a warning."""
    W = WORK / "inputs"
    W.mkdir(parents=True, exist_ok=True)
    base = lambda name, **kw: tiny_args(W / name, corpus, **kw)  # noqa: E731
    bad_values = {
        "model.preset": "huge", "model.hidden_size": -8, "model.num_heads": 0, "model.init_std": 0,
        "model.init_std=-1": None, "model.norm_eps": -1e-6, "model.rope_theta": 0, "model.max_seq_len": 16,
        "model.tie_embeddings": "maybe", "layer.method": "magic", "layer.rank": 0, "layer.density": 1.5,
        "layer.targets": "[]", "data.source": "ftp", "data.seq_len": 1, "data.val_fraction": 1.0, "train.steps": 0,
        "train.micro_batch_size": 3, "train.lr": ".nan", "train.lr=inf": None, "train.beta1": 1.0,
        "train.beta2": -0.5, "train.threads": 0, "train.threads=100000": None, "train.warmup_steps": 99,
        "train.device": "tpu", "train.resume": "sometimes", "train.max_bad_steps": -1, "reweight.strategy": "magic",
        "train.lrr": 1, "train.steps=many": None, "model.hidden_size=[1,2]": None, "nosection": None,
        "train.out_dir": "''",
    }
    cases = []
    for key, value in bad_values.items():
        override = key if value is None else f"{key}={value}"
        cases.append((f"value-{override}", base("v", **{}) + [override], "error"))
    cases += [
        ("flag-out-empty", base("v") + ["--out", ""], "error"),
        ("flag-steps-word", base("v") + ["--steps", "ten"], "error"),
        ("flag-method-bad", base("v") + ["--method", "nope"], "error"),
        ("flag-unknown", base("v") + ["--frobnicate"], "error"),
        ("cmd-unknown", ["trian"], "error"),
        ("eval-missing", ["eval", str(W / "missing")], "error"),
        ("eval-empty-folder", ["eval", str(W)], "error"),
    ]
    files = {
        "bad.yaml": "train: [unclosed", "list.yaml": "- 1\n- 2\n", "bad.toml": "[train\nlr=", "wrongsec.yaml": "train: 3\n",
        "config.txt": "train: {}\n", "unknown.yaml": "trainn: {lr: 1}\n", "binary.yaml": "\x00\x01\x02",
    }
    for name, text in files.items():
        (W / name).write_text(text)
        cases.append((f"file-{name}", ["train", str(W / name)] + base("v")[1:], "error"))
    data = {"empty.txt": "", "spaces.txt": "   \n\n  ", "bad.jsonl": "{not json\n", "nofield.jsonl": '{"body": "x"}\n',
            "binary.parquet": "PAR1garbage"}
    for name, text in data.items():
        (W / name).write_text(text)
        cases.append((f"data-{name}", tiny_args(W / f"d-{name}", W / name), "error"))
    afile = W / "a-file"
    afile.write_text("x")
    cases += [("outdir-is-file", base("v", train__out_dir=afile), "error"),
              ("outdir-under-file", base("v", train__out_dir=afile / "sub"), "error"),
              ("outdir-unwritable", base("v", train__out_dir="/proc/lostlm-run"), "error"),
              ("outdir-whitespace", base("v", train__out_dir="'  '"), "error")]
    # run-folder files: copies of the reference run, damaged
    def damaged(name: str, edit) -> Path:
        out = W / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(ref, out)
        edit(out)
        return out
    ck = lambda out, step=12: out / "checkpoints" / f"step_{step:08d}"  # noqa: E731

    def flip(path: Path, at: int = -100) -> None:
        data = bytearray(path.read_bytes())
        data[at] ^= 0x01
        path.write_bytes(bytes(data))

    def all_damaged(out: Path) -> None:
        for step in (9, 12):
            flip(ck(out, step) / "model.safetensors")
    runs = {
        "metrics-partial-line": (lambda o: open(o / "metrics.jsonl", "a").write('{"step": 13, "lo'), "warn-train"),
        "metrics-garbage-line": (lambda o: open(o / "metrics.jsonl", "a").write("garbage\n"), "warn-train"),
        "bitflip-model": (lambda o: flip(ck(o) / "model.safetensors"), "warn"),
        "bitflip-optimizer": (lambda o: flip(ck(o) / "optimizer.safetensors"), "warn"),
        "truncated-model": (lambda o: (ck(o) / "model.safetensors").write_bytes((ck(o) / "model.safetensors").read_bytes()[:500]), "warn"),
        "missing-model": (lambda o: (ck(o) / "model.safetensors").unlink(), "warn"),
        "empty-state": (lambda o: (ck(o) / "state.json").write_text(""), "warn"),
        "latest-points-nowhere": (lambda o: (o / "checkpoints" / "latest").write_text("step_99999999\n"), "ok"),
        "all-checkpoints-damaged": (all_damaged, "error"),
        "config-yaml-garbage": (lambda o: (o / "config.yaml").write_text("model: [\n"), "error"),
        "config-yaml-other-run": (lambda o: (o / "config.yaml").write_text((o / "config.yaml").read_text().replace("hidden_size: 32", "hidden_size: 64")), "error-train"),
        "tokenizer-missing": (lambda o: shutil.rmtree(o / "tokenizer"), "error"),
    }
    for name, (edit, expect) in runs.items():
        out = damaged(name, edit)
        if expect.endswith("-train"):
            cases.append((f"run-{name}", tiny_args(out, corpus), expect[:-6]))
        else:
            cases.append((f"run-{name}", ["eval", str(out)], expect))
    # a checkpoint whose weights are NaN but whose checksums are right: eval must fail, not print NaN with status 0
    def nan_weights(out: Path) -> None:
        import hashlib
        from safetensors.torch import load_file, save_file
        path = ck(out) / "model.safetensors"
        tensors = load_file(str(path))
        tensors = {k: v * float("nan") if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(tensors, str(path), metadata={"format": "pt"})
        state = json.loads((ck(out) / "state.json").read_text())
        state["files"]["model.safetensors"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (ck(out) / "state.json").write_text(json.dumps(state))
    cases.append(("run-nan-weights-eval", ["eval", str(damaged("nan-weights", nan_weights))], "error"))
    return cases


def child_batch(path: str) -> int:
    """Run many argv lists through ``lostlm.cli.main`` in one interpreter (start-up is most of the
    cost of a config error); an exception escaping main() is recorded as a traceback."""
    import contextlib
    import io
    import traceback

    from lostlm import cli

    results = []
    for argv in json.loads(Path(path).read_text()):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli.main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 2
            except BaseException:  # noqa: BLE001 - a traceback is what is being counted
                traceback.print_exc()
                code = 1
        results.append({"rc": code, "stderr": err.getvalue()})
    Path(path).write_text(json.dumps(results))
    return 0


BATCHED = ("value-", "flag-", "file-", "cmd-")


def group_inputs(rec: Recorder, corpus: Path, ref: Path) -> None:
    cases = [c for c in input_cases(corpus, ref) if not rec.skip(f"inputs-{c[0]}")]
    batch = [c for c in cases if c[0].startswith(BATCHED)]
    answers = {}
    if batch:
        listing = WORK / "batch.json"
        listing.write_text(json.dumps([argv for _, argv, _ in batch]))
        done = run_child(["--batch", str(listing)])
        if done.returncode == 0:
            answers = {c[0]: subprocess.CompletedProcess([], r["rc"], "", r["stderr"])
                       for c, r in zip(batch, json.loads(listing.read_text()))}
    for trial_name, argv, expect in cases:
        trial = f"inputs-{trial_name}"
        if rec.skip(trial):
            continue
        proc = answers.get(trial_name) or run_child(argv)
        traceback = "Traceback" in proc.stderr
        warned = any(line.startswith("warning:") for line in proc.stderr.splitlines())
        if expect == "error":
            ok, silent = clean_error(proc) and proc.returncode != 0, proc.returncode == 0
        elif expect == "warn":
            ok, silent = proc.returncode == 0 and warned, not warned
        else:
            ok, silent = proc.returncode == 0, False
        rec.add(trial, "inputs", ok and not traceback, expect=expect, rc=proc.returncode, traceback=traceback,
                silent=silent, err=proc.stderr.strip()[-240:])


GROUPS = {"inputs": group_inputs, "state": group_state, "nan": group_nan, "disk": group_disk, "lock": group_lock,
          "signals": group_signals}


def write_counts() -> dict:
    records = [json.loads(line) for line in (RESULTS / "trials.jsonl").read_text().splitlines() if line.strip()]
    counts: dict = {}
    for r in records:
        g = counts.setdefault(r["group"], {"trials": 0, "passed": 0, "failed": []})
        g["trials"] += 1
        g["passed"] += bool(r["ok"])
        if not r["ok"]:
            g["failed"].append(r["id"])
    inputs = [r for r in records if r["group"] == "inputs"]
    counts["inputs_tracebacks"] = sum(r["traceback"] for r in inputs)
    counts["inputs_silently_accepted"] = sum(r["silent"] for r in inputs)
    sig = [r for r in records if r["group"] == "signals"]
    counts["signals_by_kind"] = {f"{s}/{k}": sum(1 for r in sig if r["signal"] == s and r["kind"] == k and r["ok"])
                                 for s in ("SIGKILL", "SIGTERM", "SIGINT") for k in ("random", "save", "eval")}
    counts["signals_finished_before_fault"] = sum(r["finished_before_fault"] for r in sig)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    counts["machine"] = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
    counts["cpus"] = os.cpu_count()
    (RESULTS / "counts.json").write_text(json.dumps(counts, indent=1) + "\n")
    return counts


def main() -> None:
    global RESULTS
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(GROUPS), action="append")
    parser.add_argument("--counts", action="store_true", help="only rewrite counts.json from trials.jsonl")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder of trials.jsonl and counts.json; a new folder reruns every trial (default: %(default)s)")
    args = parser.parse_args()
    RESULTS = args.results.resolve()
    if args.counts:
        print(json.dumps(write_counts(), indent=1))
        return
    sys.path.insert(0, str(ROOT / "src"))
    corpus, ref, duration = setup()
    rec = Recorder()
    for name in args.only or list(GROUPS):
        if name == "signals":
            GROUPS[name](rec, corpus, ref, duration)
        else:
            GROUPS[name](rec, corpus, ref)
    print(json.dumps(write_counts(), indent=1))


if __name__ == "__main__":
    main()

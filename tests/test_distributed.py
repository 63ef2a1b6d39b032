"""Two processes on CPU (gloo): DDP and FSDP2 give the one-process result, resume is exact.

Every multi-process run here is the real command, ``python -m torch.distributed.run
--nproc_per_node 2 -m lostlm train ...`` (= ``torchrun``), on 127.0.0.1 with a free port, one
thread per process. Reweighting is on (linupper, r = 0.5), so the gather of per-sequence
losses and the choice of each rank's slice by global rank are part of what is compared.

The learning rate is constant after a 2-step warm-up (``train.min_lr_ratio=1``) so that a run
of 3 steps resumed to 6 follows the same schedule as 6 steps straight (the cosine depends
on ``train.steps``); tests/test_train.py covers resume with the real schedule.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import generate_documents, tiny_run_overrides
from lostlm.checkpoint import latest_checkpoint, load_model_state
from lostlm.configs import load_config

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no torch.distributed / gloo")

COMMON = dict(train__steps=6, train__checkpoint_every=3, train__eval_every=3, train__warmup_steps=2,
              train__min_lr_ratio=1.0, reweight__strategy="linupper", reweight__temperature=0.5)
TOLERANCE = 1e-5  # fp32; the reductions add the same numbers in a different order


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (torch >= 2.6)
    except ImportError:
        return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo on the loopback interface
    return env


def torchrun(overrides: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "lostlm", "train", *overrides, "train.threads=1"]
    result = subprocess.run(cmd, env=process_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def log_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_records(run_dir: Path) -> dict[int, dict]:
    records = [r for r in log_lines(run_dir) if "loss" in r]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"{run_dir}: a step was logged twice (did two ranks write?): {steps}"
    return {r["step"]: r for r in records}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model_state(latest_checkpoint(run_dir))


def assert_same_run(run: Path, reference: Path, exact: bool = False) -> None:
    got, want = step_records(run), step_records(reference)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        # grad_norm (before clipping) catches a wrong loss scale (× world size), which AdamW and
        # clipping would otherwise hide from the losses and weights
        for key in ("loss", "grad_norm", "weight_max_min", "weight_entropy"):
            if exact:
                assert got[step][key] == want[step][key], (run.name, step, key)
            else:
                assert got[step][key] == pytest.approx(want[step][key], abs=TOLERANCE), (run.name, step, key)
    a, b = final_weights(run), final_weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), (run.name, name)
        else:
            assert torch.allclose(a[name], b[name], rtol=0, atol=TOLERANCE), \
                (run.name, name, (a[name] - b[name]).abs().max().item())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus, a shared data cache and a one-process reference run (built once per module)."""
    root = tmp_path_factory.mktemp("dist")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in generate_documents(200)))

    def args(name: str, **extra) -> list[str]:
        return tiny_run_overrides(corpus, root / "cache", root / name, **{**COMMON, **extra})

    from lostlm.train import Trainer  # the data cache (BPE, token files) is built here, once
    Trainer(load_config(None, args("one"))).train()
    return root, args


# -- one spawned pair: identical initialisation, data slices, FSDP state dict gathering ------

def _rank_worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from lostlm.build import build_model
    from lostlm.data import build_data
    from lostlm.optim import build_optimizer
    from lostlm.parallel import apply_fsdp, even_batches, gathered_state_dicts

    cfg = load_config(None, overrides)
    data = build_data(cfg.data, cfg.train.seed)
    slices = [data.next_batch(8, rank, world) for _ in range(3)]
    torch.manual_seed(cfg.train.seed)
    model, _ = build_model(cfg, data.vocab_size)  # SVD initialisation, on every rank
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    digests = [None] * world
    dist.all_gather_object(digests, digest.hexdigest())

    apply_fsdp(model, torch.device("cpu"))
    local_numel = sum(p.to_local().numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg)
    model_state, optimizer_state = gathered_state_dicts(model, optimizer)
    # uneven validation shares: rank 0 has 2 batches, rank 1 has 1; both must run 2 forwards
    own = [b for b in data.val_batches(4, 0, 1)][: 2 - rank]
    with torch.no_grad():
        shapes = [tuple(model(b[:, :-1]).shape) for b in even_batches(own, torch.device("cpu"))]
    torch.save({"slices": slices, "digests": digests, "model_state": model_state, "optimizer_state": optimizer_state,
                "local_numel": local_numel, "shapes": shapes}, f"{out}/rank{rank}.pt")
    # Stop the prefetch thread before leaving, as the trainer does: a daemon thread still inside
    # a torch call at interpreter exit aborted this worker once (SIGABRT) under a loaded CI box.
    data.close()
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not _has_fsdp2(), reason="this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
def test_ranks_start_identical_and_read_disjoint_slices(setup):
    import torch.multiprocessing as mp

    from lostlm.build import build_model
    from lostlm.data import build_data

    root, args = setup
    overrides = args("spawned")
    out = root / "spawned-out"
    out.mkdir()
    env = process_env()
    old = {k: os.environ.get(k) for k in ("GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS")}
    os.environ.update({k: env[k] for k in old if k in env})
    try:
        mp.spawn(_rank_worker, args=(2, free_port(), overrides, str(out)), nprocs=2, join=True)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2))

    # the SVD initialisation is bit-identical on both ranks (same seed, same code)
    assert r0["digests"] == r1["digests"] and r0["digests"][0] == r0["digests"][1]

    # data: the two slices are the two halves of the one-process global batch, in rank order
    cfg = load_config(None, overrides)
    data = build_data(cfg.data, cfg.train.seed)
    for a, b in zip(r0["slices"], r1["slices"]):
        full = data.next_batch(8)
        assert a.shape == b.shape == (4, cfg.data.seq_len + 1)
        assert torch.equal(torch.cat([a, b]), full)
    all_rows = [tuple(row.tolist()) for s in r0["slices"] + r1["slices"] for row in s]
    assert len(set(all_rows)) == len(all_rows)  # no sequence read by both ranks, nor twice

    # FSDP2: each rank holds about half of the parameters; rank 0 gathers full CPU state dicts
    torch.manual_seed(cfg.train.seed)
    model, _ = build_model(cfg, data.vocab_size)
    total = sum(p.numel() for p in model.parameters())
    assert r0["local_numel"] + r1["local_numel"] == total and r0["local_numel"] < 0.6 * total
    reference = model.state_dict()
    assert r0["model_state"].keys() == reference.keys() and r1["model_state"] == {}
    for name, tensor in reference.items():
        assert r0["model_state"][name].device.type == "cpu" and torch.equal(r0["model_state"][name], tensor), name
    names = {name for name, _ in model.named_parameters()}
    assert set(r0["optimizer_state"]["param_groups"][0]["params"]) | set(r0["optimizer_state"]["param_groups"][1]["params"]) == names
    # evaluation with uneven shares: the short rank cut its batch in two, nobody hung
    assert r0["shapes"] == [(4, cfg.data.seq_len, data.vocab_size)] * 2
    assert r1["shapes"] == [(2, cfg.data.seq_len, data.vocab_size)] * 2


# -- the command line under torchrun --------------------------------------------------------

def test_ddp_two_processes_match_one_and_resume_exactly(setup):
    root, args = setup
    torchrun(args("ddp", train__activation_checkpointing=2))  # DDP + checkpointing every 2nd block
    assert_same_run(root / "ddp", root / "one")
    summary = json.loads((root / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 6
    assert sorted(p.name for p in (root / "ddp" / "checkpoints").iterdir()) == ["latest", "step_00000003", "step_00000006"]

    # N/2 steps, then the same command continues to N: identical to N straight, bit for bit
    torchrun(args("ddp-resumed", train__steps=3, train__activation_checkpointing=2))
    assert latest_checkpoint(root / "ddp-resumed").name == "step_00000003"
    result = torchrun(args("ddp-resumed", train__activation_checkpointing=2))
    assert "resuming at step 3" in result.stderr
    assert_same_run(root / "ddp-resumed", root / "ddp", exact=True)


@pytest.mark.skipif(not _has_fsdp2(), reason="this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
def test_fsdp_two_processes_match_one_and_resume(setup):
    root, args = setup
    # with activation checkpointing on every block: FSDP2's hooks around a recomputed block
    torchrun(args("fsdp", train__parallel="fsdp", train__steps=3, train__activation_checkpointing=1))
    result = torchrun(args("fsdp", train__parallel="fsdp", train__activation_checkpointing=1))  # resumes
    assert "resuming at step 3" in result.stderr
    assert_same_run(root / "fsdp", root / "one")
    summary = json.loads((root / "fsdp" / "summary.json").read_text())
    one = json.loads((root / "one" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["val_loss"] == pytest.approx(one["val_loss"], abs=TOLERANCE)
    assert summary["parameters"] == one["parameters"]  # counted on the whole model, not one shard


def test_fsdp_setting_in_one_process_saves_name_keyed_state_and_resumes(setup):
    """train.parallel=fsdp without torchrun: nothing is sharded, but checkpoints use the same
    name-keyed optimizer state as a sharded run, and resume from them is exact."""
    from lostlm.train import Trainer

    root, args = setup
    Trainer(load_config(None, args("fsdp-one", train__parallel="fsdp", train__steps=3))).train()
    state = json.loads((latest_checkpoint(root / "fsdp-one") / "state.json").read_text())
    assert "model.layers.0.self_attn.q_proj.lowrank_down" in json.dumps(state["optimizer"])
    resumed = Trainer(load_config(None, args("fsdp-one", train__parallel="fsdp")))
    assert resumed.step == 3
    resumed.train()
    assert_same_run(root / "fsdp-one", root / "one", exact=True)


def test_hf_stream_is_split_across_processes_and_resumes_exactly(setup):
    """data.source=hf under torchrun: each rank streams its own part of the documents, the
    checkpoint keeps every rank's position, and N/2 steps resumed to N equal N straight."""
    root, args = setup
    hf = dict(data__source="hf", data__hf_name=str(root / "corpus"), data__hf_subset="null", data__hf_val_split="null")
    torchrun(args("hf", **hf))
    torchrun(args("hf-resumed", train__steps=3, **hf))
    position = json.loads((latest_checkpoint(root / "hf-resumed") / "state.json").read_text())["data"]
    assert position["kind"] == "ranks"
    assert [(p["rank"], p["world_size"]) for p in position["ranks"]] == [(0, 2), (1, 2)]
    result = torchrun(args("hf-resumed", **hf))
    assert "resuming at step 3" in result.stderr
    assert_same_run(root / "hf-resumed", root / "hf", exact=True)

"""The memory levers: chunked LM head + loss, activation checkpointing, 8-bit AdamW."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from lostlm.configs import load_config
from lostlm.errors import LostLMError
from lostlm.losses import ChunkedLinearCrossEntropy, head_losses
from lostlm.train import Trainer


def _problem(n=13, d=5, v=11, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, d, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[[1, 4, 9]] = -100
    return hidden, weight, targets


def test_chunked_gradients_pass_gradcheck_in_float64():
    hidden, weight, targets = _problem()
    for chunk in (1, 4, 13, 50):  # chunks that split the tokens unevenly, one token, all at once
        assert torch.autograd.gradcheck(lambda h, w: ChunkedLinearCrossEntropy.apply(h, w, targets, chunk),
                                        (hidden, weight))


def test_chunked_equals_plain_logits_then_cross_entropy():
    hidden, weight, targets = _problem(n=40, d=8, v=23)
    loss, lse = head_losses(hidden, weight, targets, chunk=7)
    logits = hidden @ weight.t()  # the plain path, written out independently
    want_loss = F.cross_entropy(logits, targets, reduction="none", ignore_index=-100)
    want_lse = torch.logsumexp(logits, -1)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(lse, want_lse)
    mask = targets != -100
    objective = lambda l, s: (l * torch.linspace(0.5, 2, 40, dtype=l.dtype)).sum() + 0.1 * (s[mask] ** 2).sum()
    got = torch.autograd.grad(objective(loss, lse), (hidden, weight))
    want = torch.autograd.grad(objective(want_loss, want_lse), (hidden, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.all(loss[~mask] == 0)


def test_chunked_under_bf16_autocast_matches_plain_and_tied_head():
    hidden, weight, targets = _problem(n=64, d=16, v=50, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head_losses(hidden, weight, targets, chunk=16)
        want = head_losses(hidden, weight, targets, chunk=0)
    assert got[0].dtype == got[1].dtype == torch.float32
    # both run the matmul in bf16 and the softmax in fp32: same numbers up to bf16 summation order
    torch.testing.assert_close(got[0], want[0], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got[1], want[1], atol=2e-2, rtol=1e-2)
    g_got = torch.autograd.grad(got[0].sum(), (hidden, weight))
    g_want = torch.autograd.grad(want[0].sum(), (hidden, weight))
    for a, b in zip(g_got, g_want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-2, rtol=5e-2)


def test_evaluation_path_uses_torch_kernel_and_matches_plain():
    hidden, weight, targets = _problem(n=30, d=8, v=40, dtype=torch.float32)
    with torch.no_grad():
        loss, lse = head_losses(hidden, weight, targets, chunk=8, with_lse=False)
        want = F.cross_entropy(hidden @ weight.t(), targets, reduction="none", ignore_index=-100)
    assert lse is None
    torch.testing.assert_close(loss, want)


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


@pytest.mark.parametrize("tie", [False, True])
def test_twenty_steps_chunked_match_plain(tiny_run, tmp_path, tie):
    extra = dict(train__steps=20, train__eval_every=20, train__checkpoint_every=0, train__z_loss=1e-3,
                 train__loss_chunk_tokens=48, model__tie_embeddings=tie, reweight__strategy="linupper")
    plain = Trainer(load_config(None, tiny_run("plain", train__loss_impl="plain", **extra))).train()
    chunked = Trainer(load_config(None, tiny_run("chunked", train__loss_impl="chunked", **extra))).train()
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "chunked")
    assert len(a) == len(b) == 20 and a[-1] < a[0]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3
    assert abs(plain["val_loss"] - chunked["val_loss"]) < 1e-3


@pytest.mark.parametrize("compile", [False, True])
def test_activation_checkpointing_leaves_losses_unchanged(tiny_run, tmp_path, compile):
    extra = dict(train__steps=4, train__eval_every=4, train__checkpoint_every=0, train__compile=compile)
    Trainer(load_config(None, tiny_run("off", **extra))).train()
    trainer = Trainer(load_config(None, tiny_run("on", train__activation_checkpointing=1, **extra)))
    assert all(layer.checkpointed for layer in trainer.model.model.layers)
    trainer.train()
    a, b = _losses(tmp_path / "off"), _losses(tmp_path / "on")
    assert len(a) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_every_kth_block_is_checkpointed(tiny_run):
    trainer = Trainer(load_config(None, tiny_run("k", model__num_layers=5, train__activation_checkpointing=2)))
    assert [layer.checkpointed for layer in trainer.model.model.layers] == [True, False, True, False, True]


bitsandbytes = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("method", ["full", "lowrank", "lowrank-svd", "cola", "sltrain", "lost"])
def test_adamw8bit_trains_every_method(tiny_run, tmp_path, method):
    trainer = Trainer(load_config(None, tiny_run(method, layer__method=method, train__optimizer="adamw8bit",
                                                 train__steps=8, train__lr=1e-2, train__eval_every=8)))
    assert type(trainer.optimizer).__name__ == "SlicedAdamW8bit"
    trainer.train()
    curve = _losses(tmp_path / method)
    assert all(torch.isfinite(torch.tensor(curve))) and curve[-1] < curve[0]
    # matrices of >= 4096 numbers hold uint8 moments
    states = [s for s in trainer.optimizer.state.values() if "state1" in s]
    assert any(s["state1"].dtype == torch.uint8 for s in states)


def test_adamw8bit_resume_is_bit_identical(tiny_run, tmp_path, interrupted_run):
    extra = dict(train__optimizer="adamw8bit", train__checkpoint_every=0, model__hidden_size=64)
    Trainer(load_config(None, tiny_run("straight", **extra))).train()
    interrupted_run("resumed", **extra)
    resumed = Trainer(load_config(None, tiny_run("resumed", **extra)))
    assert resumed.step == 3
    resumed.train()
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "resumed")


def test_adamw8bit_errors(tiny_run, monkeypatch):
    with pytest.raises(LostLMError, match="adamw8bit does not combine with layer.method=galore"):
        Trainer(load_config(None, tiny_run("g", layer__method="galore", train__optimizer="adamw8bit")))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    monkeypatch.delitem(sys.modules, "lostlm.adamw8bit", raising=False)  # imported by an earlier test
    with pytest.raises(LostLMError, match=r"lostlm\[8bit\]"):
        Trainer(load_config(None, tiny_run("m", train__optimizer="adamw8bit")))


MMAP_PROBE = """
import ctypes, sys, torch
from lostlm.runtime import release_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "on":
    release_freed_memory()
big = torch.empty(4 * 2**20)  # 16 MiB, freed: glibc's default threshold grows to its size
del big
before = libc.mallinfo2().hblkhd
eight = torch.empty(2 * 2**20)  # 8 MiB
print(libc.mallinfo2().hblkhd - before)
"""


def test_release_freed_memory_gives_every_big_buffer_its_own_mapping():
    """glibc's mallinfo2 (bytes in mmapped blocks): after a 16 MiB buffer is freed, the default
    allocator serves an 8 MiB one from the heap (where it stays resident once freed); with
    train.release_freed_memory it is a mapping of its own, returned to the OS on free."""
    import ctypes
    import subprocess

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    mapped = {mode: int(subprocess.run([sys.executable, "-c", MMAP_PROBE, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("off", "on")}
    assert mapped["off"] == 0
    assert mapped["on"] >= 8 * 2**20


def test_release_freed_memory_is_bookkeeping(tiny_run):
    """An allocator setting: it keys no new bench folder and a run may resume with it toggled."""
    from lostlm.bench.runkey import run_key
    from lostlm.rundir import significant_differences

    off = load_config(None, tiny_run("a"))
    on = load_config(None, tiny_run("a", train__release_freed_memory=True))
    assert on.train.release_freed_memory and run_key(on)["hash"] == run_key(off)["hash"]
    assert significant_differences(off.to_dict(), on.to_dict()) == []

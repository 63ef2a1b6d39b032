"""The optimizer: the sliced 8-bit update and the learning-rate split of untargeted parameters."""

import pytest
import torch

from lostlm.configs import load_config
from lostlm.errors import LostLMError
from lostlm.optim import lr_at
from lostlm.train import Trainer

SHAPES = [(1000, 77), (300, 256), (4099,), (50,)]  # uneven tails, one block-aligned, one fp32-moment vector


def _twin_steps(slice_numel, steps=5, weight_decay=0.1):
    bnb = pytest.importorskip("bitsandbytes")
    from lostlm.adamw8bit import SlicedAdamW8bit

    torch.manual_seed(0)
    start = [torch.randn(s) for s in SHAPES]
    whole = [p.clone().requires_grad_() for p in start]
    sliced = [p.clone().requires_grad_() for p in start]
    reference = bnb.optim.AdamW8bit(whole, lr=1e-2, weight_decay=weight_decay)
    optimizer = SlicedAdamW8bit(sliced, lr=1e-2, weight_decay=weight_decay, slice_numel=slice_numel)
    for _ in range(steps):
        for a, b in zip(whole, sliced):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.clone()
        reference.step()
        optimizer.step()
    return reference, whole, optimizer, sliced


@pytest.mark.parametrize("slice_numel", [256, 256 * 7, 1 << 20])
def test_sliced_8bit_update_is_bit_identical_to_bitsandbytes(slice_numel):
    reference, whole, optimizer, sliced = _twin_steps(slice_numel)
    for a, b in zip(whole, sliced):
        assert torch.equal(a, b)
        ra, rb = reference.state[a], optimizer.state[b]
        assert ra.keys() == rb.keys() and ra["step"] == rb["step"] == 5
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key in ra:
                assert torch.equal(ra[key], rb[key]), key
    assert optimizer.state[sliced[0]]["state1"].dtype == torch.uint8  # the sliced path ran (77,000 numbers)


def test_sliced_8bit_state_loads_into_bitsandbytes_and_back():
    reference, whole, optimizer, sliced = _twin_steps(256 * 3, steps=2)
    reference.load_state_dict(optimizer.state_dict())
    optimizer.load_state_dict(reference.state_dict())
    for a, b in zip(whole, sliced):
        assert torch.equal(reference.state[a]["state2"], optimizer.state[b]["state2"])


def test_sliced_8bit_refuses_a_slice_that_splits_a_block():
    pytest.importorskip("bitsandbytes")
    from lostlm.adamw8bit import SlicedAdamW8bit

    with pytest.raises(ValueError, match="multiple of 256"):
        SlicedAdamW8bit([torch.nn.Parameter(torch.zeros(4))], slice_numel=1000)


def test_trainer_builds_the_sliced_8bit_optimizer(tiny_run):
    pytest.importorskip("bitsandbytes")
    trainer = Trainer(load_config(None, tiny_run("eight", train__optimizer="adamw8bit")))
    assert type(trainer.optimizer).__name__ == "SlicedAdamW8bit"


@pytest.mark.parametrize("method", ["full", "lost"])
def test_untargeted_lr_scale_moves_embedding_head_and_norms_at_that_multiple(tiny_run, method):
    """Adam's first step moves each number by lr * g / (|g| + eps): with eps ~ 0, by exactly
    the group's lr wherever the gradient is not zero, so the largest move is its learning rate."""
    scale = 4.0
    cfg = load_config(None, tiny_run(method, layer__method=method, train__untargeted_lr_scale=scale))
    trainer = Trainer(cfg)
    names = dict(trainer.model.named_parameters())
    before = {n: p.detach().clone() for n, p in names.items()}
    for group in trainer.optimizer.param_groups:
        group["eps"] = 1e-30
    trainer.train_step(trainer.data.next_batch(cfg.train.batch_size))
    lr = lr_at(0, cfg)
    untargeted = {n for n in names if "embed_tokens" in n or "lm_head" in n or "norm" in n}
    assert untargeted and len(untargeted) < len(names)
    for name, p in names.items():
        moved = (p.detach() - before[name]).abs().max().item()
        assert moved == pytest.approx(lr * (scale if name in untargeted else 1.0), rel=1e-3), name
    scaled = [g for g in trainer.optimizer.param_groups if g.get("lr_scale") == scale]
    assert {id(p) for g in scaled for p in g["params"]} == {id(names[n]) for n in untargeted}


def test_untargeted_lr_scale_of_one_keeps_the_two_groups(tiny_run):
    trainer = Trainer(load_config(None, tiny_run("one")))
    assert [sorted(g) for g in trainer.optimizer.param_groups] == [sorted(trainer.optimizer.param_groups[0])] * 2
    assert all("lr_scale" not in g for g in trainer.optimizer.param_groups)
    assert len(trainer.optimizer.param_groups) == 2


def test_untargeted_lr_scale_must_be_positive(tiny_run):
    with pytest.raises(LostLMError, match="train.untargeted_lr_scale=0.0 must be positive"):
        load_config(None, tiny_run("zero", train__untargeted_lr_scale=0.0))


def test_resume_with_untargeted_lr_scale_is_bit_identical(tiny_run, tmp_path, interrupted_run):
    """The scaled param groups (and their lr_scale) come back from the checkpoint exactly."""
    from lostlm.rundir import read_metrics

    extra = dict(layer__method="lost", train__untargeted_lr_scale=4.0, train__checkpoint_every=2)
    Trainer(load_config(None, tiny_run("straight", **extra))).train()
    interrupted_run("resumed", **extra)
    resumed = Trainer(load_config(None, tiny_run("resumed", **extra)))
    assert resumed.step == 3 and sorted(g.get("lr_scale", 1.0) for g in resumed.optimizer.param_groups) == [1.0, 1.0, 4.0, 4.0]
    resumed.train()

    def losses(name):
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(tmp_path / name) if "step" in r]

    assert losses("straight") == losses("resumed")

"""Loss-based sample reweighting (Sow et al., ICLR 2025; the rule is written out in
``src/lostlm/reweight.py``'s docstring): the formulas, their bounds, and the trainer.

What "correct under gradient accumulation" means here: the weights are normalised per *global
micro-batch* (the micro-batch of every data-parallel rank together), as ``lostlm.reweight``
says ("per micro-batch ... the *global* batch (all data-parallel ranks)"), and the step's
loss is the mean of the micro-batch losses. So with a non-uniform strategy, accumulating 4 micro-batches of 2 is *not*
the same as one batch of 8 (the softmax runs over 2 sequences, not 8); with ``uniform`` it is
(tests/test_train.py). ``test_accumulation_normalises_weights_per_micro_batch`` pins this down
against a hand-written computation.
"""

import copy
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from lostlm.configs import ReweightConfig, load_config
from lostlm.optim import build_optimizer, lr_at
from lostlm.reweight import sample_weights, strategy_scores, weight_stats
from lostlm.train import Trainer

STRATEGIES = ("linupper", "quadratic", "extremes")


def reference_weights(losses: list[float], strategy: str, r: float, delta: float = 1.0) -> list[float]:
    """The reweighting formulas written out in plain Python floats (independent of lostlm.reweight)."""
    lo, hi = min(losses), max(losses)
    if hi == lo:
        xs = [0.0] * len(losses)
    else:
        xs = [delta * (2 * l - hi - lo) / (hi - lo) for l in losses]
    f = {"linupper": lambda x: min(x + delta, delta),
         "quadratic": lambda x: 1 - x * x / (delta * delta),
         "extremes": abs,
         "uniform": lambda x: 0.0}[strategy]
    scores = [f(x) / r for x in xs]
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def random_losses(rng: random.Random, n: int) -> list[float]:
    """n float32-representable losses in [offset, offset + scale], both ends present. Spreads
    of at least 1 keep float32 rounding in (2ℓ − ℓmax − ℓmin)/(ℓmax − ℓmin) below ~1e-5."""
    offset, scale = rng.uniform(0.0, 4.0), rng.choice([1.0, 2.0, 5.0])
    u = [0.0, 1.0] + [rng.random() for _ in range(n - 2)]
    rng.shuffle(u)
    return torch.tensor([offset + scale * v for v in u], dtype=torch.float32).tolist()


def weights_of(losses, strategy, r, delta=1.0, warmup=0, step=0) -> torch.Tensor:
    cfg = ReweightConfig(strategy=strategy, temperature=r, delta=delta, warmup_steps=warmup)
    return sample_weights(torch.tensor(losses, dtype=torch.float32), cfg, step)


# -- the formulas --------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("r", [0.25, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("delta", [1.0, 0.5])
def test_weights_match_an_independent_computation(strategy, r, delta):
    # A string seed is hashed with SHA-512 by random.seed, so it is the same in every process
    # (hash() of a str is randomised per process by PYTHONHASHSEED).
    rng = random.Random(f"{strategy}/{r}/{delta}")
    for n in (2, 3, 8, 64):
        losses = random_losses(rng, n)
        got = weights_of(losses, strategy, r, delta)
        want = torch.tensor(reference_weights(losses, strategy, r, delta), dtype=torch.float32)
        assert got.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert torch.allclose(got, want, rtol=1e-4, atol=0), (strategy, r, delta, losses)  # float32 rounding


def test_each_strategy_prefers_what_its_name_says():
    losses = [1.0, 2.0, 3.0, 4.0, 5.0]  # x = -1, -0.5, 0, 0.5, 1
    lin, quad, ext = (weights_of(losses, s, 1.0) for s in STRATEGIES)
    assert lin[0] < lin[1] < lin[2] and torch.allclose(lin[2:], lin[2].expand(3))  # low losses down, upper half flat
    assert quad.argmax() == 2 and torch.isclose(quad[0], quad[4])  # medium losses up
    assert quad[0] < quad[1] < quad[2]
    assert ext.argmin() == 2 and torch.isclose(ext[0], ext[4])  # both extremes up


def test_uniform_weights_are_exactly_one_over_n():
    losses = [0.3, 5.0, 2.0, 7.5, 1.0, 1.0, 9.0]
    w = weights_of(losses, "uniform", 0.1)
    assert torch.equal(w, torch.full((7,), 1 / 7))
    assert torch.equal(strategy_scores(torch.tensor(losses), "uniform"), torch.zeros(7))


@pytest.mark.parametrize("r", [0.2, 0.4, 0.5, 1.0, 2.0])
def test_max_min_ratio_never_exceeds_e_to_the_one_over_r(r):
    rng = random.Random(int(r * 1000))
    bound = math.exp(1 / r)
    for trial in range(200):
        losses = random_losses(rng, rng.choice([2, 5, 16, 128]))
        for strategy in STRATEGIES:
            w = weights_of(losses, strategy, r)
            ratio = (w.max() / w.min()).item()
            assert ratio <= bound * (1 + 1e-4), (strategy, r, ratio, bound)  # float32 rounding
            assert weight_stats(w)["weight_max_min"] == pytest.approx(ratio)
        # the bound is tight: linupper gives f=0 to the lowest loss and f=δ to the highest
        lin = weights_of(losses, "linupper", r)
        assert (lin.max() / lin.min()).item() == pytest.approx(bound, rel=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_equal_losses_give_uniform_weights(strategy):
    for n in (1, 2, 16):
        w = weights_of([2.5] * n, strategy, 0.3)
        assert torch.allclose(w, torch.full((n,), 1 / n), atol=0, rtol=1e-6)
        assert torch.isfinite(w).all()
        stats = weight_stats(w)
        assert stats["weight_max_min"] == pytest.approx(1.0)
        assert n == 1 or stats["weight_entropy"] == pytest.approx(1.0)  # normalised by log n


def test_warmup_steps_are_uniform():
    losses = [1.0, 4.0, 2.0, 8.0]
    for step in range(3):
        assert torch.equal(weights_of(losses, "extremes", 0.5, warmup=3, step=step), torch.full((4,), 0.25))
    after = weights_of(losses, "extremes", 0.5, warmup=3, step=3)
    assert torch.allclose(after, torch.tensor(reference_weights(losses, "extremes", 0.5)))
    assert not torch.allclose(after, torch.full((4,), 0.25))


# -- through the trainer -------------------------------------------------------------------

def capture_gradients(trainer: Trainer) -> list:
    """Record the gradients the optimizer receives (after clipping) on the next step."""
    seen = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append([p.grad.detach().clone() for p in trainer.model.parameters()])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return seen


def manual_step(trainer: Trainer, model, batch: torch.Tensor, micro: int, weight_fn) -> tuple[float, list]:
    """One optimizer step written out by hand: per micro-batch, per-sequence mean token loss,
    weights from ``weight_fn(losses of the micro-batch)``, loss Σ w_i ℓ_i, averaged over the
    micro-batches; clip to train.grad_clip; AdamW at the step's learning rate."""
    cfg = trainer.cfg
    optimizer = build_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(0, cfg)
    chunks = batch.split(micro)
    losses = []
    for chunk in chunks:
        inputs, targets = chunk[:, :-1], chunk[:, 1:]
        logits = model(inputs)
        per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        per_seq = per_token.mean(dim=1)
        w = torch.tensor(weight_fn(per_seq.detach().tolist()), dtype=torch.float32)
        ((w * per_seq).sum() / len(chunks)).backward()
        losses.append(per_seq.mean().item())
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    grads = [p.grad.detach().clone() for p in model.parameters()]
    optimizer.step()
    return sum(losses) / len(losses), grads


def test_uniform_is_exactly_the_plain_mean_loss(tiny_run):
    trainer = Trainer(load_config(None, tiny_run("uniform", train__steps=1)))
    assert trainer.cfg.reweight.strategy == "uniform"
    model = copy.deepcopy(trainer.model)
    batch = trainer.data.next_batch(8)
    grads = capture_gradients(trainer)
    stats = trainer.train_step(batch)
    assert "weight_max_min" not in stats

    # the plain computation: one mean cross-entropy over every token of the batch (all
    # sequences have the same length, so it is the mean of per-sequence means)
    optimizer = build_optimizer(model, trainer.cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(0, trainer.cfg)
    logits = model(batch[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.cfg.train.grad_clip)
    plain_grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()

    assert stats["loss"] == pytest.approx(loss.item(), abs=1e-6)
    for (name, p), g, q, h in zip(trainer.model.named_parameters(), grads[0], model.parameters(), plain_grads):
        assert torch.allclose(g, h, rtol=1e-5, atol=1e-8), name
        assert torch.allclose(p, q, atol=1e-6), name


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_accumulation_normalises_weights_per_micro_batch(tiny_run, strategy):
    r = 0.5
    overrides = dict(train__steps=1, train__micro_batch_size=4, reweight__strategy=strategy, reweight__temperature=r)
    trainer = Trainer(load_config(None, tiny_run(f"acc-{strategy}", **overrides)))
    assert trainer.accumulation == 2
    model = copy.deepcopy(trainer.model)
    batch = trainer.data.next_batch(8)
    grads = capture_gradients(trainer)
    stats = trainer.train_step(batch)

    loss, manual_grads = manual_step(trainer, model, batch, 4, lambda l: reference_weights(l, strategy, r))
    assert stats["loss"] == pytest.approx(loss, abs=1e-6)
    for (name, p), g, q, h in zip(trainer.model.named_parameters(), grads[0], model.parameters(), manual_grads):
        assert torch.allclose(g, h, rtol=1e-4, atol=1e-7), name
        assert torch.allclose(p, q, atol=1e-5), name

    # ... and it is not the same as normalising over the whole batch of 8 at once
    whole = copy.deepcopy(model)
    _, whole_grads = manual_step(trainer, whole, batch, 8, lambda l: reference_weights(l, strategy, r))
    assert any(not torch.allclose(g, h, rtol=1e-3, atol=1e-6) for g, h in zip(grads[0], whole_grads))


def test_weight_spread_is_logged_and_warmup_is_uniform(tiny_run, tmp_path):
    cfg = load_config(None, tiny_run("logged", train__steps=4, train__eval_every=4, train__checkpoint_every=0,
                                     reweight__strategy="linupper", reweight__temperature=0.5, reweight__warmup_steps=2))
    Trainer(cfg).train()
    lines = [json.loads(l) for l in (tmp_path / "logged" / "metrics.jsonl").read_text().splitlines()]
    steps = {rec["step"]: rec for rec in lines if "loss" in rec}
    assert sorted(steps) == [1, 2, 3, 4]
    for step in (1, 2):  # optimizer steps 0 and 1: reweighting warm-up, uniform
        assert steps[step]["weight_max_min"] == pytest.approx(1.0) and steps[step]["weight_entropy"] == pytest.approx(1.0)
    for step in (3, 4):
        assert 1.0 < steps[step]["weight_max_min"] <= math.exp(1 / 0.5) * (1 + 1e-5)
        assert 0.0 < steps[step]["weight_entropy"] < 1.0

    Trainer(load_config(None, tiny_run("plain", train__steps=2, train__checkpoint_every=0))).train()
    plain = [json.loads(l) for l in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert not any("weight_max_min" in rec or "weight_entropy" in rec for rec in plain)

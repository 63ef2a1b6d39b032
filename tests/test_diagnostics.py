"""Training diagnostics: group gradient norms, update ratios, max logit, loss-spike events."""

import json
import math

import pytest
import torch

from lostlm.build import build_model
from lostlm.configs import load_config
from lostlm.diagnostics import (GRAD_JUMP, GRAD_WINDOW, MaxLogitProbe, SpikeDetector, grad_norms, group_of, snapshot,
                                spike_episodes, spike_warning, update_ratios)
from lostlm.errors import LostLMError
from lostlm.train import Trainer

VOCAB = 50


def tiny_model(method: str = "lost"):
    cfg = load_config(None, ["model.hidden_size=32", "model.intermediate_size=64", "model.num_heads=4",
                             "model.num_layers=2", "layer.rank=8", "layer.density=0.1", f"layer.method={method}"])
    model, _ = build_model(cfg, VOCAB)
    return model


def backward_once(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (4, 17), generator=g)
    per_token, _ = model(ids[:, :-1], ids[:, 1:], with_lse=False)
    per_token.mean().backward()


def test_group_names():
    assert group_of("model.embed_tokens.weight") == "embed"
    assert group_of("lm_head.weight") == "head"
    assert group_of("model.layers.3.input_layernorm.weight") == "norm" == group_of("model.norm.weight")
    assert group_of("model.layers.0.self_attn.q_proj.weight") == "attn.q"
    assert group_of("model.layers.1.self_attn.k_proj.lowrank_down") == "attn.k.down"
    assert group_of("model.layers.1.mlp.down_proj.lowrank_up") == "mlp.down.up"
    assert group_of("model.layers.1.mlp.gate_proj.sparse_weight") == "mlp.gate.sparse"
    assert group_of("model.layers.1.mlp.up_proj.sparse_values") == "mlp.up.sparse"


def test_group_gradient_norms_match_the_gradients():
    model = tiny_model("lost")
    backward_once(model)
    norms = grad_norms(model)
    named = dict(model.named_parameters())
    # independently: concatenate the gradients of the parameters named like each group
    expected = {
        "attn.q.down": [n for n in named if n.endswith("q_proj.lowrank_down")],
        "mlp.down.sparse": [n for n in named if n.endswith("down_proj.sparse_weight")],
        "embed": ["model.embed_tokens.weight"], "head": ["lm_head.weight"],
        "norm": [n for n in named if n.endswith("norm.weight")],
    }
    for group, names in expected.items():
        assert len(names) >= 1
        flat = torch.cat([named[n].grad.reshape(-1) for n in names])
        assert math.isclose(norms[group], flat.norm().item(), rel_tol=1e-5), group
    total = torch.nn.utils.clip_grad_norm_(list(model.parameters()), float("inf")).item()
    assert math.isclose(math.sqrt(sum(v * v for v in norms.values())), total, rel_tol=1e-5)
    assert {"attn.q.up", "attn.o.sparse", "mlp.gate.down"} <= norms.keys()


def test_update_ratios_are_the_relative_change_of_each_group():
    model = tiny_model("full")
    backward_once(model)
    before = snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)
    ratios = update_ratios(model, before)
    q = [n for n, _ in model.named_parameters() if n.endswith("q_proj.weight")]
    named = dict(model.named_parameters())
    delta = torch.cat([(0.1 * named[n].grad).reshape(-1) for n in q]).norm()
    weight = torch.cat([before[n].reshape(-1) for n in q]).norm()
    assert math.isclose(ratios["attn.q"], (delta / weight).item(), rel_tol=1e-4)


def test_max_logit_probe_sees_the_training_forward():
    model = tiny_model("lost")
    probe = MaxLogitProbe(model, chunk_tokens=7)  # chunks that do not divide the token count
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))
    probe.arm()
    model(ids, ids, with_lse=False)
    value = probe.take()
    with torch.no_grad():
        logits = model(ids)  # all logits
    assert math.isclose(value, logits.max().item(), rel_tol=1e-5)
    assert probe.take() is None  # disarmed after one read
    with torch.no_grad():  # evaluation forwards are not captured
        probe.arm()
        model(ids, ids, with_lse=False)
    assert probe.take() is None


def test_spike_detector_fires_on_a_jump_only_after_warmup():
    smooth = [10.0 * math.exp(-0.05 * i) + 0.2 * math.sin(i) + 3 for i in range(100)]  # wiggles < 0.5 nats
    assert spike_episodes(enumerate(smooth, 1), warmup_steps=10) == []
    jump = [10.5, 9.0, 8.0, 7.3, 7.28, 9.13, 8.9, 7.9, 7.2, 7.0]  # the 60m LOST curve, roughly
    events = spike_episodes(enumerate(jump, 1), warmup_steps=2)
    assert [e["step"] for e in events] == [6, 7, 8] and events[0]["first"] and not events[1]["first"]
    assert events[0]["running_min"] == 7.28
    assert spike_episodes(enumerate([9.0, 12.0, 8.0], 1), warmup_steps=2) == []  # inside warm-up: not a spike
    detector = SpikeDetector(2)
    for step, loss in enumerate(jump[:6], 1):
        detector.update(step, loss)
    restored = SpikeDetector(2)
    restored.load_state_dict(json.loads(json.dumps(detector.state_dict())))  # through state.json
    assert restored.update(7, 8.9) == detector.update(7, 8.9) and restored.count == detector.count == 2


def test_a_spike_is_unstable_only_when_the_gradient_norm_jumps_with_the_loss():
    losses = [10.0, 9.0, 8.0, 7.0, 7.3, 7.4, 6.9, 7.7]
    norms = [2.0, 1.0, 3.0, 1.5, 1.0, 1.2, 1.1, 1.0]  # step 8: a hard batch, gradient as usual
    events = spike_episodes(zip(range(1, 9), losses, norms), warmup_steps=2)
    assert [e["step"] for e in events] == [8] and not events[0]["unstable"]
    median = sorted(norms[:7])[3]  # 1.2, an odd count: the middle value
    assert math.isclose(events[0]["grad_norm_ratio"], 1.0 / median)
    norms[7] = GRAD_JUMP * median  # the same loss with a gradient norm at the threshold
    events = spike_episodes(zip(range(1, 9), losses, norms), warmup_steps=2)
    assert events[0]["unstable"] and math.isclose(events[0]["grad_norm_ratio"], GRAD_JUMP)
    assert spike_episodes(enumerate(losses, 1), warmup_steps=2)[0]["unstable"]  # no norms: not dismissed
    # the median is over the last GRAD_WINDOW norms only: an old huge norm has left the window
    long_norms = [100.0] + [1.0] * (GRAD_WINDOW + 5)
    long_losses = [5.0] * len(long_norms) + [6.0]
    detector = SpikeDetector(1)
    for step, (loss, norm) in enumerate(zip(long_losses, long_norms + [2.5]), 1):
        event = detector.update(step, loss, norm)
    assert event["grad_norm_ratio"] == 2.5 and event["unstable"]
    assert detector.count == detector.unstable == 1
    # through state.json, and a checkpoint from before the classification (no history) still loads
    restored = SpikeDetector(1)
    restored.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert restored.update(99, 6.0, 1.0) == detector.update(99, 6.0, 1.0)
    old = SpikeDetector(1)
    old.load_state_dict({"running_min": 5.0, "count": 2, "in_spike": False})
    assert old.unstable == 2 and old.update(3, 6.0, 1.0)["unstable"]  # no history: counted unstable
    for damaged in ({"recent_grad_norms": ["x"]}, {"count": [1]}, {"running_min": "low"}):
        with pytest.raises(LostLMError, match="checkpoint ck/step_9: its loss_spikes record is damaged"):
            SpikeDetector(1).load_state_dict(damaged, source="ck/step_9")


def test_the_spike_warning_names_the_kind_and_what_to_set():
    event = {"step": 12, "loss": 7.66, "running_min": 6.95, "grad_norm_ratio": 3.1, "unstable": True}
    assert "lower train.lr" in spike_warning(event, 0.5) and "3.1x" in spike_warning(event, 0.5)
    calm = {**event, "grad_norm_ratio": 0.8, "unstable": False}
    assert "hard batch" in spike_warning(calm, 0.5) and "train.lr" not in spike_warning(calm, 0.5)


def test_trainer_logs_diagnostics_and_spikes(tiny_run, tmp_path):
    summary = Trainer(load_config(None, tiny_run("diag", train__steps=4, train__log_every=2))).train()
    records = [json.loads(line) for line in (tmp_path / "diag" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "grad_norms" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for r in logged:
        assert math.isclose(math.sqrt(sum(v * v for v in r["grad_norms"].values())), r["grad_norm"], rel_tol=1e-4)
        assert r["update_ratios"]["attn.q.down"] > 0 and math.isfinite(r["max_logit"])
    assert summary["loss_spikes"] == sum(1 for r in records if r.get("event") == "loss_spike")
    assert summary["unstable_spikes"] == sum(1 for r in records if r.get("event") == "loss_spike" and r["unstable"])
    off = load_config(None, tiny_run("off", train__steps=2, train__diagnostics=False))
    Trainer(off).train()
    assert not any("grad_norms" in line for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines())


def test_adams_first_step_moves_lost_sparse_block_most_relative_to_its_size():
    """The mechanism behind the 60m spike (docs/results.md): Adam's first step moves every entry
    by lr (m̂/√v̂ = sign g), so a group's update ratio is lr·√n / ‖W‖ = lr / rms(W), and LOST's
    sparse block (top columns of the SVD residual) has the smallest rms of the model."""
    from lostlm.optim import build_optimizer

    lr = 1e-3
    cfg = load_config(None, [f"train.lr={lr}", "train.weight_decay=0"])
    model = tiny_model("lost")
    optimizer = build_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    backward_once(model)
    before = snapshot(model)
    optimizer.step()
    ratios = update_ratios(model, before)
    named = dict(model.named_parameters())
    for group in ("attn.v.sparse", "attn.v.down", "attn.v.up", "mlp.up.sparse", "mlp.up.down"):
        names = [n for n in named if group_of(n) == group]
        w = torch.cat([before[n].reshape(-1) for n in names])
        assert math.isclose(ratios[group], lr / w.pow(2).mean().sqrt().item(), rel_tol=1e-2), group
    assert ratios["attn.v.sparse"] > max(ratios["attn.v.down"], ratios["attn.v.up"])
    assert ratios["mlp.up.sparse"] > max(ratios["mlp.up.down"], ratios["mlp.up.up"])


def test_the_diagnostics_switch_is_bookkeeping():
    """It changes no run key and may differ on resume (old run folders have no such key)."""
    from lostlm.bench.runkey import run_key
    from lostlm.rundir import significant_differences

    on, off = load_config(None, ["train.diagnostics=true"]), load_config(None, ["train.diagnostics=false"])
    assert run_key(on)["hash"] == run_key(off)["hash"]
    saved = on.to_dict()
    del saved["train"]["diagnostics"]
    assert significant_differences(saved, off.to_dict()) == []

"""layer.method=galore: dense weights, GaLoreAdamW with projected moments, and it learns."""

import json
import math

from lostlm.configs import load_config
from lostlm.train import Trainer


def test_galore_trains_and_keeps_projected_moments(tiny_run, tmp_path):
    cfg = load_config(None, tiny_run("galore", layer__method="galore", layer__galore_rank=4, layer__galore_update_gap=5,
                                     train__steps=20, train__eval_every=20, train__checkpoint_every=0))
    trainer = Trainer(cfg)
    summary = trainer.train()
    curve = [json.loads(l)["loss"] for l in (tmp_path / "galore" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(curve) == 20 and all(math.isfinite(x) for x in curve)
    assert sum(curve[-5:]) / 5 < curve[0] - 0.8  # 5.98 -> ~4.7 on the generated corpus
    assert math.isfinite(summary["val_loss"]) and summary["val_loss"] < curve[0]
    q = trainer.model.model.layers[0].self_attn.q_proj.weight  # 32×32 dense, projected to rank 4
    state = trainer.optimizer.state[q]
    assert tuple(state["exp_avg"].shape) == (32, 4) and tuple(state["exp_avg_sq"].shape) == (32, 4)
    head = trainer.optimizer.state[trainer.model.lm_head.weight]  # not targeted: plain Adam moments
    assert head["exp_avg"].shape == trainer.model.lm_head.weight.shape

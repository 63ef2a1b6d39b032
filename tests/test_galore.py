"""layer.method=galore: dense weights, GaLoreAdamW with projected moments, and it learns."""

import json
import math
from collections import Counter

from lostlm.configs import load_config
from lostlm.train import Trainer

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def unigram_entropy(data, micro_batch: int) -> float:
    """Entropy (nats) of the validation targets' own token frequencies: what a model that knows
    only how often each token occurs (and nothing of the context) would score."""
    counts = Counter()
    for batch in data.val_batches(micro_batch):
        counts.update(batch[:, 1:].flatten().tolist())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def test_galore_trains_and_keeps_projected_moments(tiny_run, tmp_path):
    rank = 4
    cfg = load_config(None, tiny_run("galore", layer__method="galore", layer__galore_rank=rank, layer__galore_update_gap=5,
                                     train__steps=20, train__eval_every=20, train__checkpoint_every=0))
    trainer = Trainer(cfg)
    summary = trainer.train()
    curve = [json.loads(l)["loss"] for l in (tmp_path / "galore" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(curve) == 20 and all(math.isfinite(x) for x in curve)
    # Reference points computed here, not observed: a fresh model (weights of std 0.02) predicts
    # nearly uniformly, so its first loss is ln V (its logits' spread adds far less than 0.05);
    # the unigram entropy is what token frequencies alone give. Learning = at least half of
    # that gap closed over the last 5 steps, and a validation loss below ln V.
    uniform = math.log(trainer.data.vocab_size)
    unigram = unigram_entropy(trainer.data, cfg.train.batch_size)
    assert abs(curve[0] - uniform) < 0.05
    assert sum(curve[-5:]) / 5 < (uniform + unigram) / 2
    assert math.isfinite(summary["val_loss"]) and summary["val_loss"] < uniform
    # galore_torch's std projection keeps Adam moments of (m, r) for an m×n weight with m >= n
    # (right projection) and (r, n) otherwise; untargeted weights keep full-shape moments.
    for name, weight in trainer.model.named_parameters():
        state = trainer.optimizer.state[weight]
        if name.split(".")[-2] in PROJECTIONS:
            m, n = weight.shape
            want = (m, rank) if m >= n else (rank, n)
        else:
            want = tuple(weight.shape)
        assert tuple(state["exp_avg"].shape) == want == tuple(state["exp_avg_sq"].shape), name

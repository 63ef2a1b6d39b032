"""Reproduces the open issue in docs/results.md: LOST at 60m (bench/speed-60m.yaml config)
validates normally after steps 1-7 and jumps to ~12.3 nats after step 8.

    python bench/repro_lost_60m_val.py current     # the LOST forward in layers.py
    python bench/repro_lost_60m_val.py before      # the pre-change forward (bench/lost_impls.py)
"""
import torch, sys, types
sys.path.insert(0, "bench")
from lostlm.configs import load_config
from lostlm.bench import load_recipe, run_config
from lostlm.train import Trainer, sequence_losses
from lostlm.layers import LOSTLinear
import lost_impls
r = load_recipe("bench/speed-60m.yaml"); v = [x for x in r.variants if x.name == "lost"][0]
cfg = run_config(r, v, 0); cfg.train.out_dir = "/tmp/diverge-run"; cfg.train.threads = 2
impl = sys.argv[1]
import shutil; shutil.rmtree("/tmp/diverge-run", ignore_errors=True)
tr = Trainer(cfg)
if impl == "before":
    for m in tr.model.modules():
        if isinstance(m, LOSTLinear): m.forward = types.MethodType(lost_impls.before, m)
vb = next(iter(tr.data.val_batches(16)))
for i in range(8):
    st = tr.train_step(tr.data.next_batch(16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        l = sequence_losses(tr.model(vb[:, :-1]), vb[:, 1:]).mean().item()
    print(impl, i + 1, round(st["loss"], 3), "lr", round(st["lr"], 5), "val", round(l, 3), flush=True)

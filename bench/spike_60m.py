"""The 60m loss spike (docs/results.md, "LOST at 60m: the loss spike"): run a variant, then
tabulate where a spike starts from the trainer's diagnostics in metrics.jsonl.

    # one run: the speed-60m settings (vocab 32000, batch 16 x 256, lr 3e-3), 2 threads
    python bench/spike_60m.py run /tmp/spike/lost train.steps=12 train.warmup_steps=2
    python bench/spike_60m.py run /tmp/spike/lost-f05 --factor-lr-scale 0.5 train.steps=12 train.warmup_steps=2
    python bench/spike_60m.py run /tmp/spike/lost-s03 --start-from /tmp/spike/lost:5 --lr-scale sparse_weight=0.3
    # the table: loss, grad norm, max logit, the groups with the largest update ratio / grad norm
    python bench/spike_60m.py report /tmp/spike/lost /tmp/spike/full
    # two runs on the same batches: per-step loss side by side, LOST's excess over full-rank
    python bench/spike_60m.py pair /tmp/spike/lost /tmp/spike/full
    # replay a run from its checkpoint (exact resume) up to the weights before the spike step
    # and dissect that step's forward: per-sequence loss, per-block activation peaks, ablations
    python bench/spike_60m.py probe /tmp/spike/lost /tmp/spike/probe --spike-step 8
    # which group's update breaks it: the weights before the spike step with one group's last
    # update undone, evaluated on (the first --rows sequences of) the spike step's batch
    python bench/spike_60m.py revert /tmp/spike/lost /tmp/spike/revert --spike-step 8 --rows 8

``--factor-lr-scale s`` trains the low-rank factors (``lowrank_down``, ``lowrank_up``) at s × the
schedule's learning rate, ``--lr-scale sparse_weight=s`` LOST's sparse blocks, everything else
at 1 × (the trainer honours a param group's ``lr_scale``; the Adam state is kept).
``--start-from FOLDER:STEP`` continues a copy of a run from one of its checkpoints (exact
resume), e.g. to change one thing from the step before a spike on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from lostlm.configs import load_config
from lostlm.diagnostics import spike_episodes
from lostlm.errors import LostLMError
from lostlm.train import Trainer

RECIPE = ["model.preset=60m", "data.bpe_vocab_size=32000", "data.val_tokens=8192", "train.batch_size=16",
          "train.log_every=1", "train.checkpoint_every=0", "train.threads=2", "train.progress=false",
          "train.precision=fp32"]  # as the recorded runs; `auto` would be bf16 on a CPU with native bf16
FACTORS = ("lowrank_down", "lowrank_up")


def split_groups(trainer: Trainer, scales: dict[str, float]) -> None:
    """Give the parameters whose names end with each key of ``scales`` their own param group
    with that ``lr_scale``, in the trainer's optimizer itself (its state, kept per parameter,
    stays; rebuilding the optimizer from its ``defaults`` fails on newer AdamW keys)."""
    optimizer = trainer.optimizer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        rest = list(group["params"])
        for suffix, scale in scales.items():
            picked = [p for p in rest if names[id(p)].endswith(suffix)]
            rest = [p for p in rest if not names[id(p)].endswith(suffix)]
            groups.append({**settings, "params": picked, "lr_scale": scale})
        groups.append({**settings, "params": rest})
    if not any(g["params"] and "lr_scale" in g for g in groups):
        raise SystemExit(f"no parameter name ends with any of {sorted(scales)}")
    optimizer.param_groups = []
    for group in groups:
        if group["params"]:
            optimizer.add_param_group(group)


def _lr_scale(text: str) -> tuple[str, float]:
    suffix, _, scale = text.partition("=")
    try:
        return suffix, float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not SUFFIX=SCALE (e.g. sparse_weight=0.3)") from None


def run(args) -> None:
    out = Path(args.out)
    if args.start_from:  # continue a copy of another run from one of its checkpoints
        src, step = args.start_from.rsplit(":", 1)
        out.mkdir(parents=True, exist_ok=False)
        shutil.copytree(Path(src) / "checkpoints" / f"step_{int(step):08d}", out / "checkpoints" / f"step_{int(step):08d}")
        for name in ("config.yaml", "metrics.jsonl"):
            shutil.copy(Path(src) / name, out / name)
        cfg = load_config(out / "config.yaml", [f"train.out_dir={out}", *args.overrides])
    else:
        cfg = load_config("configs/tiny.yaml", [*RECIPE, f"train.out_dir={out}", *args.overrides])
    trainer = Trainer(cfg)
    scales = dict(args.lr_scale)
    if args.factor_lr_scale != 1.0:
        scales.update({suffix: args.factor_lr_scale for suffix in FACTORS})
    if scales:
        split_groups(trainer, scales)
    trainer.train()


def _train_losses(folder: str) -> dict[int, dict]:
    records = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in records if "loss" in r and "event" not in r}


def pair(args) -> None:
    """Two runs on the same batches (same seed and data): the loss of each step side by side and
    the excess d = loss(A) − loss(B). A spike of A that B shares on the same batch is the batch,
    not A's training; the steps where d exceeds --excess nats are A's own."""
    a, b = _train_losses(args.a), _train_losses(args.b)
    steps = sorted(set(a) & set(b))
    own = [s for s in steps if a[s]["loss"] - b[s]["loss"] > args.excess]
    print(f"## {args.a} (A) vs {args.b} (B): {len(steps)} shared steps; "
          f"steps where A exceeds B by more than {args.excess} nats: {own}")
    print("| step | loss A | loss B | d = A − B | grad norm A | grad norm B |")
    print("|---|---|---|---|---|---|")
    for s in steps[:args.rows]:
        print(f"| {s} | {a[s]['loss']:.3f} | {b[s]['loss']:.3f} | {a[s]['loss'] - b[s]['loss']:+.3f} | "
              f"{a[s]['grad_norm']:.2f} | {b[s]['grad_norm']:.2f} |")


def report(args) -> None:
    for folder in args.folders:
        config = load_config(Path(folder) / "config.yaml")
        t = config.train
        warmup = t.warmup_steps if t.warmup_steps is not None else max(1, t.steps // 10)
        steps = list(_train_losses(folder).values())
        spikes = spike_episodes([(r["step"], r["loss"], r.get("grad_norm")) for r in steps], warmup)
        kinds = ", ".join(f"{e['step']} ({'unstable' if e['unstable'] else 'hard batch'}, gradient norm "
                          f"{e['grad_norm_ratio']:.1f}x median)" if e["grad_norm_ratio"] is not None else str(e["step"])
                          for e in spikes)
        print(f"## {folder}: {config.layer.method}, lr {t.lr}, warm-up {warmup} of {t.steps} steps, "
              f"seq {config.data.seq_len}; {len(steps)} steps logged; loss spikes at steps: {kinds or 'none'}")
        print("| step | loss | grad norm | max logit | largest update ratios | largest grad norms |")
        print("|---|---|---|---|---|---|")
        for r in steps[:args.rows]:
            ratios = sorted(r.get("update_ratios", {}).items(), key=lambda kv: -kv[1])[:args.top]
            norms = sorted(r.get("grad_norms", {}).items(), key=lambda kv: -kv[1])[:args.top]
            logit = f"{r['max_logit']:.1f}" if "max_logit" in r else ""
            print(f"| {r['step']} | {r['loss']:.3f} | {r['grad_norm']:.2f} | {logit} | "
                  f"{', '.join(f'{k} {v:.3f}' for k, v in ratios)} | {', '.join(f'{k} {v:.2f}' for k, v in norms)} |")
        if args.groups:
            keys = args.groups.split(",")
            print("| step | " + " | ".join(f"ratio {k}" for k in keys) + " | " + " | ".join(f"gn {k}" for k in keys) + " |")
            for r in steps[:args.rows]:
                print(f"| {r['step']} | " + " | ".join(f"{r.get('update_ratios', {}).get(k, float('nan')):.3f}" for k in keys)
                      + " | " + " | ".join(f"{r.get('grad_norms', {}).get(k, float('nan')):.3f}" for k in keys) + " |")


def _sequence_losses(model, batch):
    from lostlm.losses import sequence_means
    with torch.no_grad():
        per_token, _ = model(batch[:, :-1], batch[:, 1:], with_lse=False)
    return sequence_means(per_token, batch[:, 1:])


def _peaks(model, batch, rows):
    """{module: (max over the given rows' positions of the output's L2 norm, position)} of the
    embedding and every attention/MLP projection and block output."""
    out, handles = {}, []
    for name, module in model.named_modules():
        if name.endswith(("embed_tokens", "v_proj", "o_proj", "q_proj", "k_proj", "down_proj")) or name.endswith(
                tuple(f"layers.{i}" for i in range(64))):
            def hook(mod, inputs, output, name=name):
                norms = output[rows].float().norm(dim=-1)  # (rows, T)
                flat = int(norms.argmax())
                out[name] = (float(norms.max()), float(norms.median()), divmod(flat, norms.shape[1]))
            handles.append(module.register_forward_hook(hook))
    try:
        _sequence_losses(model, batch)
    finally:
        for h in handles:
            h.remove()
    return out


def _replay(args, until: int) -> Trainer:
    """A trainer resumed from ``args.folder``'s latest checkpoint (in a copy) and trained up to
    step ``until`` (exact resume: the same weights and batches as the original run)."""
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    src = Path(args.folder)
    start = max(int(p.name.split("_")[1]) for p in (src / "checkpoints").glob("step_*")
                if int(p.name.split("_")[1]) <= until)
    shutil.copytree(src / "checkpoints" / f"step_{start:08d}", work / "checkpoints" / f"step_{start:08d}")
    shutil.copy(src / "config.yaml", work / "config.yaml")
    cfg = load_config(work / "config.yaml", [f"train.out_dir={work}", "train.diagnostics=false"])
    trainer = Trainer(cfg)
    while trainer.step < until:
        trainer.train_step(trainer.data.next_batch(cfg.train.batch_size))
    return trainer


def coarse_group(name: str) -> str:
    """embed / head / norm, or attn.qk|attn.vo|mlp + .lowrank|.sparse."""
    from lostlm.diagnostics import group_of
    group = group_of(name)
    if group in ("embed", "head", "norm", "other"):
        return group
    kind = group.split(".")
    block = "mlp" if kind[0] == "mlp" else ("attn.qk" if kind[1] in "qk" else "attn.vo")
    return block + (".sparse" if group.endswith(".sparse") else ".lowrank")


def revert(args) -> None:
    """Loss on the spike batch with the weights before it, each coarse group's last update undone."""
    trainer = _replay(args, args.spike_step - 2)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train_step(trainer.data.next_batch(trainer.cfg.train.batch_size))
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = trainer.data.next_batch(trainer.cfg.train.batch_size)[: args.rows]
    model.eval()
    print(f"batch of step {args.spike_step} (first {args.rows} sequences), loss with the weights after step "
          f"{trainer.step}: {_sequence_losses(model, batch).mean():.3f}")
    groups = sorted({coarse_group(n) for n in before})
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(before[n])
        print(f"  every update of step {trainer.step} undone: {_sequence_losses(model, batch).mean():.3f}")
        for group in groups:
            for n, p in params.items():
                p.copy_(before[n] if coarse_group(n) == group else after[n])
            undone = _sequence_losses(model, batch).mean()
            for n, p in params.items():
                p.copy_(after[n] if coarse_group(n) == group else before[n])
            only = _sequence_losses(model, batch).mean()
            print(f"  {group}: its update undone {undone:.3f}; only its update applied {only:.3f}")


def probe(args) -> None:
    """Replay to the weights before ``--spike-step`` and dissect that step's batch."""
    trainer = _replay(args, args.spike_step - 1)
    bs = trainer.cfg.train.batch_size
    model = trainer.model
    model.eval()
    batches = {args.spike_step + i: trainer.data.next_batch(bs) for i in range(2)}
    for step, batch in batches.items():
        losses = _sequence_losses(model, batch)
        print(f"weights after step {trainer.step}, batch of step {step}: mean loss {losses.mean():.3f}; "
              f"per sequence {[round(float(v), 2) for v in losses]}")
    batch = batches[args.spike_step]
    losses = _sequence_losses(model, batch)
    bad = (losses > losses.median() + 1.0).nonzero().flatten()
    print(f"sequences > median + 1 nat: {bad.tolist()}")
    rows = bad if len(bad) else torch.arange(bs)
    good = (losses <= losses.median() + 1.0).nonzero().flatten()
    for label, r in (("bad", rows), ("good", good)):
        if not len(r):
            continue
        print(f"-- activation peaks over the {label} sequences: module: max ‖out‖ (median) at (row, position)")
        for name, (peak, median, (row, pos)) in _peaks(model, batch, r).items():
            token = int(batch[r[row], pos])
            print(f"{name}: {peak:.1f} ({median:.1f}) at row {int(r[row])} position {pos} token {token}")
    # ablations on the spike batch: each LOST branch switched off in turn
    from lostlm.layers import LOSTLinear
    layers = [m for m in model.modules() if isinstance(m, LOSTLinear)]
    if layers:
        kinds = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        named = [(n, m) for n, m in model.named_modules() if isinstance(m, LOSTLinear)]
        for label, chosen in [("all", kinds), *[(k, (k,)) for k in kinds]]:
            picked = [m for n, m in named if n.endswith(chosen)]
            saved = [m.sparse_weight.detach().clone() for m in picked]
            with torch.no_grad():
                for m in picked:
                    m.sparse_weight.zero_()
                print(f"sparse branch of {label} switched off: loss {_sequence_losses(model, batch).mean():.3f}")
                for m, w in zip(picked, saved):
                    m.sparse_weight.copy_(w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("out")
    p.add_argument("--factor-lr-scale", type=float, default=1.0)
    p.add_argument("--lr-scale", action="append", default=[], type=_lr_scale, metavar="SUFFIX=SCALE",
                   help="lr multiplier for the parameters whose names end with SUFFIX, e.g. sparse_weight=0.3 "
                        "(repeat the flag for more groups)")
    p.add_argument("--start-from", metavar="FOLDER:STEP", help="continue a copy of FOLDER from its checkpoint at STEP")
    # the config overrides (KEY=VALUE) are collected in main(), before or after the options
    p = sub.add_parser("probe")
    p.add_argument("folder")
    p.add_argument("work")
    p.add_argument("--spike-step", type=int, required=True)
    p = sub.add_parser("revert")
    p.add_argument("folder")
    p.add_argument("work")
    p.add_argument("--spike-step", type=int, required=True)
    p.add_argument("--rows", type=int, default=16)
    p = sub.add_parser("report")
    p.add_argument("folders", nargs="+")
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--groups", default="", help="comma-separated groups to tabulate side by side")
    p = sub.add_parser("pair")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--excess", type=float, default=0.5, help="nats of A over B that count as A's own spike")
    p.add_argument("--rows", type=int, default=200)
    args, extra = parser.parse_known_args()
    if args.command == "run":
        args.overrides = [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if a not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    torch.set_num_threads(2)
    try:
        {"run": run, "report": report, "probe": probe, "revert": revert, "pair": pair}[args.command](args)
    except LostLMError as exc:  # e.g. a signal stopped the run: it saved, and the same command resumes
        sys.exit(f"error: {exc}")
    except BrokenPipeError:  # the table piped into `head`
        sys.exit(0)


if __name__ == "__main__":
    main()

"""``lostlm export``: a trained run written for use outside lostlm.

    lostlm export runs/lost-tiny --out out/lost-hf            # lost_llama folder (needs `import lostlm`)
    lostlm export runs/lost-tiny --dense --out out/llama      # plain LlamaForCausalLM (transformers alone)

This module only reads the run folder (``load_trained_run``) and hands the model to
:mod:`lostlm.interop`: ``--dense`` to :func:`lostlm.interop.export.save_dense` (mergeable
methods only), otherwise to :func:`lostlm.interop.lost_llama.save_hf`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .interop.export import DTYPES, save_dense
from .interop.lost_llama import save_hf
from .loading import load_trained_run


def export_dense(run_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """A trained run (folder or checkpoint folder) as a plain transformers Llama folder."""
    run = load_trained_run(Path(run_path))
    return save_dense(run.model, out_dir, run.tokenizer, dtype)


def export_lost(run_path: str | Path, out_dir: str | Path) -> Path:
    """A trained run as a lost_llama folder (loads with AutoModelForCausalLM after ``import lostlm``)."""
    return save_hf(load_trained_run(Path(run_path)), out_dir)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run as a transformers folder (lost_llama, or --dense plain llama)")
    p.add_argument("path", help="run folder (uses its latest checkpoint) or a checkpoints/step_* folder")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--dense", action="store_true",
                   help="merge the layers into a plain LlamaForCausalLM (needs a mergeable method)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="--dense: dtype of the saved weights")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    out = export_dense(args.path, args.out, args.dtype) if args.dense else export_lost(args.path, args.out)
    kind = "llama (transformers alone)" if args.dense else "lost_llama (import lostlm first)"
    print(f"wrote {out}: {kind}")
    return 0

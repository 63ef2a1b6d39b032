"""Move bench run folders to the key today's code gives their config (after a maths-neutral edit).

    PYTHONPATH=src python bench/rekey.py bench/results/tuned-tiny ...           # dry run: what would move
    PYTHONPATH=src python bench/rekey.py --apply bench/results/tuned-tiny ...   # move them (git mv if tracked)

A bench run's folder is named by its key (``lostlm.bench.runkey``), which fingerprints the code
of ``model.py``, ``optim.py``, ``losses.py`` and ``convert.py`` as a whole: any edit there moves
every run to a new folder, and finished runs are no longer found. That is the right default.
When an edit is known not to change the numbers of some runs (a new option whose default keeps
the old path, a refactor shown bit-identical by a rerun), this script moves those runs to their
new key instead of training them again. It is a deliberate, reviewed step: run the dry run,
check that the edit cannot touch the runs it lists, commit the moves with the evidence. Never
use it to hide an edit that changes a run's maths.

For each ``<results>/<stage>/<variant>/<lr-hash>/seed<k>/bench-config.yaml`` it loads the config
the run trained with, keys it in the precision the run recorded (``summary.json`` or the
newest checkpoint's ``state.json``: ``auto`` resolves per machine), and compares the folder name.
All seeds of one folder must agree, and the target must not exist.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from lostlm.bench.runkey import key_folder
from lostlm.configs import load_config
from lostlm.errors import LostLMError

PRECISION_SETTING = {"float32": "fp32", "bfloat16": "bf16"}


def recorded_precision(run: Path) -> str | None:
    """The precision the run trained in, from its summary or its newest checkpoint."""
    candidates = [run / "summary.json", *sorted(run.glob("checkpoints/step_*/state.json"), reverse=True)]
    for path in candidates:
        try:
            value = json.loads(path.read_text()).get("precision")
        except (OSError, ValueError, AttributeError):
            continue
        if value in PRECISION_SETTING:
            return value
    return None


def planned_moves(results: Path) -> tuple[dict[Path, Path], list[str]]:
    """``{old lr-folder: new lr-folder}`` and the problems that stop a folder from moving."""
    targets: dict[Path, set[str]] = {}
    problems = []
    for config_file in sorted(results.glob("*/*/*/seed*/bench-config.yaml")):
        run = config_file.parent
        try:
            cfg = load_config(config_file)
        except LostLMError as exc:
            problems.append(f"{run}: {exc}")
            continue
        precision = recorded_precision(run)
        if precision is None:
            problems.append(f"{run}: no summary.json or checkpoint records its precision; left where it is")
            continue
        cfg.train.precision = PRECISION_SETTING[precision]
        targets.setdefault(run.parent, set()).add(key_folder(cfg))
    moves = {}
    for folder, names in targets.items():
        if len(names) > 1:
            problems.append(f"{folder}: its seeds key differently ({', '.join(sorted(names))}); left where it is")
        elif (name := names.pop()) != folder.name:
            if (folder.parent / name).exists():
                problems.append(f"{folder}: the target {name} already exists; left where it is")
            else:
                moves[folder] = folder.parent / name
    return moves, problems


def move(old: Path, new: Path) -> None:
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(old)], capture_output=True).returncode == 0
    if tracked:
        subprocess.run(["git", "mv", str(old), str(new)], check=True)
    else:
        old.rename(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench results folders (holding runs/ or sweep/)")
    parser.add_argument("--apply", action="store_true", help="move the folders (default: only list them)")
    args = parser.parse_args(argv)
    total = 0
    for results in args.results:
        if not results.is_dir():
            print(f"error: {results} is not a folder", file=sys.stderr)
            return 2
        moves, problems = planned_moves(results)
        for problem in problems:
            print(f"skip: {problem}")
        for old, new in moves.items():
            print(f"{'move' if args.apply else 'would move'}: {old} -> {new.name}")
            if args.apply:
                move(old, new)
        total += len(moves)
    print(f"{total} folder(s) {'moved' if args.apply else 'to move'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

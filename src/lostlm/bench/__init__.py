"""Side-by-side benchmarks: methods (and named variants) × seeds on one base config.

    lostlm bench bench/tiny.yaml                         # run everything not finished yet
    lostlm bench bench/tiny.yaml --lock /tmp/lostlm-cpu.lock   # one run at a time on a shared box
    lostlm bench bench/tiny.yaml --dry-run               # list the runs and their folders
    lostlm bench bench/tuned-tiny.yaml --threads 1       # lr sweep per method, then seeds at the chosen lr
    lostlm bench --report bench/results/tiny             # rebuild table, JSON and plots
    lostlm bench --peak                                  # measure and store the matmul FLOP/s

The package, low to high (each module imports only those above it):

- :mod:`.runkey` — a run's key: the hash of its maths (resolved config + the code its method
  reaches), part of every run folder's name so stale runs are never reused.
- :mod:`.stats` — paired statistics of each variant against the recipe's reference, per seed.
- :mod:`.recipe` — parse and check a recipe YAML (see its docstring for the format); each
  variant × seed's folder and config.
- :mod:`.sweep` — learning-rate sweeps: stage one's choice and grid extension, ``sweep.json``,
  ``lr_from``.
- the measured matmul rate (MFU denominator) comes from :mod:`lostlm.peak`, cached in the data cache.
- :mod:`.report` — collect the finished runs, aggregate over seeds, write ``results.md``,
  ``results.json`` and the PNGs (through :func:`lostlm.plots.plot_bench`).
- :mod:`.runner` — the lock, one ``lostlm train`` subprocess per run, resume by skipping runs
  with a ``summary.json``.
- :mod:`.command` — the ``lostlm bench`` sub-command.

Every variant × seed is one ``Trainer(cfg).train()`` in its own folder
``<results>/runs/<variant>/lr<lr>-<hash>/seed<k>/`` (stage one of a sweep: ``sweep/``). Same seed ⇒ same initial W0 and the same data order for
every method. Outputs in the results folder: ``results.md`` (the table), ``results.json``
(every run's summary plus the aggregates), ``loss_vs_tokens.png``, ``loss_vs_time.png``,
``ppl_vs_memory.png``. MFU is against ``lostlm bench --peak`` (the measured bf16/fp32 matmul
rate of this machine, cached), model FLOPs from the analytic counter in :mod:`lostlm.costs`.
"""

from ..peak import measure_peak, training_dtype
from .command import cmd_bench, register
from .recipe import RESULTS_ROOT, Recipe, Variant, load_recipe, run_config, run_dir
from .report import collect, format_results, machine_info, write_report
from .runner import run_bench

__all__ = ["RESULTS_ROOT", "Recipe", "Variant", "cmd_bench", "collect", "format_results", "load_recipe", "machine_info",
           "measure_peak", "register", "run_bench", "run_config", "run_dir", "training_dtype", "write_report"]

"""Load tests, sweeps and tuning against Triton.

- :func:`run_sweep` / :func:`bench`: perf_analyzer-style sweeps (concurrency or request rate, windows until
  stable, percentiles, Triton's server-side split per model) -> CSV, JSON, HTML.
- :class:`Tuner` / :func:`tune`: Model Analyzer-style search for the fastest config within a p99 budget
  (ensembles too); the pure search is :mod:`~tritonforge.loadtest.search`, the writers
  :mod:`~tritonforge.loadtest.tune_output`.
- :func:`write_report`: the HTML report with its PNGs.
- ``tritonforge.loadtest.user.TritonUser``: the locust user. Import it from its module: importing locust
  monkey-patches the process with gevent, so this package never does it for you.

Example:
    >>> from tritonforge.loadtest import SweepSettings, bench
    >>> settings = SweepSettings(concurrency=(1, 4))
    >>> result = bench("digits_mlp", settings=settings, output="out")  # doctest: +SKIP
"""

from __future__ import annotations

from tritonforge.loadtest.bench import bench, load_payloads
from tritonforge.loadtest.output import write_results
from tritonforge.loadtest.report import write_report
from tritonforge.loadtest.search import SearchSpace, Trial, TuneResult, coordinate_search
from tritonforge.loadtest.sweep import LevelResult, SweepResult, SweepSettings, run_level, run_sweep
from tritonforge.loadtest.target import inputs_from_config, open_target
from tritonforge.loadtest.tune import Tuner, tune
from tritonforge.loadtest.tune_output import write_tune_outputs, write_winner

__all__ = [
    "LevelResult",
    "SearchSpace",
    "SweepResult",
    "SweepSettings",
    "Trial",
    "TuneResult",
    "Tuner",
    "bench",
    "coordinate_search",
    "inputs_from_config",
    "load_payloads",
    "open_target",
    "run_level",
    "run_sweep",
    "tune",
    "write_report",
    "write_results",
    "write_tune_outputs",
    "write_winner",
]

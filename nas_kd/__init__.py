"""nas_kd: search small CNN students under a MACs/params budget, distilled from a teacher ensemble.

The command line is `python -m nas_kd.search`; the same job from Python is `nas_kd.run`:

    import nas_kd

    result = nas_kd.run(nas_kd.SearchConfig(flops_budget=20_000_000, trials=8))
    print(result.spec, result.test_acc)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nas_kd.core.config import SearchConfig
from nas_kd.core.errors import InputError
from nas_kd.core.versions import __version__

if TYPE_CHECKING:
    from nas_kd.pipeline.run import RunResult

__all__ = ["InputError", "SearchConfig", "__version__", "run"]


def run(cfg: SearchConfig, progress: bool = False) -> RunResult:
    """Run the whole job `python -m nas_kd.search` runs, with `cfg` in place of its flags: check
    the settings, search (resuming the study when it exists), write the report, retrain the winner
    and export it under `cfg.out_dir`. As on the command line, a config that sets no count
    (trials, final_epochs, timeout, study_trials, worker) and no time budget runs for the default
    30-minute time budget. Returns the study and its retrained winner (`RunResult`).
    Bad settings raise `nas_kd.InputError` before any work; `progress` draws progress bars
    (log lines go to stderr either way, and the summary table to stdout)."""
    from nas_kd.core.config import changed_fields, with_default_time_budget
    from nas_kd.pipeline.run import run as run_pipeline  # here, so that `import nas_kd` stays light

    return run_pipeline(with_default_time_budget(cfg, changed_fields(cfg)), progress)

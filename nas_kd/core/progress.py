"""Progress on stderr: log lines and whether progress bars are drawn. The library reports with
these; the command lines (`nas_kd.cli`) are not imported below them."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm.auto import tqdm

from nas_kd.core.units import format_duration


def bars_shown(progress: bool) -> bool:
    """Whether progress bars are drawn: asked for, and stderr is a terminal (tqdm's own rule).
    When they are not, long loops log one line per trial or epoch instead."""
    return progress and sys.stderr.isatty()


def log(message: str) -> None:
    """A progress line on stderr that does not break the progress bars."""
    tqdm.write(f"[nas_kd] {message}", file=sys.stderr)


class RunClock:
    """The run's one clock: seconds since it started (`elapsed`; a resumed run started when its first
    session did, `resume`), and against its `--time-budget` the `[elapsed of budget]` that the trial
    and epoch lines end with, and on a terminal one bar with the time elapsed and left. One is active
    at a time (`RunClock.active`); `tick` moves its bar, at most once a second. Without a budget
    (None) it only tells the time. `start` defaults to now; the tests pass a fake `now`."""

    active: RunClock | None = None

    def __init__(self, budget: float | None = None, start: float | None = None, progress: bool = False,
                 now: Callable[[], float] = time.perf_counter):
        self.budget, self.now = budget, now
        self.start = now() if start is None else start
        self.bar = None
        if budget is not None and bars_shown(progress):
            self.bar = tqdm(total=round(budget), desc="time budget", unit="s", dynamic_ncols=True,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}")
        self.shown = -1.0

    def __enter__(self) -> RunClock:
        if self.budget is not None:
            RunClock.active = self
            self.tick()
        return self

    def __exit__(self, *exc: object) -> None:
        RunClock.active = None
        if self.bar is not None:
            self.bar.close()

    def elapsed(self) -> float:
        return self.now() - self.start

    def resume(self, earlier: float) -> None:
        """Count the `earlier` seconds of a run's earlier sessions as elapsed."""
        self.start -= earlier

    def status(self) -> str:
        return f"[{format_duration(self.elapsed())} of {format_duration(self.budget)}]"

    def tick(self) -> None:
        elapsed = self.elapsed()
        if self.bar is None or elapsed - self.shown < 1.0:
            return
        self.shown = elapsed
        self.bar.n = min(round(elapsed), self.bar.total)
        self.bar.set_postfix_str(f"{format_duration(elapsed)} elapsed, {format_duration(self.budget - elapsed)} left")


def budget_status() -> str:
    """' [3m of 30m]' while a run with a time budget is going, else ''."""
    return f" {RunClock.active.status()}" if RunClock.active is not None else ""


def tick() -> None:
    """Move the run's time-budget bar, if there is one."""
    if RunClock.active is not None:
        RunClock.active.tick()

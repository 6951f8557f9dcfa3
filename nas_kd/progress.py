"""Progress on stderr: log lines and whether progress bars are drawn. The library reports with
these; the command lines (`nas_kd.cli`) are not imported below them."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bars_shown(progress: bool) -> bool:
    """Whether progress bars are drawn: asked for, and stderr is a terminal (tqdm's own rule).
    When they are not, long loops log one line per trial or epoch instead."""
    return progress and sys.stderr.isatty()


def log(message: str) -> None:
    """A progress line on stderr that does not break the progress bars."""
    tqdm.write(f"[nas_kd] {message}", file=sys.stderr)

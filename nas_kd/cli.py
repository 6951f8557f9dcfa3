"""Command-line plumbing shared by `nas_kd.search`, `nas_kd.retrain` and `nas_kd.report`."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import NoReturn

from tqdm.auto import tqdm


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (and exit 2), not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def base_parser(prog: str, description: str) -> OneLineParser:
    return OneLineParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def quiet_libraries() -> None:
    """Optuna logs every trial at INFO; nas_kd shows its own progress instead."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.getLogger("ptflops").setLevel(logging.ERROR)


def log(message: str) -> None:
    """A progress line on stderr that does not break the progress bars."""
    tqdm.write(f"[nas_kd] {message}", file=sys.stderr)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2

"""Command-line plumbing shared by `nas_kd.search`, `nas_kd.retrain` and `nas_kd.report`."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from typing import NoReturn

from tqdm.auto import tqdm


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (and exit 2), not the usage block, and a
    negative value (`--flops-budget -5M`) reaches the flag's own check instead of being taken
    for an unknown option."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        joined, i = [], 0
        while i < len(args):
            if (args[i].startswith("--") and "=" not in args[i] and i + 1 < len(args)
                    and re.match(r"^-[\d.]", args[i + 1])):
                joined.append(f"{args[i]}={args[i + 1]}")
                i += 2
            else:
                joined.append(args[i])
                i += 1
        return super().parse_args(joined, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def base_parser(prog: str, description: str) -> OneLineParser:
    return OneLineParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def study_parser(prog: str, description: str) -> OneLineParser:
    """A parser for commands that work on a finished study: --study-name, --storage, --out-dir."""
    parser = base_parser(prog, description)
    parser.add_argument("--study-name", required=True)
    parser.add_argument("--storage", help="storage URL (default: sqlite:///<out-dir>/<study-name>.db)")
    parser.add_argument("--out-dir", default="studies",
                        help="where the search wrote its outputs; this command writes to OUT_DIR/<study-name>/ (default: studies)")
    return parser


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

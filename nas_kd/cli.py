"""Command-line plumbing shared by the command lines (`nas_kd.search`, `nas_kd.retrain`,
`nas_kd.report`, ...): flag parsing and the one-line error. No library module imports it."""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from nas_kd.core.errors import InputError


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


def number(kind: type, minimum: float, below: float | None = None) -> Callable[[str], Any]:
    """An argparse type: a finite int or float >= minimum (and < below, when given)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if value < minimum or (below is not None and value >= below):
            bound = f">= {minimum}" if below is None else f"in [{minimum}, {below})"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        return value
    return parse


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
    # "Trial N failed with value nan": nas_kd logs the trial's reason itself
    logging.getLogger("optuna.study._optimize").setLevel(logging.ERROR)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def typed(convert: Callable[[str, str], Any], flag: str) -> Callable[[str], Any]:
    """An argparse type from one of nas_kd's parsers (`parse_count`, `parse_latency`, `parse_bytes`)."""
    def parse(text: str) -> Any:
        try:
            return convert(text, flag)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def fraction(zero: bool = True) -> Callable[[str], float]:
    """A fraction below 1: from 0 (`zero`), or above 0."""
    accepted = "in [0, 1)" if zero else "between 0 and 1 (exclusive)"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (0 <= value < 1 if zero else 0 < value < 1):
            raise argparse.ArgumentTypeError(f"expected a fraction {accepted}, got {text!r}")
        return value
    return parse


def arch_path(text: str) -> tuple[str, str]:
    arch, sep, path = text.partition("=")
    if not sep or not arch or not path:
        raise argparse.ArgumentTypeError(f"expected ARCH=PATH, e.g. resnet56=weights.safetensors; got {text!r}")
    return arch, path

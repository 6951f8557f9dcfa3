"""`python -m nas_kd <command> [flags]`, and the console script `nas-kd <command> [flags]`: one entry to
every command. Each command is also `python -m nas_kd.<module>`, as before (the table below)."""

from __future__ import annotations

import importlib
import sys

# command -> (the module whose main(argv) runs it, what it does)
COMMANDS = {
    "search": ("nas_kd.search", "search a student under a budget, report, retrain and export the winner"),
    "retrain": ("nas_kd.retrain", "retrain a study's winner, a trial, a new budget or an online ensemble"),
    "report": ("nas_kd.report", "write a study's HTML report again"),
    "export": ("nas_kd.export", "export a student checkpoint to ONNX and int8 ONNX, checked"),
    "latency": ("nas_kd.latency", "latency tables for a device, and one spec's latency and memory here"),
    "teachers": ("nas_kd.teachers", "list, train and ship teachers"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    return ("usage: nas-kd <command> [flags]   (or python -m nas_kd <command> [flags])\n\ncommands:\n"
            + "\n".join(lines) + "\n\nnas-kd <command> --help lists a command's flags.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; known: {', '.join(COMMANDS)} (nas-kd --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

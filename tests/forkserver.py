"""A fork server for the tests' command-line runs (`conftest.run_cli`).

Every `python -m nas_kd.<command>` a test runs used to start a new interpreter and import torch,
ptflops (torchvision, torch._dynamo), optuna with SQLAlchemy and Alembic, plotly and the ONNX
exporter again: about 4 s of a 2-core machine's CPU per run, over a hundred runs a session. This
process imports them once and forks a child per run. The child is a process of its own, as the
command would be: it changes into the run's folder, takes the run's environment, writes its
stdout and stderr to files and runs the module as `__main__` (`runpy`), so no state passes from
one run to the next. Only what the imports leave is shared, and the server runs nothing else
(no torch operation, so no thread pool exists when it forks).

Protocol, one JSON object per line: a request on stdin ({"module", "args", "cwd", "env", "out",
"err"}); the server answers {"pid": ...} once the child is forked, then {"code": ...} when it has
exited (a child killed by signal N: -N, as `subprocess` reports it).

Tests that signal or time a real process (a killed worker, a killed run) start their own with
`subprocess`; `NAS_KD_TEST_FORK=0` makes `run_cli` start a new interpreter every time as well.
"""

from __future__ import annotations

import json
import os
import sys

PRELOAD = ("torch", "torchvision", "ptflops", "optuna", "optuna.storages._rdb.storage", "alembic.command",
           "alembic.migration", "sqlalchemy.dialects.sqlite", "plotly.graph_objects", "plotly.io", "pandas", "yaml",
           "onnx", "onnxruntime", "onnxruntime.quantization", "onnxscript", "torch.onnx", "torch.export",
           "nas_kd.pipeline", "nas_kd.export", "nas_kd.report")


def run_child(request: dict, channels: tuple[int, int]) -> None:
    """In the forked child: become the command, run it, exit with its status. Never returns."""
    code = 1
    try:
        for fd in channels:
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, request["out"]), (2, request["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        import runpy
        import threading
        import traceback

        if "OMP_NUM_THREADS" in request["env"]:  # as a new interpreter would read it at its first torch op
            import torch

            torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))

        module = request["module"]
        sys.argv = [module, *request["args"]]
        sys.modules.pop(module, None)  # run as __main__, as `python -m` does, not the copy the server imported
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - as the interpreter would, print it and fail
            traceback.print_exc()
            code = 1
        # what an interpreter's exit does: wait for non-daemon threads, run atexit, flush
        try:
            threading._shutdown()
        except Exception:  # noqa: BLE001
            pass
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code if 0 <= code < 256 else 1)


def serve() -> None:
    requests = os.fdopen(os.dup(0), "r")
    answers = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)  # a stray print of the server's goes to its stderr, never into the protocol
    for name in PRELOAD:
        __import__(name)
    answers.write(json.dumps({"ready": os.getpid()}) + "\n")
    answers.flush()
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request, (requests.fileno(), answers.fileno()))
        answers.write(json.dumps({"pid": pid}) + "\n")
        answers.flush()
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        answers.write(json.dumps({"code": code}) + "\n")
        answers.flush()


if __name__ == "__main__":
    serve()

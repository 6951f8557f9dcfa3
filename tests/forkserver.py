"""A fork server for the tests' command-line runs (`conftest.run_cli`).

Every `python -m nas_kd.<command>` a test runs used to start a new interpreter and import torch,
ptflops (torchvision, torch._dynamo), optuna with SQLAlchemy and Alembic, plotly and the ONNX
exporter again: about 4 s of CPU per run on the 2-core machine, over a hundred runs a session.
This process imports them once and forks a child per run. The child is a process of its own, as
the command would be: it changes into the run's folder, takes the run's environment, reseeds
Python's and numpy's global random state, writes its stdout and stderr to files (stderr starting
with whatever the imports printed, as a new interpreter's would) and runs the module as
`__main__` (`runpy`), so no state passes from one run to the next. The server runs nothing else:
no torch operation, so no thread pool exists when it forks.

What differs from a new interpreter: variables read when the interpreter or a library starts
(`PYTHONHASHSEED`, `PYTHONPATH`, `MKL_*`, ...) are those of the server's start (`run_cli` starts a
new interpreter where a run asks for others); `sys.path[0]` is the repository root; the child ends
with `os._exit` after its threads, `atexit` and a flush, so objects are not finalised.

Protocol, one JSON object per line: a request on stdin ({"module", "args", "cwd", "env", "out",
"err", "timeout"}), one answer per request on stdout ({"code": ..., "timed_out": ...}). The server
waits for the child itself and kills it at its timeout (code -9), so the client only reads lines.
A child killed by signal N has code -N, as `subprocess` reports it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from typing import NoReturn

PRELOAD = ("torch", "torchvision", "ptflops", "numpy", "optuna", "optuna.storages._rdb.storage", "alembic.command",
           "alembic.migration", "sqlalchemy.dialects.sqlite", "plotly.graph_objects", "plotly.io", "pandas", "yaml",
           "onnx", "onnxruntime", "onnxruntime.quantization", "onnxscript", "torch.onnx", "torch.export",
           "nas_kd.pipeline.run", "nas_kd.device.export", "nas_kd.reporting.html")


def run_child(request: dict, channels: tuple[int, int], startup_err: bytes) -> NoReturn:
    """In the forked child: become the command, run it, exit with its status. Never returns."""
    code = 1
    try:
        for fd in channels:
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, request["out"]), (2, request["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.write(2, startup_err)
        code = run_module(request["module"], request["args"], request["env"])
    except BaseException:  # before the command ran (a missing folder, say): say so on stderr
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)


def run_module(module: str, args: list[str], env: dict[str, str]) -> int:
    """Run `python -m module args` in this process; its exit status, as an interpreter's would be."""
    import atexit
    import random
    import runpy
    import threading
    import traceback

    import numpy as np

    random.seed()  # from the OS, as at a new interpreter's start, not the server's state
    np.random.seed()
    if "OMP_NUM_THREADS" in env and env["OMP_NUM_THREADS"].isdigit():  # as torch's first operation would read it
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [module, *args]
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
    except BaseException:  # as the interpreter would: print it and fail
        traceback.print_exc()
        code = 1
    # what an interpreter's exit does: wait for non-daemon threads, then run atexit
    threading._shutdown()
    atexit._run_exitfuncs()
    return code


def wait(pid: int, timeout: float) -> tuple[int, bool]:
    """The child's exit code (-N for signal N) and whether it was killed at `timeout` seconds."""
    deadline = time.monotonic() + timeout
    timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            timed_out = True
            break
        time.sleep(0.02)
    return (-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)), timed_out


def serve() -> None:
    requests = os.fdopen(os.dup(0), "r")
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    err = os.dup(2)
    with tempfile.TemporaryFile() as startup:
        # what the imports print (warnings, say) goes to each child's stderr, as a new interpreter's would
        os.dup2(startup.fileno(), 1)
        os.dup2(startup.fileno(), 2)
        for name in PRELOAD:
            __import__(name)
        sys.stdout.flush()
        sys.stderr.flush()
        startup.seek(0)
        startup_err = startup.read()
    os.dup2(err, 1)  # a stray print of the server's goes to its stderr, never into the protocol
    os.dup2(err, 2)
    answers.write(json.dumps({"ready": os.getpid()}) + "\n")
    answers.flush()
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request, (requests.fileno(), answers.fileno()), startup_err)
        code, timed_out = wait(pid, request["timeout"])
        answers.write(json.dumps({"code": code, "timed_out": timed_out}) + "\n")
        answers.flush()


if __name__ == "__main__":
    serve()

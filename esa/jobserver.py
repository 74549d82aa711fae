"""A job server for local runs: each ``esa run`` job forks from a process that has already
imported torch, transformers and ESA's step modules, instead of importing them itself.

Why: a model job spends ~4.5 s importing before it computes (torch 1.0 s, ESA's model steps
1.3 s, the transformers model class 2.1 s, measured on 2 cores), the same in every job; the
default study runs ~20 such jobs and the test suite a few hundred.

How: where Snakemake executes the jobs itself (``workflow.local_exec``, config ``job_server``),
its ``onstart`` starts the server (:func:`start`) and hands its address to the jobs in
``ESA_JOB_SERVER``. ``esa run`` then connects (:func:`delegate`) and sends its arguments,
working directory, umask, environment and its stdin/stdout/stderr file descriptors; the server
forks a child that takes all of them on, sets torch's threads to the job's ``OMP_NUM_THREADS``
and runs the step exactly as ``esa run`` would, in the job's own files. The job's process
(the client) forwards SIGINT, SIGTERM and SIGHUP to the child and exits with the child's exit
status; a child whose client dies, however it dies, kills itself (it watches the connection),
so a killed job leaves no step running. The server imports a study model's class the first
time a job names its ``model.json``, before forking, so later jobs inherit it.

A job runs without the server, as before, where no address is set (cluster jobs, config
``job_server: false``), where the server cannot be reached, or where it refuses the job: another
user, or another Python (a ``--use-conda`` environment). The results are the same bits either
way (tests/test_jobserver.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import uuid
from pathlib import Path

ADDRESS_ENV = "ESA_JOB_SERVER"
_HEADER = struct.Struct("!Q")  # the length of the JSON message that follows
_STREAMS = 3  # stdin, stdout, stderr
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _send(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(conn, [_HEADER.pack(len(data))], fds)
    else:
        conn.sendall(_HEADER.pack(len(data)))
    conn.sendall(data)


def _receive_exactly(conn: socket.socket, size: int) -> bytes:
    parts = []
    while size:
        part = conn.recv(size)
        if not part:
            raise EOFError
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def _receive(conn: socket.socket, with_fds: bool = False) -> tuple[dict, list[int]]:
    """One message (and the file descriptors sent with it); EOFError when the peer has gone."""
    if with_fds:
        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, _STREAMS)
        if not header:
            raise EOFError
        header += _receive_exactly(conn, _HEADER.size - len(header))
    else:
        header, fds = _receive_exactly(conn, _HEADER.size), []
    return json.loads(_receive_exactly(conn, _HEADER.unpack(header)[0])), fds


# ---- the client: an ``esa run`` job


def delegate(argv: list[str]) -> int | None:
    """Run ``esa`` with ``argv`` in the job server; its exit status, or None where there is no
    server to run it (the caller runs the step itself)."""
    address = os.environ.get(ADDRESS_ENV)
    if not address:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect("\0" + address)  # an abstract socket: no file to clean up
        _send(conn, {"argv": argv, "cwd": os.getcwd(), "umask": _umask(), "env": dict(os.environ),
                     "executable": sys.executable}, list(range(_STREAMS)))
        reply, _ = _receive(conn)
    except (OSError, EOFError):
        conn.close()
        return None
    if "pid" not in reply:  # refused
        conn.close()
        return None
    child = reply["pid"]
    for number in _FORWARDED:
        signal.signal(number, lambda received, _frame: os.kill(child, received))
    try:
        return int(_receive(conn)[0]["exit"])
    except (OSError, EOFError):
        print(f"esa: error: the step's process {child} ended without an exit status (killed?)", file=sys.stderr)
        return 1
    finally:
        conn.close()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- the server


def _preload() -> None:
    """What every job imports: torch, the step modules, transformers' model and tokenizer bases."""
    import importlib

    from .step_table import STEPS

    for module in sorted({step.module for step in STEPS.values()}):
        importlib.import_module(module)
    import transformers

    for name in ("AutoModelForCausalLM", "AutoTokenizer", "PreTrainedModel", "PreTrainedTokenizerFast"):
        getattr(transformers, name)


def _preload_model_class(argv: list[str], loaded: set[str]) -> None:
    """Import the ``*ForCausalLM`` class of the local model a job names (``model=<model.json>``),
    once; a model not yet materialised, or a hub id, is left to the job."""
    from .models import causal_lm_class, load_config, source_from_ref

    for item in argv:
        name, _, path = item.partition("=")
        if name != "model" or path in loaded or not Path(path).is_file():
            continue
        loaded.add(path)
        try:
            source = source_from_ref(path)
            if source.kind != "hub":
                causal_lm_class(load_config(source))
        except Exception as err:  # best effort: the job itself reports what is wrong with its model
            print(f"job server: not preloading {path}: {err}", file=sys.stderr, flush=True)


def _refusal(conn: socket.socket, request: dict, fds: list[int]) -> str | None:
    uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
    if uid != os.getuid():
        return f"user {uid}, not {os.getuid()}"
    if request.get("executable") != sys.executable:
        return f"Python {request.get('executable')}, not {sys.executable}"
    if len(fds) != _STREAMS:
        return f"{len(fds)} file descriptors, not {_STREAMS}"
    return None


def _run_child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: become the job, run it, report its exit status; never returns."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.pop(ADDRESS_ENV, None)
        for number in (*_FORWARDED, signal.SIGCHLD):
            signal.signal(number, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _fresh_state(request["env"])

        def watch() -> None:  # the client gone (killed with the job): the step goes with it
            while True:
                try:
                    if not conn.recv(1):
                        break
                except InterruptedError:
                    continue
                except OSError:
                    break
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, daemon=True).start()
        _send(conn, {"pid": os.getpid()})
        from .cli import main

        sys.argv = [sys.argv[0], *request["argv"]]
        code = main(request["argv"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            import logging

            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            _send(conn, {"exit": code})
        finally:
            os._exit(code)


def _fresh_state(env: dict) -> None:
    """What a new process would have: its own unseeded random streams, the job's torch threads."""
    import random

    import numpy as np
    import torch

    random.seed()
    np.random.seed()
    threads = env.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def serve(address: str, parent: int) -> None:
    """Accept jobs at ``address`` until process ``parent`` (the Snakemake run) is gone."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(64)  # jobs that connect while the imports run wait here
    _preload()
    listener.settimeout(0.2)
    loaded: set[str] = set()
    while os.getppid() == parent:
        _reap()
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        fds: list[int] = []
        try:
            conn.settimeout(10)
            request, fds = _receive(conn, with_fds=True)
            conn.settimeout(None)
            refusal = _refusal(conn, request, fds)
            if refusal:
                _send(conn, {"refused": refusal})
                continue
            _preload_model_class(request["argv"], loaded)
            sys.stdout.flush()
            sys.stderr.flush()
            child = os.fork()
            if child == 0:
                listener.close()
                _run_child(conn, request, fds)
            print(f"job server: pid {child}: esa {' '.join(request['argv'][:2])}", file=sys.stderr, flush=True)
        except (OSError, EOFError, ValueError, KeyError) as err:
            print(f"job server: a request failed: {err!r}", file=sys.stderr, flush=True)
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()


def _reap() -> None:
    """Collect the exit of finished children (each reports its status to its client itself)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


class Server:
    """The job server of one Snakemake run (``onstart`` starts it, ``onsuccess``/``onerror`` stop
    it); its log is ``.snakemake/esa-job-server.log``."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def start(self) -> str:
        """Start the server; the name of its abstract socket, for ``ESA_JOB_SERVER``."""
        name = f"esa-job-server-{uuid.uuid4().hex}"  # of an abstract socket (a NUL byte before it)
        log = Path(".snakemake") / "esa-job-server.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "esa.jobserver", name, str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return name

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None


if __name__ == "__main__":
    serve("\0" + sys.argv[1], int(sys.argv[2]))

"""Run the command-line entry points (train.py, evaluate.py, ``python -m serengeti.<module>``) as a user would.

:func:`run_in_process` executes the script file itself (``runpy``, run as ``__main__``) with the given
argv, working directory and environment, and returns what ``subprocess.run`` would: the exit status, stdout and
stderr (warnings included, as the interpreter's default filters show them). It runs the same code as
``python train.py ...`` without the 3-8 s each new interpreter spends importing torch, Lightning and Hydra, and
puts back what a run changes in this process (environment, working directory, torch threads, signal handlers,
logging, Hydra's global state).

:func:`run_subprocess` starts a real interpreter: for what only a separate process shows (signals, a killed
process, DDP spawning, variables read at interpreter start, a real pipe or log file). Each entry point keeps at
least one such test.

:func:`start_forked` runs a command line in a separate process forked from a server that has imported torch,
Lightning and Hydra once (``multiprocessing``'s fork server, single-threaded when it forks): a real process to
signal or kill, with its own exit status and stderr, without a new interpreter's imports each time.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]

#: what the tests' command lines run with: this checkout's sources, one-line errors, one thread per process
ENV = {"PYTHONPATH": str(ROOT / "src"), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}

_SIGNALS = [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, getattr(signal, "SIGUSR1", None),
                        getattr(signal, "SIGUSR2", None)) if s is not None]


def _command(script: str, args: list[str]) -> list[str]:
    """``python SCRIPT ARGS`` for a file under the repository root, ``python -m MODULE ARGS`` for ``-m MODULE``."""
    if script.startswith("-m "):
        return [sys.executable, "-m", script[3:], *args]
    return [sys.executable, str(ROOT / script), *args]


def _environment(env: dict | None) -> dict[str, str]:
    """This process's environment with :data:`ENV` and ``env`` on top (a value of None removes the variable)."""
    return {k: v for k, v in {**os.environ, **ENV, **(env or {})}.items() if v is not None}


def run_subprocess(script: str, args: list[str], cwd: str | os.PathLike = ROOT, env: dict | None = None,
                   timeout: float = 300) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` (or ``-m MODULE``) in a new interpreter with :func:`_environment` of ``env``."""
    return subprocess.run(_command(script, args), cwd=cwd, env=_environment(env), capture_output=True, text=True,
                          timeout=timeout)


def start_subprocess(script: str, args: list[str], cwd: str | os.PathLike = ROOT, env: dict | None = None,
                     stdout=subprocess.DEVNULL) -> subprocess.Popen:
    """:func:`run_subprocess` without waiting: a ``Popen`` with stderr piped (text), e.g. to send it a signal."""
    return subprocess.Popen(_command(script, args), cwd=cwd, env=_environment(env), stdout=stdout,
                            stderr=subprocess.PIPE, text=True)


class ForkedRun:
    """The part of ``subprocess.Popen`` the tests use, for a run started by :func:`start_forked`."""

    def __init__(self, process: multiprocessing.Process, stderr_path: str, remove_stderr: bool = True) -> None:
        self._process, self._stderr_path, self._remove_stderr = process, stderr_path, remove_stderr
        self.pid = process.pid
        self.stderr = open(stderr_path)  # read by the test while and after the run writes it

    @property
    def returncode(self) -> int | None:
        """The exit status; ``-N`` for a process killed by signal ``N``; None while it runs."""
        return self._process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"forked run {self.pid}", timeout)
        if self._remove_stderr:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._stderr_path)  # the open handle still reads it
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[None, str]:
        self.wait(timeout)
        return None, self.stderr.read()


def _forked_main(stdout_path: str, stderr_path: str, function, *args) -> None:
    """In the forked child: stdout to ``stdout_path``, stderr to ``stderr_path`` (both appended),
    ``function(*args)``, then what an interpreter runs at exit (the fork server's children end in ``os._exit``)."""
    os.dup2(os.open(stdout_path, os.O_WRONLY | os.O_APPEND), 1)
    os.dup2(os.open(stderr_path, os.O_WRONLY | os.O_APPEND), 2)
    try:
        function(*args)
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001  (the interpreter prints it and exits 1)
        traceback.print_exc()
        raise SystemExit(1) from None
    finally:
        atexit._run_exitfuncs()


def _run_script(script: str, args: list[str], cwd: str, environment: dict[str, str]) -> None:
    """``python SCRIPT ARGS`` (or ``-m MODULE``) in ``cwd`` with exactly ``environment``, in this process."""
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(cwd)
    if script.startswith("-m "):
        sys.argv = [script[3:], *args]
        runpy.run_module(script[3:], run_name="__main__", alter_sys=True)
    else:
        sys.argv = _command(script, args)[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")


def _fork_server() -> multiprocessing.context.BaseContext:
    """``multiprocessing``'s fork-server context, its server started once per test process with the entry
    scripts' imports done and one thread per library (nothing multi-threaded is forked)."""
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["hydra", "serengeti.training.run"])
    if forkserver._forkserver._forkserver_pid is None:
        saved = dict(os.environ)
        os.environ.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        try:
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        atexit.register(stop_fork_server)
    return ctx


def stop_fork_server() -> None:
    """Stop the fork server, if one runs, and wait for it (so its CPU time is counted as this process's)."""
    from multiprocessing import forkserver

    forkserver._forkserver._stop()


def fork_call(function, *args, output: str | os.PathLike | None = None) -> ForkedRun:
    """``function(*args)`` (picklable: defined at a module's top level) in a new process forked from the fork
    server: a :class:`ForkedRun` to signal, kill, wait for and read stderr from. Stdout goes to /dev/null; with
    ``output``, stdout and stderr both go to that file (``> output 2>&1``), which is kept."""
    if output is None:
        fd, stderr_path = tempfile.mkstemp(prefix="forked-stderr-")
        os.close(fd)
        stdout_path = os.devnull
    else:
        Path(output).touch()
        stdout_path = stderr_path = str(output)
    process = _fork_server().Process(target=_forked_main, args=(stdout_path, stderr_path, function, *args))
    process.start()
    return ForkedRun(process, stderr_path, remove_stderr=output is None)


def start_forked(script: str, args: list[str], cwd: str | os.PathLike = ROOT, env: dict | None = None,
                 output: str | os.PathLike | None = None) -> ForkedRun:
    """``python SCRIPT ARGS`` (or ``-m MODULE``) with :func:`_environment` of ``env``, in a new process forked
    from the fork server. Torch, Lightning and Hydra are imported before the script runs (a new interpreter
    imports Lightning only in the script's main, after Hydra has set up logging, so Lightning's messages reach
    the run's log there and stderr here): a test of the run's log, of import order or of interpreter start
    needs :func:`run_subprocess`. ``output``: as :func:`fork_call`'s (a log file instead of a terminal)."""
    return fork_call(_run_script, script, list(args), str(cwd), _environment(env), output=output)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Print a warning to the current ``sys.stderr``, as the interpreter does."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _interpreter_warning_filters() -> None:
    """A fresh interpreter's filters (no ``-W``): deprecations shown only when raised by ``__main__``."""
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    warnings.showwarning = _show_warning


@contextlib.contextmanager
def _logging_restored():
    """Put every logger back as it was: Hydra configures the root logger (console and a file in the run dir)."""
    manager = logging.Logger.manager
    loggers = [logging.root, *(lg for lg in manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    saved = {id(lg): (lg, list(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in loggers}
    disable = manager.disable
    try:
        yield
    finally:
        logging.disable(disable)
        for lg in [logging.root, *(lg for lg in manager.loggerDict.values() if isinstance(lg, logging.Logger))]:
            handlers, level, propagate, disabled = saved.get(id(lg), (lg, [], logging.NOTSET, True, False))[1:]
            for h in lg.handlers:
                if h not in handlers:
                    h.close()
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled


def run_in_process(script: str, args: list[str], cwd: str | os.PathLike = ROOT,
                   env: dict | None = None) -> subprocess.CompletedProcess:
    """What :func:`run_subprocess` returns, from the script (or ``-m MODULE``) executed in this process.

    The exit status follows the interpreter's rules: ``SystemExit(None)`` is 0, an integer is itself, a message
    is printed to stderr with status 1; any other exception prints its traceback and gives 1.
    """
    command = _command(script, args)
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_signals = {s: signal.getsignal(s) for s in _SIGNALS}
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    returncode = 0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, _logging_restored(), \
            warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            environment = _environment(env)
            os.environ.clear()
            os.environ.update(environment)
            os.chdir(cwd)
            _interpreter_warning_filters()
            GlobalHydra.instance().clear()
            if script.startswith("-m "):
                # runpy's note that the module is already imported (by this test process) is no output of it
                warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
                sys.argv = [script[3:], *args]
                runpy.run_module(script[3:], run_name="__main__", alter_sys=True)
            else:
                sys.argv = command[1:]
                runpy.run_path(command[1], run_name="__main__")
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                returncode = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                returncode = 1
        except Exception:  # noqa: BLE001  (the interpreter prints it and exits 1)
            traceback.print_exc()
            returncode = 1
        finally:
            sys.argv = saved_argv
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
            for s, handler in saved_signals.items():
                signal.signal(s, handler)
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)
            GlobalHydra.instance().clear()
            sys.stdout.flush(), sys.stderr.flush()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    return subprocess.CompletedProcess(command, returncode, stdout, stderr)

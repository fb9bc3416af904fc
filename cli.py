"""The command-line plumbing every script shares: user errors as one line, typed flags, precision.

A mistake the user can fix (a bad flag, a missing or mismatched file) is a `UserError`: `run_cli` prints it as one
line `error: ...` and exits with code 2, never with a traceback. Flags are parsed by `ArgumentParser` with the
typed validators below, so a bad number is refused before any work starts.
"""
import argparse
import atexit
import errno
import math
import multiprocessing
import os
import re
import signal
import sys
import warnings
from contextlib import contextmanager, nullcontext

import torch



class UserError(Exception):
    """A mistake the user can fix: a bad argument, a missing or mismatched file. Every script prints it as one
    line `error: ...` and exits with `exit_code`, never with a traceback (see run_cli)."""
    exit_code = 2


class RunFailed(Exception):
    """The run itself failed, not the user (a non-finite loss or sample, no memory, a full disk): one line, exit code
    1, what was finished kept."""
    exit_code = 1


# What a scheduler sends before it pre-empts a job (SIGTERM; SIGUSR1 where chosen), and Ctrl-C: a training run saves
# and stops (runs.stop_signals).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Stopped(Exception):
    """A run that stopped because it was asked to (a cluster scheduler's SIGTERM or SIGUSR1 before it pre-empts the
    job) and saved what a resume needs first: run_cli prints it as one `stopped:` line and exits with code 75
    (EX_TEMPFAIL, "try again"), which a requeue script reads as: resume me."""
    exit_code = 75


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is a UserError (one line) instead of a usage block. Every command accepts
    and ignores --local-rank / --local_rank, which `python -m torch.distributed.launch` adds: the rank comes from
    the environment (LOCAL_RANK), as under torchrun."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, help=argparse.SUPPRESS)

    def error(self, message):
        raise UserError(f"{message} (see --help)")

    def parse_known_args(self, args=None, namespace=None):
        args, rest = super().parse_known_args(args, namespace)
        if hasattr(args, "local_rank"):
            del args.local_rank
        return args, rest

    def parse_given(self, argv=None):
        """(args, the sorted dests of the flags the command line gives). argparse cannot tell a default from a
        value equal to it, so parse once more into a namespace where every flag is preset to a sentinel that only
        a given flag replaces."""
        args = self.parse_args(argv)
        unset = object()
        probe = self.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(args)}))
        return args, sorted(k for k, v in vars(probe).items() if v is not unset)


def _typed(kind, holds, allowed):
    """An argparse `type`: the flag's text as `kind`, refused at parse time unless holds(value), with one line
    naming what is allowed ("argument --lr: '-1' is not a positive finite number")."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not holds(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}")
        return value
    return parse


def int_in(low, high=None):
    """An integer in [low, high] (no upper bound when high is None)."""
    return _typed(int, lambda v: low <= v and (high is None or v <= high),
                  f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")


positive_int, nonnegative_int = int_in(1), int_in(0)
finite_float = _typed(float, math.isfinite, "a finite number")
positive_float = _typed(float, lambda v: 0 < v < math.inf, "a positive finite number")
probability = _typed(float, lambda v: 0 <= v <= 1, "a probability in [0, 1]")
decay_rate = _typed(float, lambda v: 0 <= v < 1, "a decay rate in [0, 1)")
folder_path = _typed(str, lambda v: not os.path.exists(v) or os.path.isdir(v), "a folder (it is a file)")
out_file = _typed(str, lambda v: not os.path.isdir(v), "a file to write (it is a folder)")
device_name = _typed(str, lambda v: v == "cpu" or re.fullmatch(r"cuda(:\d+)?", v) and torch.cuda.is_available(),
                "a device here: cpu, or cuda / cuda:N where a CUDA GPU is visible")

# errno values of a write that found no room: a full disk, a quota, a file-size limit (ulimit -f).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# errno values of a path that cannot be used as named: a folder for a file or the other way round, a missing or
# read-only place, no permission, a name too long.
UNUSABLE_PATH = (errno.EISDIR, errno.ENOTDIR, errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST,
                 errno.ENAMETOOLONG)


def run_cli(main):
    """Run a script's main(): a UserError (exit code 2) or RunFailed (1) becomes one `error:` line on stderr and its
    exit code. So does an OSError: exit code 2 for a path that cannot be used as the user named it (a folder where a
    file belongs, a missing or read-only place: their mistake), else 1 (the machine failed: a full disk); and running
    out of memory anywhere (1). What was written stays. Under torchrun every rank fails alike, so rank 0 alone prints
    it. Names are printed whatever the locale (an ASCII console shows them escaped)."""
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(errors="backslashreplace")
    atexit.unregister(kill_leftover_workers)
    atexit.register(kill_leftover_workers)                 # once, and before multiprocessing's own exit (LIFO)
    try:
        with out_of_memory_advice("a smaller batch, or fewer images at once"):
            main()
    except Stopped as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return _fail("interrupted (Ctrl-C); what was written stays", 130)
    except (UserError, RunFailed) as e:
        # raised in a DataLoader worker, the message arrives after the worker's traceback: keep the last line
        message = str(e).strip().splitlines()[-1]
        return _fail(message.split("UserError: ", 1)[-1], e.exit_code)
    except OSError as e:
        if e.errno in DISK_FULL:
            return _fail(f"disk full writing {e.filename} ({e.strerror})", 1)
        code = UserError.exit_code if e.errno in UNUSABLE_PATH and e.filename else 1
        return _fail(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", code)
    return 0


@contextmanager
def out_of_memory_advice(advice, kept=""):
    """Running out of memory, a GPU's (torch.OutOfMemoryError) or the CPU's (MemoryError, or the RuntimeError of
    torch's CPU allocator), as one line: RunFailed naming what to try (`advice`, e.g. "--batch-size 32") and what
    was kept."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        cpu = "can't allocate memory" in str(e) or "not enough memory" in str(e) or isinstance(e, MemoryError)
        if not cpu and not isinstance(e, torch.OutOfMemoryError):
            raise
        raise RunFailed(f"out of {'CPU' if cpu else 'GPU'} memory: try {advice}{kept}") from None


def kill_leftover_workers():
    """At exit, the DataLoader workers an error left running (its loader not yet collected) are killed: they ignore
    SIGTERM (files.worker_init), which multiprocessing's own exit sends, then waits for without end."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)        # torch's handler would raise for each, now, as a traceback
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


def _fail(message, exit_code):
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr)
    return exit_code



def precision_context(precision, device_type):
    """The autocast context of --precision: fp16 or bf16 activations (fp32 weights); none for fp32 / tf32.
    fp16 is the V100s' precision; on a CPU it runs where this torch supports it, so that path is testable."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    if dtype is None:
        return nullcontext()
    with warnings.catch_warnings(record=True) as refused:   # an unsupported dtype: torch warns, then disables
        warnings.simplefilter("always")
        context = torch.autocast(device_type, dtype=dtype)
    if refused:
        raise UserError(f"--precision {precision}: torch {torch.__version__} has no {precision} autocast on "
                        f"{device_type}; use fp32" + (" or bf16" if precision == "fp16" else ""))
    return context

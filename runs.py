"""Run folders: one writer each, their log, the random streams an exact resume needs, and pre-emption. The machinery of
train.py, kept apart from its method.

A run folder (results/NNN-<model>-<tune>/) holds checkpoints/, log.jsonl, samples/ and .lock. It is created
exclusively (two runs started together never share one) and held by a lock for as long as its run lasts, so a
second run on it stops at once, and a killed run's folder resumes. Its log holds each step once, even after a
resume from an older checkpoint. A scheduler's SIGTERM or SIGUSR1 (sent before it pre-empts a job) lets the
current step finish on every process, then train.py saves and exits with code 75.
"""
import errno
import glob
import json
import os
import random
import signal
from contextlib import contextmanager, suppress

import numpy as np
import torch
import torch.distributed as dist

import data
from cli import STOP_SIGNALS, UserError
from files import lock_folder, release, remove_stale_temp_files


def make_run_dir(args):
    """The run folder -> (path, whether this process created it): --run-dir, the run folder of --resume, or
    results/NNN-<model>-<tune> with the next free NNN. Folders are created exclusively (mkdir fails on a name that
    another process took first, even a microsecond earlier), so two runs started together never share one."""
    if args.run_dir or args.resume and os.path.basename(os.path.dirname(os.path.abspath(args.resume))) == "checkpoints":
        path = args.run_dir or os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            os.mkdir(path)
            return path, True
        except FileExistsError:
            return path, False
    os.makedirs(args.results_dir, exist_ok=True)
    index = len(os.listdir(args.results_dir))
    while True:
        path = os.path.join(args.results_dir, f"{index:03d}-{args.model.replace('/', '-')}-{args.tune}")
        try:
            os.mkdir(path)
            return path, True
        except FileExistsError:
            index += 1


@contextmanager
def run_folder(args, step):
    """The run folder, created and locked by rank 0 for as long as the run lasts; every rank learns its name, or
    why there is none. Leftover temp files of a killed run are removed, the log is cut back to `step` (where
    the run starts), and a new run never writes over one that has checkpoints (it resumes instead)."""
    held, made = [], []

    def claim():
        run_dir, created = make_run_dir(args)
        held.append(lock_run_dir(run_dir))
        made.extend([run_dir] if created else [])     # ours to remove, and only now that we hold its lock
        if not args.resume and glob.glob(os.path.join(glob.escape(run_dir), "checkpoints", "*.pt")):
            raise UserError(f"{run_dir} already holds checkpoints: continue it with --resume {run_dir} "
                            "or choose another --run-dir")
        remove_stale_temp_files(run_dir)
        trim_log(run_dir, step)
        return run_dir

    try:
        yield data.on_rank0(claim)
    except BaseException:
        for run_dir in made:     # stopped before writing anything (a user mistake): take back what we made, no more
            checkpoints = os.path.join(run_dir, "checkpoints")
            if set(os.listdir(run_dir)) <= {".lock", "checkpoints"} and not os.listdir(checkpoints):
                os.rmdir(checkpoints)
                os.remove(os.path.join(run_dir, ".lock"))
                os.rmdir(run_dir)
        raise
    finally:
        for lock in held:
            release(lock)                  # (so does the kernel when a process dies, even by kill -9)


def lock_run_dir(run_dir):
    """Take the run folder's lock (files.lock_folder): two runs in one folder would silently write each other's
    checkpoints and interleave their logs. -> the open lock file."""
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    return lock_folder(run_dir)


def append_line(path, line):
    """Append one whole line or nothing: a full disk must not leave half a JSON record in the log."""
    with open(path, "ab", buffering=0) as f:
        end, text = f.tell(), (line + "\n").encode()
        try:
            if f.write(text) != len(text):      # the disk had room for part of it
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        except OSError:
            with suppress(OSError):
                f.truncate(end)
            raise


def trim_log(run_dir, step):
    """Cut the log after its last line of a step <= `step`: a run resumed from an older checkpoint redoes the later
    steps, which would otherwise be logged twice (a line cut short by a crash goes too). The lines are in step
    order, so a truncation does it, and that needs no free space."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        return
    keep = 0
    with open(path, "rb") as f:
        for line in f:
            logged = _logged_step(line)
            if logged is None or logged > step:
                break
            keep += len(line)
    os.truncate(path, keep)


def _logged_step(line):
    try:
        return json.loads(line)["step"] if line.endswith(b"\n") else None
    except (ValueError, KeyError, TypeError):
        return None


def rng_state(device):
    """This process's random streams as plain tensors / lists (torch.load(weights_only=True) reads them)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                           has_gauss=int(has_gauss), cached=float(cached)),
                python=[version, list(py_state), gauss])


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))


def all_ranks(obj, world):
    """[obj of rank 0, obj of rank 1, ...]."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


class StopRequest:
    """A request to stop (a scheduler's SIGTERM, or a chosen SIGUSR1, sent before it pre-empts a job; Ctrl-C), caught while
    `stop_signals` is active. `agreed()` after each step: has any process been asked? All answer alike after the
    same step, so that all save one checkpoint together; the question goes over the CPU (gloo), which never waits
    for the GPU."""

    def __init__(self, world):
        self.signal = None
        self.group = None
        if world > 1:
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def agreed(self):
        asked = torch.tensor([self.signal or 0])
        if self.group is not None:
            dist.all_reduce(asked, op=dist.ReduceOp.MAX, group=self.group)
        self.signal = int(asked) or None
        return self.signal is not None

    @property
    def name(self):
        return signal.Signals(self.signal).name


@contextmanager
def stop_signals(world):
    """Catch STOP_SIGNALS for the length of the loop (the handlers before are put back after). A signal sent twice (to
    the process group, then forwarded by torchrun) asks once."""
    stop = StopRequest(world)
    before = {s: signal.signal(s, lambda signum, frame: setattr(stop, "signal", signum)) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)

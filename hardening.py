"""The hardening behind every command, kept out of the stage files: a reader who skips this file still reads the whole
method. The stage files call it at their edges: when they parse flags, load files, run processes and save results.

  errors     UserError (the user's to fix: exit 2), RunFailed (the run's: exit 1), Stopped (pre-empted and saved: exit
             75), each one line from run_cli, never a traceback; flags typed and refused at parse time.
  processes  torchrun's ranks (rank 0 checks what they share and hands each its verdict), stop requests agreed by all
             ranks, DataLoader workers that leave signals and locks to their main process.
  writing    atomic writes, folders held by one writer, run folders, the random streams an exact resume needs.
  reading    what users bring, checked before use: checkpoints, .safetensors, images, JSON, hierarchies, latent caches,
             FID statistics, sample manifests; published files looked up where users put them, never downloaded.
"""
import argparse
import atexit
import csv
import datetime
import errno
import fcntl
import glob
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import signal
import socket
import struct
import sys
import time
import warnings
import zipfile
import zlib
from contextlib import contextmanager, nullcontext, suppress

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image


# --- Errors and the command line -------------------------------------------------------------------------------------

class UserError(Exception):
    """A mistake the user can fix (a bad flag, a missing or mismatched file): one line, exit code 2."""
    exit_code = 2


class RunFailed(Exception):
    """The run itself failed (a non-finite loss or sample, no memory, a full disk): one line, exit code 1."""
    exit_code = 1


class Stopped(Exception):
    """A run asked to stop (a scheduler's SIGTERM or SIGUSR1, Ctrl-C) that saved what a resume needs: one `stopped:`
    line, exit code 75 (EX_TEMPFAIL), which a requeue script reads as: resume me."""
    exit_code = 75


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line. --local-rank / --local_rank (added by torch.distributed.launch)
    is accepted and ignored: the rank comes from the environment, as under torchrun."""

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
        """(args, the sorted dests of the flags given): parsed again over sentinels that only a given flag replaces
        (argparse cannot tell a default from a value equal to it)."""
        args = self.parse_args(argv)
        unset = object()
        probe = self.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(args)}))
        return args, sorted(k for k, v in vars(probe).items() if v is not unset)


def _typed(kind, holds, allowed):
    """An argparse type: the text as `kind`, refused unless holds(value), naming what is allowed."""
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
    return _typed(int, lambda v: low <= v and (high is None or v <= high),
                  f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")


positive_int, nonnegative_int = int_in(1), int_in(0)
multiple_of_8 = _typed(int, lambda v: v > 0 and v % 8 == 0,
                       "a positive multiple of 8 (the SD VAE's latents are 8x smaller than the image)")
finite_float = _typed(float, math.isfinite, "a finite number")
positive_float = _typed(float, lambda v: 0 < v < math.inf, "a positive finite number")
probability = _typed(float, lambda v: 0 <= v <= 1, "a probability in [0, 1]")
decay_rate = _typed(float, lambda v: 0 <= v < 1, "a decay rate in [0, 1)")
rank_list = _typed(lambda v: [r.strip() for r in v.split(",")], lambda v: all(v) and len(set(v)) == len(v),
                   "a comma-separated list of distinct ranks, e.g. genus,superclass")
weight_list = _typed(lambda v: [float(w) for w in v.split(",")], lambda v: all(0 <= w < math.inf for w in v) and sum(v),
                     "comma-separated weights >= 0, not all 0, e.g. 0.5,0.5")
folder_path = _typed(str, lambda v: not os.path.exists(v) or os.path.isdir(v), "a folder (it is a file)")
out_file = _typed(str, lambda v: not os.path.isdir(v), "a file to write (it is a folder)")
device_name = _typed(str, lambda v: v == "cpu" or re.fullmatch(r"cuda(:\d+)?", v) and torch.cuda.is_available(),
                     "a device here: cpu, or cuda / cuda:N where a CUDA GPU is visible")

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# A path that cannot be used as named (a folder for a file, missing, read-only, no permission, too long): the user's.
UNUSABLE_PATH = (errno.EISDIR, errno.ENOTDIR, errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST,
                 errno.ENAMETOOLONG)


def run_cli(main):
    """Run a script's main() -> its exit code. UserError, RunFailed, an OSError (2 for a path named wrong, else 1) and
    out of memory (1) are one `error:` line; Stopped one `stopped:` line (75); Ctrl-C one line (130). What was written
    stays. Under torchrun every rank fails alike: rank 0 alone prints, escaped on an ASCII console."""
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(errors="backslashreplace")
    atexit.unregister(kill_leftover_workers)
    atexit.register(kill_leftover_workers)                 # once, and before multiprocessing's own exit (LIFO)
    try:
        with out_of_memory_advice("a smaller batch, or fewer images at once"):
            main()
    except Stopped as e:
        return _fail(f"stopped: {e}", e.exit_code, prefix="")
    except KeyboardInterrupt:
        return _fail("interrupted (Ctrl-C); what was written stays", 130)
    except (UserError, RunFailed) as e:
        # raised in a DataLoader worker, the message arrives after the worker's traceback: keep its last line
        return _fail(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1], e.exit_code)
    except OSError as e:
        if e.errno in DISK_FULL:
            return _fail(f"disk full writing {e.filename} ({e.strerror})", 1)
        code = UserError.exit_code if e.errno in UNUSABLE_PATH and e.filename else 1
        return _fail(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", code)
    return 0


def _fail(message, exit_code, prefix="error: "):
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{prefix}{message}", file=sys.stderr)
    return exit_code


@contextmanager
def out_of_memory_advice(advice, kept=""):
    """A GPU's or the CPU's out of memory as RunFailed naming what to try (`advice`) and what was kept."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        cpu = "can't allocate memory" in str(e) or "not enough memory" in str(e) or isinstance(e, MemoryError)
        if not cpu and not isinstance(e, torch.OutOfMemoryError):
            raise
        raise RunFailed(f"out of {'CPU' if cpu else 'GPU'} memory: try {advice}{kept}") from None


def precision_context(precision, device_type):
    """The autocast of --precision (fp16 or bf16 activations, fp32 weights; none for fp32 / tf32), refused in one line
    where this torch has none for the device."""
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


# --- Processes: torchrun's ranks, stop requests, DataLoader workers --------------------------------------------------

def init_distributed(device=None):
    """(rank, world size, device) of this process, joining the process group under torchrun (nccl on CUDA, gloo on a
    CPU). device: None for cuda:LOCAL_RANK where there is a GPU, else the CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():       # long barriers (a rank's share of a latent cache) must not time out
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return rank, world, device


def on_rank0(work):
    """work() on rank 0 alone (it makes or checks what the ranks share), its result, or its error, handed to every
    rank: a mistake stops all ranks before any starts work, and run_cli prints it once."""
    result = error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = work()
        except (UserError, OSError) as e:
            error = e
    if dist.is_initialized():
        shared = [result, error]
        dist.broadcast_object_list(shared, src=0)   # the other ranks wait here for rank 0's verdict
        result, error = shared
    if error is not None:
        raise error
    return result


def all_ranks(obj, world):
    """[obj of rank 0, obj of rank 1, ...]."""
    out = [obj] * world
    if world > 1:
        dist.all_gather_object(out, obj)
    return out


# What a scheduler sends before it pre-empts a job (SIGTERM; SIGUSR1 where chosen), and Ctrl-C: training saves and stops.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """A stop request caught by stop_signals. `agreed()` after each step: has any rank been asked? All ranks answer
    alike after the same step, so that they save one checkpoint together (over gloo: it never waits for the GPU)."""

    def __init__(self, world):
        self.signal, self.group = None, None
        if world > 1:
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def agreed(self):
        asked = torch.tensor([self.signal or 0])
        if self.group is not None:
            dist.all_reduce(asked, op=dist.ReduceOp.MAX, group=self.group)
        # Set, never cleared: a signal caught while the ranks compare (after `asked` was read) counts at the next step.
        self.signal = int(asked) or self.signal
        return bool(asked)

    @property
    def name(self):
        return signal.Signals(self.signal).name


@contextmanager
def stop_signals(world):
    """Catch STOP_SIGNALS for the length of the training loop (the handlers before are put back after)."""
    stop = StopRequest(world)
    before = {s: signal.signal(s, lambda signum, frame: setattr(stop, "signal", signum)) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def worker_init(worker_id):
    """Every DataLoader's worker_init_fn. A scheduler or Ctrl-C signals the whole process group: workers leave it to
    their main process, which ends its step, shuts them down and saves; and they close their copies of its folder
    locks, so that a lock dies with the process that took it (kill -9 included), not later with its workers."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    for lock in LOCKS:
        lock.close()


def kill_leftover_workers():
    """At exit, kill the DataLoader workers an error left running: they ignore the SIGTERM multiprocessing's own exit
    sends (worker_init), then wait on without end."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)        # torch's handler would raise for each, as a traceback
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


# --- Writing: atomic files, JSON and CSV, locked folders, run folders, random streams --------------------------------

class _WholeWrites(io.FileIO):
    """A file whose write() writes all it is given or raises, and keeps what it raised (torch.save turns an OSError of
    its file into a bare RuntimeError, which would hide a full disk)."""
    error = None

    def write(self, data):
        view = memoryview(data).cast("B")
        size = len(view)
        try:
            while view:                      # the kernel writes what fits, then refuses the rest with ENOSPC
                view = view[super().write(view):]
        except OSError as e:
            self.error = e
            raise
        return size


# Temp files `.<name>.finediffusion-tmp<pid>`: no user file has such a name, so clean-up only removes what we wrote.
TEMP_TAG = ".finediffusion-tmp"
_TEMP_FILE = re.compile(r"^\..+" + re.escape(TEMP_TAG) + r"(\d+)$")


def atomic_write(path, write):
    """write(file) on a temp file beside `path`, then a rename over it: a crash or a full disk never leaves a
    half-written file. A failed write is an OSError naming `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}{TEMP_TAG}{os.getpid()}")
    f = None
    try:
        with _WholeWrites(tmp, "wb") as f:
            write(f)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        error = f.error if f is not None and f.error is not None else e
        if isinstance(error, OSError):
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise


def write_json(path, obj, indent=1):
    """`obj` as a JSON file, atomically (indent=None: one compact line, for large manifests)."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=indent) + "\n").encode()))


def write_csv(path, rows):
    """Rows (dicts) as CSV, UTF-8, columns in order of first appearance; None is an empty cell."""
    text = io.StringIO()
    writer = csv.DictWriter(text, list(dict.fromkeys(k for r in rows for k in r)), lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: "" if v is None else v for k, v in r.items()} for r in rows])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def write_npz_rows(path, count, batches, rest):
    """An .npz as np.savez writes it (stored .npy members, zip64), its arr_0 `count` rows long written batch by batch
    from `batches` (arrays [B, ...] of one dtype and row shape): memory holds one batch, whatever the count. rest(): the
    other arrays, asked for once arr_0 is written (the labels of the rows that came). Atomic; rows other than `count`
    fail before the rename (too many at the batch that overflows, unwritten and its labels never asked for)."""
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                written = 0
                for batch in batches:
                    if not written:               # the header needs the final shape: count, then the first's rows
                        row_shape, dtype = batch.shape[1:], batch.dtype
                        np.lib.format.write_array_header_1_0(member, dict(
                            descr=np.lib.format.dtype_to_descr(dtype), fortran_order=False, shape=(count, *row_shape)))
                    if batch.shape[1:] != row_shape or batch.dtype != dtype:
                        raise UserError(f"{path}: an image is {batch.dtype} {list(batch.shape[1:])} where the "
                                        f"first were {dtype} {list(row_shape)}: pass --image-size to crop them all "
                                        "to one size")
                    written += len(batch)
                    if written > count:
                        break
                    member.write(np.ascontiguousarray(batch).tobytes())
            if written != count:
                raise RunFailed(f"{path}: {written}{'+' * (written > count)} images came where {count} were counted "
                                "(the images changed while being read): run again")
            for name, value in rest().items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    atomic_write(path, write)


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


def remove_stale_temp_files(folder):
    """Delete the temp files under `folder` whose writer is dead (killed mid-write); a live process's are its own."""
    for root, _, files in os.walk(folder):
        for name in files:
            match = _TEMP_FILE.search(name)
            if match and not _alive(int(match.group(1))):
                os.remove(os.path.join(root, name))


def _alive(pid):
    try:
        os.kill(pid, 0)                      # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:                  # it does, as another user's
        pass
    return True


def file_sha256(path):
    """Hex sha256 of a file's bytes: the identity of a base checkpoint, a VAE or an Inception under any name."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


LOCKS = []       # the folder locks this process holds (worker_init closes a forked worker's copies)


def lock_folder(folder, taken_by="another training run", fix="wait for it to end or choose another --run-dir"):
    """Take the exclusive lock <folder>/.lock (flock: the kernel drops it when its holder dies), saying who holds it
    there -> the open lock file, for `release`. Two writers in one folder would silently mix what they write."""
    os.makedirs(folder, exist_ok=True)
    created = not os.path.exists(os.path.join(folder, ".lock"))
    lock = open(os.path.join(folder, ".lock"), "a+", encoding="utf-8")
    lock.created = created                 # release(undo=True) takes it back: a refused start leaves nothing
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise UserError(f"{folder} is in use by {taken_by} ({holder}): {fix}") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    LOCKS.append(lock)
    return lock


def release(lock, undo=False):
    """Give up a lock_folder lock; undo: and delete its file if taking it made it (nothing was done under it)."""
    LOCKS.remove(lock)
    if undo and lock.created:
        os.remove(lock.name)
    lock.close()


def make_run_dir(args):
    """The run folder -> (path, whether this process made it): --run-dir, the run of --resume, or results/NNN-<model>-
    <tune> with the next free NNN (mkdir is exclusive: two runs started together never share a folder)."""
    if args.run_dir or args.resume and os.path.basename(os.path.dirname(os.path.abspath(args.resume))) == "checkpoints":
        path = args.run_dir or os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        candidates = [path]
    else:
        os.makedirs(args.results_dir, exist_ok=True)
        name = f"{args.model.replace('/', '-')}-{args.tune}"
        candidates = (os.path.join(args.results_dir, f"{i:03d}-{name}") for i in
                      range(len(os.listdir(args.results_dir)), 10 ** 9))
    for path in candidates:
        try:
            os.mkdir(path)
            return path, True
        except FileExistsError:
            pass
    return path, False            # --run-dir or the resumed run's folder, already there


@contextmanager
def run_folder(args, step):
    """The run folder (checkpoints/, log.jsonl, samples/, .lock), made and locked by rank 0 while the run lasts; every
    rank learns its name, or why there is none. A killed run's temp files go, the log is cut back to `step`, and a
    new run never writes over one with checkpoints (it resumes instead)."""
    held, made = [], []

    def claim():
        run_dir, created = make_run_dir(args)
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        held.append(lock_folder(run_dir))
        made.extend([run_dir] if created else [])     # ours to remove, and only now that we hold its lock
        if not args.resume and glob.glob(os.path.join(glob.escape(run_dir), "checkpoints", "*.pt")):
            raise UserError(f"{run_dir} already holds checkpoints: continue it with --resume {run_dir} "
                            "or choose another --run-dir")
        remove_stale_temp_files(run_dir)
        trim_log(run_dir, step)
        return run_dir

    try:
        yield on_rank0(claim)
    except BaseException:
        for run_dir in made:     # stopped before writing anything (a user mistake): take back what we made, no more
            if set(os.listdir(run_dir)) <= {".lock", "checkpoints"} and not os.listdir(f"{run_dir}/checkpoints"):
                os.rmdir(f"{run_dir}/checkpoints")
                os.remove(f"{run_dir}/.lock")
                os.rmdir(run_dir)
        raise
    finally:
        for lock in held:
            release(lock)


def trim_log(run_dir, step):
    """Cut the log after its last line of a step <= `step` (and a line cut short by a crash): a run resumed from an
    older checkpoint redoes the later steps. A truncation, needing no free space."""
    path, keep = os.path.join(run_dir, "log.jsonl"), 0
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        for line in f:
            try:
                logged = json.loads(line)["step"] if line.endswith(b"\n") else None
            except (ValueError, KeyError, TypeError):
                logged = None
            if logged is None or logged > step:
                break
            keep += len(line)
    os.truncate(path, keep)


def rng_state(device):
    """This process's random streams as plain tensors and lists (torch.load(weights_only=True) reads them)."""
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


# --- Reading what users bring: published files, checkpoints, .safetensors, images, JSON ------------------------------

# The published files this project reads, and where to get them. None is ever downloaded by the code.
PUBLISHED = {
    "DiT-XL-2-256x256.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
    "DiT-XL-2-512x512.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt",
    "FineDiffusion-iNat.pt": "the authors' release, linked from https://finediffusion.github.io/",
    "sd-vae-ft-ema": "https://huggingface.co/stabilityai/sd-vae-ft-ema (config.json and "
                     "diffusion_pytorch_model.safetensors, in a folder of that name)",
    "sd-vae-ft-mse": "https://huggingface.co/stabilityai/sd-vae-ft-mse (config.json and "
                     "diffusion_pytorch_model.safetensors, in a folder of that name)",
    "FineDiffusion-iNat-512.pt": "the authors' release, linked from https://github.com/FineDiffusion/FineDiffusion",
    "FineDiffusion-VegFru.pt": "the authors' release, linked from https://github.com/FineDiffusion/FineDiffusion",
    "pt_inception-2015-12-05-6726825d.pth":
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "alexnet-owt-7be5be79.pth": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "alex.pth": "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth",
}


def find_file(path, also=(), published=None):
    """A file or folder the user names: as given, else pretrained/<its name>, else the places in `also`. Missing: one
    line naming every place looked and, for a published file (`published`: its name), where it is published."""
    path = os.fspath(path)
    places = list(dict.fromkeys([path, os.path.join("pretrained", os.path.basename(os.path.normpath(path))), *also]))
    found = next((place for place in places if os.path.exists(place)), None)
    if found is None:
        published = published or os.path.basename(os.path.normpath(path))
        where = f"; {published} is published at {PUBLISHED[published]}: put it in pretrained/" \
            if published in PUBLISHED else ""
        raise UserError(f"{path} not found (looked in {', '.join(places)}){where}")
    return found


def find_weights(path, filename):
    """A published weights file: `path` (or its file name) as given, under pretrained/, or in torch's cache."""
    torch_home = os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch"))
    return find_file(path or filename, also=[os.path.join(torch_home, "hub", "checkpoints", filename)],
                     published=filename)


def is_inside(folder, path):
    """Is `path` inside `folder` once every link on the way is followed (realpath), not only as written?"""
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


def read_json(path, what="JSON file"):
    """A JSON file, read as UTF-8 whatever the locale (iNat21's names are not ASCII), or one line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:                   # UnicodeDecodeError is a ValueError
        raise UserError(f"cannot read the {what} {path}: {e}") from None


def read_checkpoint(path):
    """torch.load(weights_only=True) of a checkpoint (a pickle is code; argparse.Namespace allowed: the official and
    the authors' training checkpoints keep their args in one), after check_zip; a wrapper's name prefix taken off."""
    if not os.path.isfile(path):
        raise UserError(f"{path} is not a file")
    check_zip(path)
    try:
        # torch's warnings would add lines to the one below, and its hints suggest weights_only=False
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refusals are UnpicklingErrors naming "GLOBAL module.Class"
        msg = str(e)
        if "GLOBAL " in msg:
            raise UserError(f"refusing to load {path}: it pickles {msg.split('GLOBAL ', 1)[1].split()[0]!r}, not only "
                            "tensors (checkpoints are untrusted input)") from None
        first = msg.strip().splitlines()[0] if msg.strip() and "weights only" not in msg.lower() else type(e).__name__
        raise UserError(f"cannot read {path}: not a readable torch checkpoint ({first})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a checkpoint: it holds a {type(ckpt).__name__}, not a dict of tensors")
    return unwrapped(ckpt, path)


def check_zip(path):
    """torch.save writes a zip of stored records with CRC-32s: a file damaged on a disk or in a copy, or a compressed
    record (torch never writes one; it could inflate to any size), is refused before it is read."""
    if not zipfile.is_zipfile(path):
        return                                            # a legacy non-zip file carries no checksum
    try:
        with zipfile.ZipFile(path) as archive:
            packed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
            if packed:
                raise UserError(f"refusing to load {path}: its record {packed[0]} is compressed, which torch.save "
                                "never writes (a damaged or crafted file)")
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        damaged = str(e)
    if damaged is not None:
        raise UserError(f"{path} is damaged ({damaged} fails its CRC-32 check): copy or download it again")


# Wrappers that put a prefix on every tensor name of the model they wrap: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrapped(ckpt, path):
    """The checkpoint with a wrapper's prefix taken off the tensor names, where every name carries it (said once)."""
    taken = set()
    for key in [k for k in ("model", "ema") if k in ckpt] or [None]:
        state = ckpt if key is None else ckpt[key]
        while isinstance(state, dict) and state and (prefix := next(
                (p for p in WRAPPER_PREFIXES if all(isinstance(k, str) and k.startswith(p) for k in state)), None)):
            state = {k[len(prefix):]: v for k, v in state.items()}
            taken.add(prefix)
        ckpt = state if key is None else {**ckpt, key: state}
    if taken and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: {path}: every tensor name starts with {' / '.join(sorted(taken))} (a model saved inside "
              "DistributedDataParallel or torch.compile): the prefix is taken off", file=sys.stderr)
    return ckpt


def checkpoint_tensors(ckpt, weights="ema"):
    """The state dict in a checkpoint: its "ema" (what one samples with) or "model" entry, or the checkpoint itself
    when it is a bare state dict (DiT-XL-2-256x256.pt)."""
    state = ckpt.get(weights, ckpt.get("model")) if "model" in ckpt or "ema" in ckpt else ckpt
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError("the checkpoint holds no state dict of tensors")
    return state


def load_strict(module, state, source, assign=False, expected=None):
    """module.load_state_dict(state), checked first: every tensor `expected` (default: the module's) there with its
    shape, no other, all finite (a NaN weight draws black images); else one line naming the first odd tensor.
    assign: the module (built on the meta device) takes the state's tensors, copying nothing."""
    own = module.state_dict() if expected is None else expected
    for key, tensor in own.items():
        if key not in state:
            raise UserError(f"{source}: missing tensor '{key}'")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(f"{source}: tensor '{key}' has shape {list(state[key].shape)}, expected {list(tensor.shape)}")
    for key, tensor in state.items():
        if key not in own:
            raise UserError(f"{source}: unexpected tensor '{key}'")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{source}: tensor '{key}' holds non-finite values (NaN or inf): the file is damaged, or "
                            "was saved from a run that diverged")
    module.load_state_dict(state, strict=expected is None, assign=assign)


AUTHORS_CHECKPOINT = "FineDiffusion-iNat.pt"


def resolve_checkpoint(path=None):
    """The checkpoint file a user means (--ckpt, --init, --resume): a file as given, else under pretrained/ by its name;
    a run folder means its newest training checkpoint; no path, the newest under results/, else
    pretrained/FineDiffusion-iNat.pt."""
    newest = lambda folder: max(glob.glob(os.path.join(glob.escape(folder), "**", "checkpoints", "*.pt"),
                                          recursive=True), key=os.path.getmtime, default=None)
    if path is None:
        authors = os.path.join("pretrained", AUTHORS_CHECKPOINT)
        found = newest("results") or (authors if os.path.isfile(authors) else None)
        if found is None:
            raise UserError(f"no --ckpt given and none found (looked in results/**/checkpoints/*.pt and pretrained/"
                            f"{AUTHORS_CHECKPOINT}): train one (python train.py --data toy, see README) or put "
                            f"{AUTHORS_CHECKPOINT} in pretrained/; it is {PUBLISHED[AUTHORS_CHECKPOINT]}")
        return found
    path = find_file(path)
    if os.path.isdir(path) and newest(path) is None:
        raise UserError(f"no checkpoint in {path} (looked for {path}/**/checkpoints/*.pt): train one first, or pass a "
                        "checkpoint file")
    return newest(path) if os.path.isdir(path) else path


# .safetensors, read with the standard library: u64 header length, JSON header, raw little-endian bytes. Tag ->
# (numpy little-endian dtype, torch dtype); BF16 has no numpy type: its bytes are read as int16 and reinterpreted.
_ST_DTYPES = {
    "F64": ("<f8", torch.float64), "F32": ("<f4", torch.float32), "F16": ("<f2", torch.float16),
    "BF16": ("<i2", torch.bfloat16), "I64": ("<i8", torch.int64), "I32": ("<i4", torch.int32),
    "I16": ("<i2", torch.int16), "I8": ("i1", torch.int8), "U8": ("u1", torch.uint8), "BOOL": ("?", torch.bool),
}


def load_safetensors(path):
    """A .safetensors file -> {name: tensor}: a u64 header length n, a JSON object of n bytes ({name: {"dtype",
    "shape", "data_offsets": [begin, end]}}, optional "__metadata__"), then the data, which the tensors' byte ranges
    must tile exactly. Every entry is checked before anything the file sizes is read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > size - 8:
            raise UserError(f"{path}: not a valid .safetensors file (its header length does not fit the file)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a valid .safetensors file (its header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise UserError(f"{path}: not a valid .safetensors file (its header is not a JSON object)")
        entries = sorted(_safetensors_entry(path, name, info) for name, info in header.items() if name != "__metadata__")
        position = 0
        for begin, end, name, _, _ in entries:              # by begin: each must start where the last one ended
            if begin != position:
                raise UserError(f"{path}: tensor '{name}' starts at byte {begin} of the data, not at {position}: its "
                                "bytes " + ("overlap another tensor's" if begin < position else "leave a gap"))
            position = end
        if position != size - 8 - n:
            raise UserError(f"{path}: the tensors cover {position} bytes of a {size - 8 - n}-byte data buffer")
        buf = f.read()
    out = {}
    for begin, end, name, dtype, shape in entries:
        np_dt, t_dt = _ST_DTYPES[dtype]
        arr = np.frombuffer(buf, dtype=np_dt, count=math.prod(shape), offset=begin)
        arr = arr.astype(arr.dtype.newbyteorder("="))     # an aligned, writable copy in native byte order
        out[name] = torch.from_numpy(arr).view(t_dt).reshape(shape)  # view: int16 bits -> bfloat16
    return out


def _safetensors_entry(path, name, info):
    """One header entry, checked -> (begin, end, name, dtype, shape)."""
    is_count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if not isinstance(info, dict):
        raise UserError(f"{path}: tensor '{name}' has no dtype/shape/data_offsets entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise UserError(f"{path}: tensor '{name}' has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(map(is_count, shape)):
        raise UserError(f"{path}: tensor '{name}' has shape {shape!r}, not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(is_count, offsets)) or offsets[0] > offsets[1]:
        raise UserError(f"{path}: tensor '{name}' has data_offsets {offsets!r}, not [begin, end] byte offsets")
    if offsets[1] - offsets[0] != math.prod(shape) * np.dtype(_ST_DTYPES[dtype][0]).itemsize:
        raise UserError(f"{path}: tensor '{name}' spans {offsets[1] - offsets[0]} bytes, its {dtype} shape {shape} "
                        "needs another count")
    return offsets[0], offsets[1], name, dtype, shape


def read_tensors(path):
    """A flat {name: tensor} state dict from a .safetensors, .bin or .pt file (a Lightning {"state_dict": ...} too)."""
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    obj = read_checkpoint(path)
    obj = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a flat {{name: tensor}} state dict")
    return obj


def read_rgb(path):
    """The one image reader (training, the latent cache, statistics, evaluation): the image at `path` as a PIL RGB
    image, or one line naming the file. 8-bit modes as Pillow converts them (P and PA through RGBA, alpha dropped);
    Pillow's convert clips wider ones, so 16-bit integers (I;16*, I) are scaled by 255/65535 and floats (F) read as
    [0, 1], values outside refused (their scale is unknown). Pillow's metadata warnings are not about the pixels."""
    try:
        with warnings.catch_warnings(action="ignore"), Image.open(path) as image:
            image.load()  # decodes: a corrupt or truncated file fails here
            mode = image.mode
            if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
                values = np.asarray(image)  # (H, W): uint16 of either byte order, int32 or float32
                top = 1.0 if mode == "F" else 65535
                low, high = float(values.min()), float(values.max())
                if not 0 <= low <= high <= top:  # NaN fails here too
                    raise ValueError(f"Pillow mode {mode} holds values in [{low:g}, {high:g}], outside the [0, {top:g}] "
                                     "it is read as: the scale of this file is unknown")
                return Image.fromarray(np.rint(values * (255 / top)).astype(np.uint8)).convert("RGB")
            if mode in ("P", "PA"):
                return image.convert("RGBA").convert("RGB")
            try:
                return image.convert("RGB")
            except ValueError:
                raise ValueError(f"Pillow mode {mode} has no conversion to RGB") from None
    except Exception as err:  # whatever Pillow raises (OSError, SyntaxError, ValueError, zlib.error, ...): unusable
        raise UserError(f"cannot read image {path}: {err}") from None


# --- Reading what users bring: hierarchies, configs, latent caches, FID statistics, sample manifests -----------------

def check_hierarchy(obj, source):
    """A hierarchy read from a file (a checkpoint, a cache, statistics, a manifest, --hierarchy): checked to be one
    (model.make_hierarchy's layout: names as text, each class's node at each rank an integer in range), else one line
    naming the file."""
    keys = ("class_names", "superclass_names", "superclass_of")
    if not isinstance(obj, dict) or not set(keys) <= set(obj) <= {*keys, "ranks"} or \
            not all(isinstance(obj[k], list) for k in (*keys, "ranks") if k in obj):
        raise UserError(f"{source}: its hierarchy is not a dict of the lists {', '.join(keys)} (and ranks)")
    levels = [(obj["superclass_names"], obj["superclass_of"])]
    for r in obj.get("ranks", []):
        if not (isinstance(r, dict) and set(r) == {"rank", "names", "of"} and isinstance(r["rank"], str)
                and r["rank"] != "superclass" and isinstance(r["names"], list) and isinstance(r["of"], list)):
            raise UserError(f"{source}: its hierarchy's ranks are not dicts of rank, names and of")
        levels.append((r["names"], r["of"]))
    names = obj["class_names"]
    if not all(isinstance(n, str) for n in names) or not all(
            all(isinstance(n, str) for n in nodes) and len(of) == len(names) and
            all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(nodes) for i in of)
            for nodes, of in levels):
        raise UserError(f"{source}: its hierarchy is damaged (names must be text, and superclass_of one superclass "
                        "id in range for each class)")
    return obj


def read_hierarchy_csv(path):
    """`class,superclass` rows, or rows of a class and its node at each rank under a header naming them
    (`class,genus,superclass`: the last column is the superclass) -> ({class: [node at each rank]}, ranks between)."""
    if not os.path.isfile(path):
        raise UserError(f"hierarchy CSV {path} not found")
    with open(path, newline="", encoding="utf-8-sig") as f:     # a byte-order mark (as Excel saves) is no name
        try:
            rows = [[cell.strip() for cell in row] for row in csv.reader(f)]
        except (UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"hierarchy CSV {path} is not UTF-8 text with `class,superclass` rows ({e})") from None
    first = next((row for row in rows if any(row)), None)          # a header row names the ranks: class,genus,...
    header = first if first and first[0].lower() == "class" else ["class", "superclass"]
    expected = ",".join(header)
    if len(set(header)) < len(header) or "superclass" in header[1:-1]:
        raise UserError(f"{path}: its header {expected!r} must name each rank once, the superclass last "
                        "(class,genus,superclass)")
    nodes = {}
    for line_no, row in enumerate(rows, 1):
        if not any(row) or row is header:
            continue
        if len(row) != len(header) or not all(row):
            raise UserError(f"{path}:{line_no}: expected `{expected}`, got {','.join(row)!r}")
        if nodes.setdefault(row[0], row[1:]) != row[1:]:
            raise UserError(f"{path}:{line_no}: class {row[0]!r} listed under {','.join(nodes[row[0]])!r} and "
                            f"{','.join(row[1:])!r}")
    if len(header) < 2 or not nodes:
        raise UserError(f"hierarchy CSV {path} has no {expected} rows")
    return nodes, header[1:-1]


# The text fields of a category this project reads; the ranks between the species and its supercategory, finest first.
INAT21_RANKS = ("genus", "family", "order", "class", "phylum", "kingdom")
INAT21_TEXT_FIELDS = ("name", "supercategory", "image_dir_name", *INAT21_RANKS)


def inat21_categories(path):
    """The `categories` of an iNat21 json, each checked to be one of iNat21's (an integer id, text fields)."""
    content = read_json(path, "iNat21 json")
    categories = content.get("categories") if isinstance(content, dict) else None
    if not isinstance(categories, list):
        raise UserError(f"{path} is not an iNat21 json: it has no list of 'categories'")
    for c in categories:
        if not (isinstance(c, dict) and isinstance(c.get("id"), int) and not isinstance(c["id"], bool) and
                all(isinstance(c[k], str) for k in INAT21_TEXT_FIELDS if c.get(k) is not None)):
            raise UserError(f"{path}: the category {str(c)[:120]} is not one of iNat21's (an integer id, and "
                            f"{', '.join(INAT21_TEXT_FIELDS)} as text)")
    return categories


VEGFRU_SPLITS = ("train", "val", "test")
VEGFRU_HINT = ("VegFru's download has vegfru_list/vegfru_{train,val,test}.txt and supvegfru_{train,val,test}.txt "
               "beside veg200_images/ and fru92_images/ (https://github.com/ustc-vim/vegfru)")


def read_vegfru_lists(root, split=None):
    """VegFru's own split lists under root/vegfru_list/: vegfru_<split>.txt, lines `<image path> <subclass>` (e.g.
    `fru92_images/banana/f_01_01_1031.jpg <id>`), and supvegfru_<split>.txt, the same images with their superclass, for
    each of train, val and test whose lists are there (`split`: one that must be) -> ({split: (image paths, subclass
    labels)}, class names, superclass_of). A subclass is named by the folder of its images, and is under the superclass
    of its images, the two lists paired by image path; all lines together must name each id 0 ... K-1 (0 ... S-1)."""
    folder = os.path.join(root or "", "vegfru_list")
    present = [s for s in VEGFRU_SPLITS if os.path.isfile(os.path.join(folder, f"vegfru_{s}.txt"))]
    if not root or not present or split not in (None, *present):
        raise UserError(f"VegFru: no vegfru_list/vegfru_{split or 'train'}.txt in {root or 'the --data-path'} (lists "
                        f"there: {', '.join(present) or 'none'}); {VEGFRU_HINT}")
    splits, folder_of, superclass_of = {}, {}, {}
    for s in present:
        sub, sup = (_vegfru_list(os.path.join(folder, f"{prefix}vegfru_{s}.txt")) for prefix in ("", "sup"))
        for path, (label, where) in sub.items():
            if path not in sup:
                raise UserError(f"{where}: {path} has no line in supvegfru_{s}.txt (both lists name the same images)")
            for of, value, what in ((folder_of, path.split("/")[-2], "folder"), (superclass_of, sup[path][0],
                                                                                   "superclass")):
                if of.setdefault(label, value) != value:
                    raise UserError(f"{where}: subclass {label} has an image under {what} {value}, another under "
                                    f"{of[label]}")
        splits[s] = (list(sub), [label for label, _ in sub.values()])
    if not folder_of:
        raise UserError(f"VegFru: the lists in {folder} have no lines; {VEGFRU_HINT}")
    for ids, what in ((set(folder_of), "subclass"), (set(superclass_of.values()), "superclass")):
        if len(ids) != max(ids) + 1:                       # ids must run 0 ... N-1: the first gap is at most N
            raise UserError(f"VegFru: no line of the lists in {folder} has {what} {min(set(range(len(ids) + 1)) - ids)}"
                            f", of 0 ... {max(ids)}")
    return splits, [folder_of[k] for k in range(len(folder_of))], [superclass_of[k] for k in range(len(folder_of))]


def _vegfru_list(path):
    """One VegFru list -> {image path: (label, 'file:line')}; lines `<relative image path> <label>`."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"VegFru: cannot read {path} ({getattr(e, 'strerror', None) or e}); {VEGFRU_HINT}") from None
    entries = {}
    for n, line in enumerate(lines, 1):
        fields, where = line.split(), f"{path}:{n}"
        parts = fields[0].split("/") if fields else []
        if fields and (len(fields) != 2 or not fields[1].isdigit() or len(parts) < 3 or "" in parts or ".." in parts):
            raise UserError(f"{where}: expected `<tree>/<subclass folder>/<file> <label>` (as "
                            f"`fru92_images/banana/f_01_01_1031.jpg <id>`), got {line.strip()[:100]!r}")
        if fields:
            entries[fields[0]] = (int(fields[1]), where)
    return entries


def _count(low, high):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


# The VAE config.json fields the port reads -> (check, what it must be). The bounds refuse absurd sizes in one line; the
# weights file must then hold every tensor of the config, shape for shape, before anything is allocated (vae.py).
VAE_FIELDS = {
    "in_channels": (_count(1, 64), "an integer in [1, 64]"),
    "out_channels": (_count(1, 64), "an integer in [1, 64]"),
    "latent_channels": (_count(1, 64), "an integer in [1, 64]"),
    "layers_per_block": (_count(1, 8), "an integer in [1, 8]"),
    "norm_num_groups": (_count(1, 512), "an integer in [1, 512]"),
    "block_out_channels": (lambda v: isinstance(v, (list, tuple)) and 1 <= len(v) <= 8 and all(map(_count(1, 4096), v)),
                           "a list of 1 to 8 integers in [1, 4096]"),
    "scaling_factor": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf,
                       "a positive number"),
}


def vae_settings(config, source):
    """The AutoencoderKL arguments of a diffusers config.json, each field checked (other keys are ignored)."""
    if not isinstance(config, dict):
        raise UserError(f"{source} is not a JSON object of VAE settings")
    kw = {k: config[k] for k in VAE_FIELDS if config.get(k) is not None}
    for key, value in kw.items():
        if not VAE_FIELDS[key][0](value):
            raise UserError(f"{source}: {key} is {value!r}, not {VAE_FIELDS[key][1]}")
    groups, widths = kw.get("norm_num_groups", 32), kw.get("block_out_channels", (128,))
    if any(c % groups for c in widths):
        raise UserError(f"{source}: norm_num_groups {groups} does not divide block_out_channels {list(widths)}")
    return kw


# A latent cache (data.py): moments.npy float16 (N, 2, 2C, h, w) ([i, 0] the image, [i, 1] its mirror; channels mean
# then logvar), labels.npy int64 (N,), done.npy bool (N,), and meta.json (format, version, data, data_path, split,
# image_size, num_images, latent_shape, hierarchy, vae, files_sha256, command, complete).
CACHE_FORMAT, CACHE_VERSION = "finediffusion-latent-cache", 2
CACHE_ARRAYS = {"moments.npy": np.float16, "labels.npy": np.int64, "done.npy": np.bool_}


def cache_shapes(meta):
    n, (c, h, w) = meta["num_images"], meta["latent_shape"]
    return {"moments.npy": (n, 2, 2 * c, h, w), "labels.npy": (n,), "done.npy": (n,)}


def create_npy(path, dtype, shape):
    """A zero-filled .npy whose disk blocks are allocated now (posix_fallocate): a full disk fails here, at once, not
    with SIGBUS when a page of a sparse memmap is first written."""
    header = dict(descr=np.lib.format.dtype_to_descr(np.dtype(dtype)), fortran_order=False, shape=tuple(shape))

    def write(f):
        np.lib.format.write_array_header_1_0(f, header)
        os.posix_fallocate(f.fileno(), 0, f.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize)
    atomic_write(path, write)


def open_cache_arrays(path, meta, mode="r"):
    """{file name: memmap} of a cache's arrays, each checked against meta.json (dtype and shape): a file cut short or of
    another cache is refused before done.npy is trusted."""
    arrays = {}
    for name, shape in cache_shapes(meta).items():
        file = os.path.join(path, name)
        try:
            array = np.load(file, mmap_mode=mode)
        except (OSError, ValueError, EOFError) as e:  # missing, empty, or shorter than its header says (cut short)
            raise UserError(f"latent cache file {file} cannot be read ({e}): delete {path} and build it again") from None
        if array.shape != tuple(shape) or array.dtype != CACHE_ARRAYS[name]:
            raise UserError(f"latent cache file {file} holds {array.dtype} {list(array.shape)} where meta.json says "
                            f"{np.dtype(CACHE_ARRAYS[name])} {list(shape)}: delete {path} and build it again")
        arrays[name] = array
    return arrays


def read_cache_meta(path):
    """<path>/meta.json, checked to describe a cache: one line naming the file otherwise."""
    meta_path = os.path.join(path, "meta.json")
    meta = read_json(meta_path, "latent cache's")
    n, shape = (meta.get("num_images"), meta.get("latent_shape")) if isinstance(meta, dict) else (None, None)
    if not (_count(0, 10 ** 12)(n) and isinstance(shape, list) and len(shape) == 3 and all(map(_count(1, 10 ** 6), shape))):
        raise UserError(f"{meta_path}: num_images {n!r} and latent_shape {shape!r} are not a count and [C, h, w]")
    vae = meta.get("vae")
    if isinstance(vae, dict) and not (isinstance(vae.get("config"), dict) and VAE_FIELDS["scaling_factor"][0](
            vae["config"].get("scaling_factor", 1.0))):
        raise UserError(f"{meta_path}: its vae record is not a VAE's identity (a config with a positive scaling_factor)")
    return meta


def prepare_cache_dir(out_dir, meta):
    """Create a new cache's files, or check that the cache in out_dir is the same job (then it resumes)."""
    meta_path = os.path.join(out_dir, "meta.json")
    remove_stale_temp_files(out_dir)
    if os.path.isfile(meta_path):
        old = read_cache_meta(out_dir)
        for key in ("format", "version", "data", "data_path", "split", "image_size", "num_images", "latent_shape",
                    "vae", "files_sha256", "hierarchy"):
            if old.get(key) != meta.get(key):
                shown = (lambda v: "(differs)" if key == "hierarchy" else repr(v))
                raise UserError(f"{out_dir} holds another latent cache ({key}: {shown(old.get(key))} there, "
                                f"{shown(meta.get(key))} now): choose another --out or delete that directory")
        open_cache_arrays(out_dir, old)               # the rows done.npy marks are really there
        return
    os.makedirs(out_dir, exist_ok=True)
    for name, shape in cache_shapes(meta).items():
        create_npy(os.path.join(out_dir, name), CACHE_ARRAYS[name], shape)
    write_json(meta_path, meta)  # last: a cache without meta.json is simply rebuilt


def open_cache(path, expect):
    """A complete latent cache at `path` -> (meta, arrays), checked to be one of this version and to match `expect`
    (meta.json fields this run needs; None is not checked), else one line saying what to run."""
    if not os.path.isfile(os.path.join(path, "meta.json")):
        raise UserError(f"no latent cache at {path} (no meta.json): build it with `python data.py cache "
                        f"--data ... --data-path ... --vae ... --out {path}`")
    meta = read_cache_meta(path)
    rebuild = meta.get("command") or f"python data.py cache ... --out {path}"
    if (meta.get("format"), meta.get("version")) != (CACHE_FORMAT, CACHE_VERSION):
        raise UserError(f"{path} is not a version-{CACHE_VERSION} latent cache: rebuild it with `{rebuild}`")
    for key, want in expect.items():
        have = meta.get(key)
        if key == "data_path" and want is not None and have is not None:
            want, have = os.path.realpath(want), os.path.realpath(have)
        if want is not None and have != want:
            raise UserError(f"latent cache {path} was built with {key}={have!r} but this run has {key}={want!r}: "
                            f"rebuild it with `python data.py cache ...` (was: `{rebuild}`) into another --out")
    missing = [f for f in CACHE_ARRAYS if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise UserError(f"latent cache {path} lacks {', '.join(missing)}: rebuild it with `{rebuild}`")
    arrays = open_cache_arrays(path, meta)
    if not meta.get("complete") or not arrays["done.npy"].all():
        raise UserError(f"latent cache {path} is incomplete ({int(arrays['done.npy'].sum())} of "
                        f"{len(arrays['done.npy'])} images encoded): re-run `{rebuild}` to resume it")
    check_hierarchy(meta.get("hierarchy"), os.path.join(path, "meta.json"))
    labels = arrays["labels.npy"]
    if len(labels) and not 0 <= labels.min() <= labels.max() < len(meta["hierarchy"]["class_names"]):
        raise UserError(f"latent cache {path}: labels.npy holds class ids outside the hierarchy's classes")
    return meta, arrays


def npz_member_layout(path, member):
    """(shape, dtype, byte offset of the data or None when compressed) of an .npy member of an .npz, from its headers
    alone: a damaged file is one line naming it."""
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
            info = archive.getinfo(member)
            with archive.open(info) as npy:
                version = np.lib.format.read_magic(npy)      # 1.0, or 2.0 / 3.0 (larger headers, read alike)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(npy)
                header_size = npy.tell()
            f.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])   # the zip's local file header
            start = info.header_offset + 30 + name_len + extra_len + header_size
    except KeyError:
        raise UserError(f"{path}: no {member[:-4]} in it") from None
    except (OSError, ValueError, EOFError, struct.error, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path}: {e} (a damaged or cut-short .npz?)") from None
    if fortran:
        raise UserError(f"{path}: {member} is stored in Fortran order; save it with np.savez from a C-order array")
    return shape, dtype, start if info.compress_type == zipfile.ZIP_STORED else None


def read_npz(path, names=None):
    """The arrays of an .npz (no pickles; `names`: only these, where present), or a clear error."""
    try:
        with open(find_file(path), "rb") as f, np.load(f, allow_pickle=False) as arrays:
            return {k: arrays[k] for k in arrays.files if names is None or k in names}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path}: {e} (a damaged or cut-short .npz?)") from None


def npz_names(path):
    """The array names in an .npz (its zip members), without reading any array."""
    try:
        with zipfile.ZipFile(find_file(path)) as archive:
            return {n[:-4] for n in archive.namelist() if n.endswith(".npy")}
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path}: {e} (a damaged or cut-short .npz?)") from None


def statistics_file(path):
    """Feature statistics read from a file, or None when it holds none (images): ours (evaluate.image_stats, with
    their provenance), pytorch-fid's --save-stats (mu, sigma) or ADM's reference batches (arr_0, mu, sigma). Other
    tools' files give the overall FID only: no per-superclass parts, no count, no record of their making (said once)."""
    names = npz_names(path)
    if not {"mu", "sigma"} <= names:
        return None
    arrays = read_npz(path, [n for n in names if n != "arr_0"])   # ADM's images are not needed for the FID
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{path}: mu {list(mu.shape)} and sigma {list(sigma.shape)} are not the mean and covariance "
                        "of feature vectors")
    for name, value in arrays.items():
        if name.startswith("count") and (value.shape != () or value.dtype.kind not in "iu" or int(value) < 0):
            raise UserError(f"{path}: '{name}' is {value.dtype} {list(value.shape)}, not a count of images")
        part = name.split("_", 1)[0] if re.fullmatch(r"(mu|sigma)_\d+", name) else None   # a superclass's, of ours
        if part and (value.shape != (len(mu),) * (1 if part == "mu" else 2) or not np.isfinite(value).all()):
            raise UserError(f"{path}: '{name}' {list(value.shape)} is not a superclass's {part} of the "
                            f"{len(mu)}-d features")
    check_metric_parts(arrays, len(mu), path)
    if "count" not in arrays:
        print(f"note: {path} holds mu and sigma only (another tool's statistics): the overall FID only, no "
              "per-superclass rows, image count unknown", file=sys.stderr)
    read_provenance(arrays, path)                        # checked now: a damaged record is one line here
    stats_hierarchy(arrays, path)
    return arrays


def check_metric_parts(arrays, dim, path):
    """The parts of our statistics beyond FID's (evaluate.image_stats): the pool features of each image (float, finite,
    `count` rows of `dim`) with each one's superclass, the spatial means and covariances, the (mean, std) of each IS."""
    count = int(arrays.get("count", -1))
    features, superclass = arrays.get("features"), arrays.get("superclass")
    if features is not None and (features.shape != (count, dim) or features.dtype.kind != "f"
                                 or not np.isfinite(features).all()):
        raise UserError(f"{path}: features {features.dtype} {list(features.shape)} are not the {count} images' finite "
                        f"{dim}-d features")
    if features is not None and "hierarchy" in arrays and superclass is None:
        raise UserError(f"{path}: features without each one's superclass; make the statistics again with `evaluate.py "
                        "stats`")
    if superclass is not None and (superclass.shape != (count,) or superclass.dtype.kind not in "iu"):
        raise UserError(f"{path}: superclass {superclass.dtype} {list(superclass.shape)} is not one superclass per "
                        "image")
    spatial_dim = np.size(arrays.get("spatial_mu", ()))
    for name, value in arrays.items():
        spatial = re.fullmatch(r"spatial_(mu|sigma)(_\d+)?", name)
        shape = (spatial_dim,) * (1 if spatial and spatial[1] == "mu" else 2)
        if spatial and (value.shape != shape or not np.isfinite(value).all()):
            raise UserError(f"{path}: '{name}' {list(value.shape)} is not a {spatial[1]} of the {spatial_dim}-d "
                            "spatial features")
        if re.fullmatch(r"isc(_\d+)?", name) and (value.shape != (2,) or value.dtype.kind != "f"):
            raise UserError(f"{path}: '{name}' {value.dtype} {list(value.shape)} is not an Inception Score's mean "
                            "and std")


def read_provenance(arrays, path="the statistics"):
    """What made statistics (evaluate.image_stats' `provenance`: source, image size, crop, Inception sha256, count), or
    None for a file that does not say (another tool's, or ours from before it was recorded)."""
    if "provenance" not in arrays:
        return None
    try:
        provenance = json.loads(str(arrays["provenance"]))
        ok = isinstance(provenance, dict) and isinstance(provenance.get("image_size"), list) and \
            isinstance(provenance.get("inception_sha256"), (str, type(None)))
    except ValueError:
        ok = False
    if not ok:
        raise UserError(f"{path}: its provenance is not a record of image_size and inception_sha256")
    return provenance


def stats_hierarchy(stats, source="the statistics"):
    """The hierarchy a statistics (or images) file carries as JSON, checked; None when it carries none."""
    if "hierarchy" not in stats:
        return None
    try:
        return check_hierarchy(json.loads(str(stats["hierarchy"])), source)
    except ValueError as e:
        raise UserError(f"{source}: its hierarchy is not JSON ({e})") from None


MANIFEST = "samples.json"   # a generate folder's record of what made its images, and of each image's class


def read_manifest(folder):
    """OUT/samples.json, checked; None when there is none. Its image names must stay inside OUT once links are
    followed: `generate --overwrite` deletes, and `fid` reads, the files it names."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    manifest = read_json(path, "samples manifest")
    try:
        made_by, images = manifest["made_by"], manifest["images"]
        hierarchy = None if manifest.get("hierarchy") is None else check_hierarchy(manifest["hierarchy"], path)
    except (TypeError, KeyError) as e:
        raise UserError(f"cannot read {path}: {e!r}") from None
    if not isinstance(made_by, dict) or not isinstance(images, list):
        raise UserError(f"{path}: 'made_by' and 'images' are not a dict and a list")
    for entry in images:
        name, label = entry if isinstance(entry, list) and len(entry) == 2 else (None, None)
        if not isinstance(name, str) or not isinstance(label, int) or isinstance(label, bool) or \
                not is_inside(folder, os.path.join(folder, name)):
            raise UserError(f"{path}: the entry {entry!r} is not [a file name inside {folder}, its class]")
    return dict(manifest, hierarchy=hierarchy)


# --- The checks at the stage files' edges: training ------------------------------------------------------------------

def check_train_args(args, world, data_root):
    """train.py's mistakes found before any process starts work (every rank finds the same ones)."""
    if args.global_batch_size % world:
        raise UserError(f"--global-batch-size {args.global_batch_size} does not divide over {world} processes: "
                        f"use a positive multiple of {world}")
    if args.resume and args.export:
        return
    if not args.data and not args.latent_cache:
        raise UserError("--data is required (inat21, folder or toy), or --latent-cache DIR")
    if args.data in ("inat21", "folder") and not args.latent_cache and not os.path.isdir(data_root):
        where = "; iNat21 is published at https://github.com/visipedia/inat_comp/tree/master/2021" \
            if args.data == "inat21" else ""
        raise UserError(f"--data {args.data}: no dataset at {data_root} (put it there or pass --data-path DIR){where}")


def check_precision(precision, device):
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bf16 (e.g. a V100): use --precision fp16")


def check_image_size(name, image_size, pixel_space):
    """A DiT cuts its input (the pixels, or VAE latents 8x smaller) into patch x patch tokens: the side must be a
    positive multiple of the patch (times 8 in latent space), else training fails at step 1 on shapes."""
    unit = int(name.rsplit("/", 1)[1]) * (1 if pixel_space else 8)
    if image_size < 1 or image_size % unit:
        space = "pixels" if pixel_space else "VAE latents 8x smaller than the image"
        raise UserError(f"--image-size {image_size}: {name} on {space} needs a positive multiple of {unit}")


def check_toy_base(path, toy_base, sha256):
    """The shipped toy base, if it is the --init, must be the file the repository shipped (not a changed or
    half-checked-out one)."""
    if path and os.path.isfile(toy_base) and os.path.samefile(path, toy_base) and file_sha256(path) != sha256:
        raise UserError(f"{toy_base} is not the toy base this repository shipped (its sha256 differs): restore it "
                        f"with `git checkout -- {toy_base}`")


def check_fits_base(args, name, image_size):
    for flag, given, found in (("--model", args.model, name), ("--image-size", args.image_size, image_size)):
        if given is not None and given != found:
            raise UserError(f"{flag} {given} does not match the --init checkpoint ({found}): leave it out")


def check_training_inputs(cache, vae, pixel, image_size, latent_channels, cache_path, same_vae):
    """The latent cache (if any) must hold this DiT's latents, made by the VAE of this run (if it has one: same_vae
    says whether the two are one); the VAE must make the DiT's latents."""
    latents = [latent_channels, image_size // 8, image_size // 8]
    if cache is not None and (pixel or cache.latent_shape != latents):
        raise UserError(f"the latent cache holds {'x'.join(map(str, cache.latent_shape))} latents of "
                        f"{cache.image_size}px images; this DiT takes " + (f"{image_size}px pixels" if pixel else
                        f"{'x'.join(map(str, latents))} latents of {image_size}px images"))
    if vae is not None:
        vae.check_fits(latent_channels, image_size)
    if not same_vae:
        raise UserError(f"the latent cache {cache_path} was built with another VAE than {vae.weights_file}")


def check_same_classes(dataset_hierarchy, model_hierarchy, resume):
    if dataset_hierarchy != model_hierarchy:
        raise UserError(f"the data's classes differ from those of {resume}: resume with the same --data")


def batches_per_epoch(items, per_process, local_batch):
    if per_process < local_batch:
        raise UserError(f"{items} training items give {per_process} per process, fewer than the per-process batch "
                        f"{local_batch}: lower --global-batch-size")
    return per_process // local_batch


def check_losses(losses, step, last_ckpt):
    """The losses of the last len(losses) steps up to `step`, or RunFailed at the first that is not finite: the run
    stops before anything is saved, so the last checkpoint stays the last good state."""
    bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
    if bad is not None:
        kept = f"the last good checkpoint is {last_ckpt}: resume from it" if last_ckpt else \
            "no checkpoint was written yet: start again"
        raise RunFailed(f"loss is {losses[bad]} at step {step - len(losses) + bad + 1}: stopped; {kept} with a lower "
                        "--lr or --precision fp32")
    return losses


@contextmanager
def saving_checkpoint(path, step, last_ckpt):
    """A checkpoint that cannot be written (a full disk, no permission) is one line naming the last good one (atomic
    writes leave nothing half-written, and the earlier checkpoints intact)."""
    try:
        yield
    except OSError as e:
        why, fix = ("disk full", "free some space") if e.errno in DISK_FULL else (
            e.strerror, "make the folder writable" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else
            "check the disk")
        if last_ckpt:
            raise RunFailed(f"{why} writing {path}; last good checkpoint: {last_ckpt}; nothing else lost; "
                            f"{fix} and resume from it") from None
        raise RunFailed(f"{why} writing {path}, the run's first checkpoint: its {step} steps are lost; "
                        f"{fix} and start again") from None


def append_log(path, line, say, failed):
    """Append a line to the run's log; a log line is not worth the steps since the last checkpoint: if it cannot be
    written (a full disk), warn once and train on. -> whether the log is failing."""
    try:
        append_line(path, line)
        return False
    except OSError as e:
        if not failed:
            say(f"warning: cannot append to log.jsonl ({e.strerror}); training goes on, logging to the console only "
                "until it can")
        return True


def check_resume(args, ckpt, fixed):
    """--resume names a training checkpoint, and changes nothing that fixes the model or its data."""
    if "train" not in ckpt:
        raise UserError(f"--resume {args.resume}: not a training checkpoint of this train.py (to start from it, use "
                        "--init)")
    for k in fixed:
        if k in args.given and getattr(args, k) != ckpt["args"].get(k):
            show = lambda v: ",".join(map(str, v)) if isinstance(v, list) else v      # --tiers as typed
            raise UserError(f"--{k.replace('_', '-')} {show(getattr(args, k))}: the resumed run has "
                            f"{show(ckpt['args'].get(k))} "
                            f"and cannot change it; leave it out, or start a new run from it with --init {args.resume}")


def check_resume_steps(args, ckpt):
    if not args.export and args.max_steps <= ckpt["step"]:
        raise UserError(f"--max-steps {args.max_steps}: {args.resume} is already at step {ckpt['step']}; pass a larger "
                        "--max-steps to train on")


# --- The checks at the stage files' edges: checkpoints ---------------------------------------------------------------

def dit_shapes(state, table_key, sizes):
    """A DiT's sizes read from a state dict's tensor shapes (a published file carries nothing else), or one line:
    {size (a key of `sizes`, {name: (depth, width)}), patch, in_channels, num_patches, out_channels, rows}."""
    try:
        w = state["x_embedder.proj.weight"]                       # (D, C_in, p, p)
        hidden, in_channels, patch = w.shape[0], w.shape[1], w.shape[2]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        shape = dict(patch=patch, in_channels=in_channels, num_patches=state["pos_embed"].shape[1],
                     out_channels=state["final_layer.linear.weight"].shape[0] // (patch * patch),
                     rows=state[table_key].shape[0])
    except (KeyError, ValueError, IndexError, AttributeError) as e:
        raise UserError(f"not a DiT state dict (missing or odd tensor {e})") from None
    size = next((s for s, dims in sizes.items() if dims == (depth, hidden)), None)
    if size is None:
        raise UserError(f"no DiT configuration has depth {depth} and width {hidden}")
    return dict(shape, size=size)


def check_config(config, path):
    """The `config` of one of our checkpoints (model.save_checkpoint's schema), checked to be one."""
    needed = ("name", "image_size", "num_classes", "num_superclasses", "method")
    if not isinstance(config, dict) or not all(k in config for k in needed) or \
            not isinstance(config.get("tiers", []), list) or not all(isinstance(r, str) for r in config.get("tiers", [])):
        raise UserError(f"{path}: its 'config' is not a DiT configuration (a dict of {', '.join(needed)})")
    return dict(config)


def delta_base(ckpt, base=None, base_flag="--base"):
    """The base file of a delta checkpoint: `base` (where it moved) or the recorded path, refused unless its sha256 is
    the one recorded at training time (a delta on another base draws silently wrong images)."""
    try:
        path = find_file(base or ckpt["base"]["path"])
    except UserError as e:
        where = f"if it moved, pass its new place with {base_flag}" if base_flag else "put it back there"
        raise UserError(f"{e}; it is the base of this delta checkpoint: {where}") from None
    if file_sha256(path) != ckpt["base"]["sha256"]:
        raise UserError(f"base checkpoint {path} is not the one this delta was trained on (sha256 differs)")
    return path


# --- The checks at the stage files' edges: data and sampling ---------------------------------------------------------

def require_dir(root, folder, what, hint=""):
    """--data-path `root` and the dataset's `folder` in it (a split: holding class folders), or one line saying where
    the dataset goes."""
    if not root:
        raise UserError(f"{what}: no data path given (--data-path){hint}")
    if not os.path.isdir(root):
        raise UserError(f"{what}: {root} is not a directory (put the dataset there or pass --data-path){hint}")
    if not os.path.isdir(folder):
        present = ", ".join(d for d in sorted(os.listdir(root)) if d in ("train_mini", "train", "val")) or "none"
        raise UserError(f"{what}: no {os.path.basename(folder)}/ folder in {root} (splits present: {present}){hint}")
    with os.scandir(folder) as entries:
        empty = not any(e.is_dir() and not e.name.startswith(".") for e in entries)
    if folder != root and empty:
        raise UserError(f"{what}: {folder} holds no class folders{hint}")


def resolve_class(hierarchy, num_classes, class_id=None, class_name=None, flag="--class-id"):
    """A class id from --class-id (or the command's `flag`) or --class-name (exact, else the one name containing it),
    checked against the checkpoint's classes."""
    if class_name is not None:
        if hierarchy is None:
            raise UserError("this checkpoint carries no class names: use --class-id")
        names = hierarchy["class_names"]
        exact = [i for i, n in enumerate(names) if n.lower() == class_name.lower()]
        matches = exact or [i for i, n in enumerate(names) if class_name.lower() in n.lower()]
        if len(matches) != 1:
            some = ", ".join(names[i] for i in matches[:5])
            raise UserError(f"--class-name {class_name!r} matches {len(matches)} classes{': ' + some if some else ''}")
        return matches[0]
    if class_id is None or not 0 <= class_id < num_classes:
        raise UserError(f"{flag} must be in [0, {num_classes}) for this checkpoint, got {class_id}")
    return class_id


def check_hierarchy_known(hierarchy, tier_sizes, guidance):
    """Eq. 1's guide rows need the hierarchy: a file with tier rows that does not say which subclass is under which node
    (the authors' FineDiffusion-VegFru.pt: 292 + 25 rows, no more) is refused, naming what tells it."""
    if hierarchy is None and guidance in tier_sizes:
        raise UserError(f"the checkpoint has {tier_sizes[guidance]} {guidance} rows but does not say which subclass is "
                        f"under which (as the authors' FineDiffusion-VegFru.pt): pass --data-path with VegFru's root, "
                        "the folder holding vegfru_list/, whose lists tell it")


def check_guide_rows(tiers, has_null, guidance):
    """The label table must have the rows its guide reads (eq. 1: a tier's rows; standard CFG: the null row)."""
    if guidance == "null" and not has_null:
        raise UserError("this checkpoint has no null row (FineDiffusion tables are K+S rows): use --guidance superclass")
    if guidance == "superclass" and guidance not in tiers:
        raise UserError("this checkpoint has no superclass rows: use --guidance null")
    if guidance not in (*tiers, "null"):
        raise UserError(f"--guidance {guidance}: this checkpoint's label table has rows for "
                        f"{', '.join(tiers) or 'no rank'}{' and a null row' if has_null else ''}: use one of them")


def check_tiers(tiers, ranks, tier_probs, tiered):
    """--tiers: ranks of the data's hierarchy, for a tiered table; --tier-probs: one weight a tier."""
    if not tiered and tiers != ["superclass"]:
        raise UserError(f"--tiers {','.join(tiers)}: this run's label table has a null row and no tiers (--table "
                        "null, or a baseline's --tune): pass --table tiered")
    unknown = [r for r in tiers if r not in ranks]
    if unknown:
        raise UserError(f"--tiers {','.join(tiers)}: the data's hierarchy has no rank {', '.join(unknown)} (its ranks: "
                        f"{', '.join(ranks)})")
    if tier_probs is not None and len(tier_probs) != len(tiers):
        raise UserError(f"--tier-probs: {len(tier_probs)} weights for the {len(tiers)} tiers {','.join(tiers)}")


def check_interval(interval, trained_steps, guided=True):
    """--guidance-interval LO HI as a (lo, hi) of trained timesteps, for a run that guides."""
    if not 0 <= interval[0] <= interval[1] <= trained_steps - 1:
        raise UserError(f"--guidance-interval {interval[0]} {interval[1]}: need 0 <= LO <= HI <= {trained_steps - 1}")
    if not guided:
        raise UserError("--guidance-interval needs guidance: --guidance superclass or null, --cfg-scale other than 1")
    return tuple(interval)


@contextmanager
def refused_as(flags):
    """A ValueError of the code inside (settings it cannot take) as one line naming the flags that chose them."""
    try:
        yield
    except ValueError as e:
        raise UserError(f"{flags}: {e}") from None


def check_decoder(decoder, trained_scale, trained_vae, same_vae):
    """A VAE must scale latents as the DiT was trained (else every image is off); another VAE than the training run's
    (trained_vae: its record, or None; same_vae: is it the decoder?) is named in a warning."""
    if decoder.scaling_factor != trained_scale:
        raise UserError(f"the VAE {decoder.weights_file} scales latents by {decoder.scaling_factor:g}, this DiT was "
                        f"trained on latents scaled by {trained_scale:g}: decode with the VAE it was trained with (--vae)")
    if not same_vae and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: decoding with {decoder.weights_file}, not the VAE this DiT was trained with "
              f"(sha256 {str(trained_vae['sha256'])[:12]}...): the images may be off", file=sys.stderr)


def check_samples(x, y, when):
    """x (N, ...) unchanged, or RunFailed naming the classes whose samples are not finite: a NaN would be written as a
    black image (the uint8 cast) and counted in the FID."""
    bad = ~torch.isfinite(x.flatten(1)).all(dim=1)                            # (N,)
    if bad.any():
        classes = sorted(set(y[bad.to(y.device)].tolist()))
        raise RunFailed(f"{int(bad.sum())} of {len(x)} samples are not finite {when} (class "
                        f"{', '.join(map(str, classes[:5]))}{' ...' if len(classes) > 5 else ''}); none of them is "
                        "written: check the checkpoint's weights, or sample with --precision fp32 or bf16")
    return x


def check_comparable(real, fake, names, real_is_file):
    """Refuse to compare images of two sizes, or features of two Inception networks (either makes the FID
    meaningless), in one line naming both and what to do. real, fake: what made each side ({"image_size",
    "inception_sha256"}, or None where a file does not say: said once)."""
    unknown = [name for name, made in zip(names, (real, fake)) if made is None]
    if unknown:
        print(f"note: {' and '.join(unknown)} do not record what made them (another tool's statistics, or ours from "
              "before this was recorded): their image size and Inception weights cannot be checked", file=sys.stderr)
        return
    size = lambda v: "x".join(map(str, v))
    if real["image_size"] != fake["image_size"]:
        fix = (f"make the statistics again with --image-size {fake['image_size'][0]}, or pass --image-size "
               f"{real['image_size'][0]} to score the generated images at theirs") if real_is_file else \
            "pass --image-size to score both"
        raise UserError(f"{names[0]} holds {size(real['image_size'])} px images and {names[1]} "
                        f"{size(fake['image_size'])} px ones: FID compares them at one size; {fix}")
    if real["inception_sha256"] != fake["inception_sha256"]:
        raise UserError(f"{names[0]} was described by the Inception weights sha256 {str(real['inception_sha256'])[:12]}"
                        f"... and {names[1]} by {str(fake['inception_sha256'])[:12]}...: features of two networks are "
                        "not comparable; pass --inception with the file the statistics were made with, or make them "
                        "again")

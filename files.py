"""Files: where published weights are looked up, atomic writes, JSON and CSV, temp files, content hashes.

Every file this project writes goes through `atomic_write` (a temp file beside the target, then a rename), so a
crash or a full disk never leaves a half-written checkpoint, image or table. Nothing is ever downloaded:
`find_file` names where a missing published file is published.
"""
import csv
import fcntl
import hashlib
import io
import json
import os
import re
import signal
import socket
import time

from cli import STOP_SIGNALS, UserError


# The published files this project reads, and where to get them. None is ever downloaded by the code.
PUBLISHED = {
    "DiT-XL-2-256x256.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
    "DiT-XL-2-512x512.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt",
    "FineDiffusion-iNat.pt": "the authors' release, linked from https://finediffusion.github.io/",
    "sd-vae-ft-ema": "https://huggingface.co/stabilityai/sd-vae-ft-ema (config.json and "
                     "diffusion_pytorch_model.safetensors, in a folder of that name)",
    "sd-vae-ft-mse": "https://huggingface.co/stabilityai/sd-vae-ft-mse",
    "pt_inception-2015-12-05-6726825d.pth":
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "alexnet-owt-7be5be79.pth": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "alex.pth": "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth",
}


def find_file(path, also=(), published=None):
    """A file or folder the user names: as given, else pretrained/<its name>, else the places in `also`.
    Missing: a UserError naming every place looked and, for a published file (`published`: its name, when the
    user's may differ), where it is published."""
    path = os.fspath(path)
    name = os.path.basename(os.path.normpath(path))
    places = list(dict.fromkeys([path, os.path.join("pretrained", name), *also]))
    for place in places:
        if os.path.exists(place):
            return place
    published = published or name
    where = f"; {published} is published at {PUBLISHED[published]}: put it in pretrained/" if published in PUBLISHED else ""
    raise UserError(f"{path} not found (looked in {', '.join(places)}){where}")


class _WholeWrites(io.FileIO):
    """A file whose write() writes all it is given or raises, and remembers what it raised: torch.save turns an
    OSError of its file into a bare RuntimeError ("unexpected pos"), which would hide a full disk."""
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


# atomic_write's temp files `.<name>.finediffusion-tmp<pid>`: a name no user file has by accident, so the clean-up
# below can only ever remove what this program wrote.
TEMP_TAG = ".finediffusion-tmp"
_TEMP_FILE = re.compile(r"^\..+" + re.escape(TEMP_TAG) + r"(\d+)$")


def atomic_write(path, write):
    """Call write(file) on a temp file beside `path` (`.<name>.finediffusion-tmp<pid>`), then rename it over `path`:
    a crash or a full disk never leaves a half-written checkpoint, image or table behind. A failed write is an
    OSError naming `path`."""
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


def read_json(path, what="JSON file"):
    """A JSON file, read as UTF-8 whatever the locale (iNat21's names are not ASCII), or one line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:                   # UnicodeDecodeError is a ValueError
        raise UserError(f"cannot read the {what} {path}: {e}") from None


def write_json(path, obj, indent=1):
    """`obj` as a JSON file, atomically (indent=None: one compact line, for large manifests)."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=indent) + "\n").encode()))


def write_csv(path, rows):
    """Rows (dicts) as CSV, columns in order of first appearance; None is an empty cell."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: "" if v is None else v for k, v in r.items()} for r in rows])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def remove_stale_temp_files(folder):
    """Delete the temp files under `folder` whose writer is dead (killed mid-write: they would stay forever, up to
    a checkpoint in size); a live process's are its own. Pids are this machine's: call it where the writers run."""
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


def is_inside(folder, path):
    """Is `path` inside `folder` once every link on the way is followed (realpath), not only as written?"""
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


def file_sha256(path):
    """Hex sha256 of a file's bytes: the identity of a base checkpoint or a VAE under any name or path."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def find_weights(path, filename):
    """A published weights file: `path` (or its file name) as given, under pretrained/, or in torch's cache."""
    torch_home = os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch"))
    return find_file(path or filename, also=[os.path.join(torch_home, "hub", "checkpoints", filename)],
                     published=filename)


# The folder locks this process holds. A forked DataLoader worker inherits them: worker_init drops its copies, so that a
# lock dies with the process that took it (kill -9 included), not seconds later with the workers it leaves behind.
LOCKS = []


def lock_folder(folder, taken_by="another training run", fix="wait for it to end or choose another --run-dir"):
    """Take the exclusive lock <folder>/.lock (flock: the kernel drops it when its holder dies), and write who holds
    it there. -> the open lock file; `release` it. One line naming the holder when another process has it: two
    writers in one folder would silently mix what they write."""
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


def worker_init(worker_id):
    """Every DataLoader's worker_init_fn. A scheduler or Ctrl-C signals the whole process group: the workers leave it to
    their main process, which finishes its step, shuts them down and saves; and they drop their copies of this process's
    folder locks."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    for lock in LOCKS:
        lock.close()

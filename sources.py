"""What evaluate.py scores, read from the files users bring: images with their classes and hierarchy, and feature
statistics.

Images: a generate folder (OUT/samples.json says each image's class and the hierarchy), an .npz of images (arr_0
(N, H, W, 3) uint8; optional labels and hierarchy), a folder of unlabelled images, or a data.py dataset (real
images). An image always travels with its own label, and every source says what its images are (`made`: where they
come from, the size they are scored at, their crop), which statistics files keep and `fid` compares. Statistics:
ours (evaluate.image_stats: mu, sigma, count, per-superclass parts and that provenance), pytorch-fid's --save-stats
(mu, sigma) and ADM's reference batches (arr_0, mu, sigma). Every file is untrusted input: a damaged or hostile one
is one line naming it. Every reader pickles, so DataLoader workers start under any start method (spawn included).
"""
import json
import os
import re
import struct
import sys
import zipfile

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

import data
from cli import UserError
from files import find_file, is_inside, read_json
from hierarchy import inat21_hierarchy, read_hierarchy

MANIFEST = "samples.json"   # a generate folder's record of what made its images, and of each image's class
ADM_CROP = "ADM centre crop"


class ImageSource(Dataset):
    """Images to score. item i -> (uint8 [3, H, W], class id or -1), or None for a real image left out (its file
    cannot be read; collate_images drops it, its label with it); `labels` (N,); `hierarchy` or None.

    `read(i)` gives image i as uint8 (H, W, 3) (or None). `made`: what the images are, as statistics record it:
    {"source": {"kind", ...}, "image_size": [H, W] as scored, "crop": ADM_CROP or "none"}."""

    def __init__(self, name, read, labels, hierarchy, made):
        self.name, self.read, self.hierarchy, self.made = name, read, hierarchy, made
        self.labels = np.asarray(labels, np.int64)
        if hierarchy is not None and self.labels.max(initial=-1) >= len(hierarchy["superclass_of"]):
            raise UserError(f"{name}: class id {self.labels.max()} is outside its hierarchy "
                            f"({len(hierarchy['superclass_of'])} classes)")

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.read(i)  # (H, W, 3)
        if image is None:
            return None
        return torch.from_numpy(np.array(image)).permute(2, 0, 1), int(self.labels[i])   # a copy: maps are read-only


def read_png(path, image_size=0):
    image = data.read_rgb(path)  # any format and Pillow mode; a file it cannot read is a UserError naming it
    return np.array(data.center_crop_arr(image, image_size) if image_size else image)  # (H, W, 3)


class ImageFiles:
    """read(i): image file i, centre-cropped to image_size (0: as it is)."""

    def __init__(self, files, image_size=0):
        self.files, self.image_size = files, image_size

    def __call__(self, i):
        return read_png(self.files[i], self.image_size)


class DatasetImages:
    """read(i): item i of a data.py dataset itself (data.exact_item) as uint8, or None when its file cannot be read."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self, i):
        item = data.exact_item(self.dataset, i)  # ((3, H, W) in [-1, 1], class id) or None
        return None if item is None else ((item[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


class NpzImages:
    """read(i): row i of an .npz's arr_0, memory-mapped when the member is stored uncompressed (np.savez, ADM's
    batches), so any N costs no memory; a compressed one (np.savez_compressed) is read whole, once per process."""

    def __init__(self, path):
        self.path, self.shape, self.dtype, self.offset = path, *npz_member_layout(path, "arr_0.npy")
        self._array = None

    def __getstate__(self):                    # a worker opens its own map (a pickled memmap would copy the data)
        return {**self.__dict__, "_array": None}

    def array(self):
        if self._array is None:
            if self.offset is None:
                self._array = read_npz(self.path, ["arr_0"])["arr_0"]
            else:
                self._array = np.memmap(self.path, self.dtype, "r", self.offset, self.shape)
        return self._array

    def __call__(self, i):
        return self.array()[i]


def npz_member_layout(path, member):
    """(shape, dtype, byte offset of the data, or None when compressed) of an .npy member of an .npz, from its
    headers alone: a damaged file is one line naming it."""
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
            local = f.read(30)                 # the zip's local file header: its name and extra field lengths
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len + header_size
    except KeyError:
        raise UserError(f"{path}: no {member[:-4]} in it") from None
    except (OSError, ValueError, EOFError, struct.error, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path}: {e} (a damaged or cut-short .npz?)") from None
    if fortran:
        raise UserError(f"{path}: {member} is stored in Fortran order; save it with np.savez from a C-order array")
    stored = info.compress_type == zipfile.ZIP_STORED
    return shape, dtype, start if stored else None


def dataset_images(dataset, name, data=None, split=None, root=None):
    """Real images of a data.py dataset (no flips), as uint8 with its labels and hierarchy. Each is the item itself
    (data.exact_item), so labels[i] is its class; a file that cannot be read is left out, with a warning.
    data, split, root: what the dataset is (--data, --split, --data-path), for the statistics' provenance."""
    size = dataset.image_size
    made = dict(source=dict(kind="dataset", data=data, split=split, root=root and os.path.realpath(root)),
                image_size=[size, size], crop=ADM_CROP if hasattr(dataset, "files") else "none")
    return ImageSource(name, DatasetImages(dataset), dataset.targets, dataset.hierarchy(), made)


def load_hierarchy(spec):
    """--hierarchy: 'inat21' (the built-in iNat21 table) or a JSON file with the three hierarchy keys."""
    if spec == "inat21":
        return inat21_hierarchy()
    return read_hierarchy(read_json(spec, "hierarchy"), spec)


def open_images(path, image_size=0, hierarchy=None):
    """A generate folder (samples.json says each image's class and the hierarchy), an .npz (arr_0 [N, H, W, 3]
    uint8; optional labels and hierarchy), or a folder of unlabelled images. `hierarchy` overrides the file's;
    `image_size` centre-crops and resizes every image to it (0: as they are)."""
    crop = ADM_CROP if image_size else "none"
    if os.path.isdir(path):
        manifest = read_manifest(path)
        if manifest is None:
            files = [os.path.join(path, f) for f in data.list_images(path)]
            if not files:
                raise UserError(f"no images ({', '.join(data.IMAGE_EXTENSIONS)}) and no samples.json in {path}")
            size = [image_size] * 2 if image_size else first_image_size(files[0])
            made = dict(source=dict(kind="folder", folder=os.path.realpath(path)), image_size=size, crop=crop)
            return ImageSource(path, ImageFiles(files, image_size), [-1] * len(files), hierarchy, made)
        files = [os.path.join(path, f) for f, _ in manifest["images"]]
        missing = sum(not os.path.isfile(f) for f in files)
        if missing:
            raise UserError(f"{path}: {missing} of {len(files)} images are not generated yet: finish them with the "
                            "same `evaluate.py generate` command")
        size = image_size or manifest["made_by"].get("image_size")
        made = dict(source=dict(kind="generate", folder=os.path.realpath(path), made_by=manifest["made_by"]),
                    image_size=[size, size] if isinstance(size, int) else first_image_size(files[0]), crop=crop)
        return ImageSource(path, ImageFiles(files, image_size), [c for _, c in manifest["images"]],
                           hierarchy or manifest["hierarchy"], made)
    path = find_file(path)
    images = NpzImages(path)
    if len(images.shape) != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(f"{path}: expected images arr_0 [N, H, W, 3] uint8, found {images.dtype} {list(images.shape)}")
    extra = read_npz(path, ["labels", "hierarchy"])
    labels = extra["labels"] if "labels" in extra else np.full(images.shape[0], -1)
    if labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu":
        raise UserError(f"{path}: labels {labels.dtype} {list(labels.shape)} are not one class id per image")
    made = dict(source=dict(kind="npz", file=os.path.realpath(path)),
                image_size=[image_size] * 2 if image_size else list(images.shape[1:3]), crop=crop)
    return ImageSource(path, CroppedImages(images, image_size) if image_size else images, labels,
                       hierarchy or stats_hierarchy(extra, path), made)


class CroppedImages:
    """read(i): another reader's image i, centre-cropped and resized to image_size (ADM's preprocessing)."""

    def __init__(self, read, image_size):
        self.read, self.image_size = read, image_size

    def __call__(self, i):
        return np.array(data.center_crop_arr(Image.fromarray(np.asarray(self.read(i))), self.image_size))


def first_image_size(path):
    """[H, W] of an image file, from its header."""
    try:
        with Image.open(path) as image:
            return [image.height, image.width]
    except Exception as e:       # whatever Pillow raises: the file is unusable
        raise UserError(f"cannot read image {path}: {e}") from None


def read_npz(path, names=None):
    """The arrays of an .npz (no pickles; `names`: only these, where present), or a clear error."""
    try:
        with open(find_file(path), "rb") as f, np.load(f, allow_pickle=False) as arrays:
            return {k: arrays[k] for k in arrays.files if names is None or k in names}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path}: {e} (a damaged or cut-short .npz?)") from None


def statistics_file(path):
    """Feature statistics read from a file, or None when it holds none (images). Ours (image_stats, with their
    provenance), pytorch-fid's --save-stats (mu, sigma) or ADM's reference batches (arr_0, mu, sigma: what DiT's FIDs
    are computed against). The other tools' files give the overall FID only: they hold no per-superclass parts, no
    image count and no record of what made them, which is said once."""
    names = read_npz_names(path)
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
    if "count" not in arrays:
        print(f"note: {path} holds mu and sigma only (another tool's statistics): the overall FID only, no "
              "per-superclass rows, image count unknown", file=sys.stderr)
    read_provenance(arrays, path)                        # checked now: a damaged record is one line here
    return arrays


def read_npz_names(path):
    """The array names in an .npz (its zip members), without reading any array."""
    try:
        with zipfile.ZipFile(find_file(path)) as archive:
            return {n[:-4] for n in archive.namelist() if n.endswith(".npy")}
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path}: {e} (a damaged or cut-short .npz?)") from None


def read_provenance(arrays, path="the statistics"):
    """What made statistics (image_stats' `provenance`: source, image size, crop, Inception sha256, count), or None
    for a file that does not say (another tool's, or ours from before it was recorded)."""
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


def collate_images(batch):
    """ImageSource items -> ([B, 3, H, W] uint8, [B] labels), less the images left out (None); B may be 0."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return torch.zeros(0, 3, 0, 0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)  # [0, 3, 0, 0], [0]
    images, labels = zip(*batch)
    if len({tuple(x.shape) for x in images}) > 1:
        raise UserError("images differ in size; pass --image-size to centre-crop and resize them")
    return torch.stack(images), torch.tensor(labels)


def stats_hierarchy(stats, source="the statistics"):
    """The hierarchy a statistics file carries (as JSON), checked; None when it carries none."""
    if "hierarchy" not in stats:
        return None
    try:
        return read_hierarchy(json.loads(str(stats["hierarchy"])), source)
    except ValueError as e:
        raise UserError(f"{source}: its hierarchy is not JSON ({e})") from None


def read_manifest(folder):
    """OUT/samples.json, checked; None when there is none. Its image names must stay inside OUT: a name such as
    ../x or /x would have `generate --overwrite` delete, and `fid` read, a file of somebody else's."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    manifest = read_json(path, "samples manifest")
    try:
        made_by, images = manifest["made_by"], manifest["images"]
        hierarchy = None if manifest.get("hierarchy") is None else read_hierarchy(manifest["hierarchy"], path)
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

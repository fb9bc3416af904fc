"""What evaluate.py scores, read from the files users bring: images with their classes and hierarchy, and feature
statistics.

Images: a generate folder (OUT/samples.json says each image's class and the hierarchy), an .npz of images (arr_0
(N, H, W, 3) uint8; optional labels and hierarchy), a folder of unlabelled images, or a data.py dataset (real
images). An image always travels with its own label. Statistics: ours (evaluate.image_stats: mu, sigma, count and
per-superclass parts), pytorch-fid's --save-stats (mu, sigma) and ADM's reference batches (arr_0, mu, sigma). Every
file is untrusted input: a damaged or hostile one is one line naming it.
"""
import json
import os
import sys
import zipfile

import numpy as np
import torch
from torch.utils.data import Dataset

import data
from cli import UserError
from files import find_file
from hierarchy import inat21_hierarchy, read_hierarchy

MANIFEST = "samples.json"   # a generate folder's record of what made its images, and of each image's class


class ImageSource(Dataset):
    """Images to score. item i -> (uint8 [3, H, W], class id or -1), or None for a real image left out (its file
    cannot be read; collate_images drops it, its label with it); `labels` (N,); `hierarchy` or None.

    `read(i)` gives image i as uint8 (H, W, 3) (or None): a file (a generate folder's, or an unlabelled folder's,
    centre-cropped to image_size when given), a row of an .npz, or an item of a data.py dataset (real images)."""

    def __init__(self, name, read, labels, hierarchy=None):
        self.name, self.read, self.hierarchy = name, read, hierarchy
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
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), int(self.labels[i])


def read_png(path, image_size=0):
    image = data.read_rgb(path)  # any format and Pillow mode; a file it cannot read is a UserError naming it
    return np.array(data.center_crop_arr(image, image_size) if image_size else image)  # (H, W, 3)


def dataset_images(dataset, name):
    """Real images of a data.py dataset (no flips), as uint8 with its labels and hierarchy. Each is the item itself
    (data.exact_item), so labels[i] is its class; a file that cannot be read is left out, with a warning."""
    def read(i):
        item = data.exact_item(dataset, i)  # ((3, H, W) in [-1, 1], class id) or None
        return None if item is None else ((item[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    return ImageSource(name, read, dataset.targets, dataset.hierarchy())


def load_hierarchy(spec):
    """--hierarchy: 'inat21' (the built-in iNat21 table) or a JSON file with the three hierarchy keys."""
    if spec == "inat21":
        return inat21_hierarchy()
    try:
        with open(spec) as f:
            return read_hierarchy(json.load(f), spec)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read hierarchy {spec}: {e} (expected 'inat21' or a JSON file with class_names, "
                        "superclass_names, superclass_of)") from None


def open_images(path, image_size=0, hierarchy=None):
    """A generate folder (samples.json says each image's class and the hierarchy), an .npz (arr_0 [N, H, W, 3]
    uint8; optional labels and hierarchy), or a folder of unlabelled images. `hierarchy` overrides the file's."""
    if os.path.isdir(path):
        manifest = read_manifest(path)
        if manifest is None:
            files = [os.path.join(path, f) for f in data.list_images(path)]
            if not files:
                raise UserError(f"no images ({', '.join(data.IMAGE_EXTENSIONS)}) and no samples.json in {path}")
            return ImageSource(path, lambda i: read_png(files[i], image_size), [-1] * len(files), hierarchy)
        files = [os.path.join(path, f) for f, _ in manifest["images"]]
        missing = sum(not os.path.isfile(f) for f in files)
        if missing:
            raise UserError(f"{path}: {missing} of {len(files)} images are not generated yet: finish them with the "
                            "same `evaluate.py generate` command")
        return ImageSource(path, lambda i: read_png(files[i], image_size), [c for _, c in manifest["images"]],
                           hierarchy or manifest["hierarchy"])
    arrays = read_npz(path)
    images = arrays.get("arr_0")
    if images is None or images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(f"{path}: expected images arr_0 [N, H, W, 3] uint8")
    labels = arrays["labels"] if "labels" in arrays else np.full(len(images), -1)
    return ImageSource(path, lambda i: images[i], labels, hierarchy or stats_hierarchy(arrays, path))


def read_npz(path):
    """All arrays of an .npz (no pickles), or a clear error."""
    try:
        with open(find_file(path), "rb") as f, np.load(f, allow_pickle=False) as arrays:
            return {k: arrays[k] for k in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path}: {e} (a damaged or cut-short .npz?)") from None


def statistics_file(arrays, path):
    """Feature statistics read from a file: ours (image_stats), pytorch-fid's --save-stats (mu, sigma) or ADM's
    reference batches (arr_0, mu, sigma: what DiT's FIDs are computed against). The other tools' files give the
    overall FID only: they hold no per-superclass parts and no image count, which is said once."""
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{path}: mu {list(mu.shape)} and sigma {list(sigma.shape)} are not the mean and covariance "
                        "of feature vectors")
    if "count" not in arrays:
        print(f"note: {path} holds mu and sigma only (another tool's statistics): the overall FID only, no "
              "per-superclass rows, image count unknown", file=sys.stderr)
    return arrays


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
    try:
        with open(path) as f:
            manifest = json.load(f)
        made_by, images = manifest["made_by"], manifest["images"]
        hierarchy = None if manifest.get("hierarchy") is None else read_hierarchy(manifest["hierarchy"], path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"cannot read {path}: {e!r}") from None
    if not isinstance(made_by, dict) or not isinstance(images, list):
        raise UserError(f"{path}: 'made_by' and 'images' are not a dict and a list")
    for entry in images:
        name, label = entry if isinstance(entry, list) and len(entry) == 2 else (None, None)
        if not isinstance(name, str) or not isinstance(label, int) or not inside(name):
            raise UserError(f"{path}: the entry {entry!r} is not [a file name inside {folder}, its class]")
    return dict(manifest, hierarchy=hierarchy)


def inside(name):
    """Is the relative path `name` inside its folder (not absolute, no way up)?"""
    norm = os.path.normpath(name)
    return not os.path.isabs(name) and norm != ".." and not norm.startswith(".." + os.sep) and norm != "."

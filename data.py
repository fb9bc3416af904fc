"""Data for FineDiffusion: datasets with a two-level label hierarchy, DiT preprocessing, and a VAE-latent cache.

FineDiffusion (paper §3.2) conditions a DiT on a fine-grained *subclass* label and, through the TieredEmbedder and
fine-grained classifier-free guidance, on that subclass's *superclass*. So every dataset here yields
`(image, class_id)`, image a float tensor 3xHxW in [-1, 1], and exposes its hierarchy (make_hierarchy: the one
representation of it, which checkpoints, caches, FID statistics and generated samples carry unchanged):

    class_names[k]      name of subclass k            num_classes      = K
    superclass_names[s] name of superclass s          num_superclasses = S
    superclass_of[k]    superclass id of subclass k   targets[i]       = class id of item i

Datasets, `build_dataset(name, data_path, ...)` (paper §4.1):
  inat21  iNaturalist 2021 as published: <root>/{train_mini,train,val}/NNNNN_Kingdom_Phylum_Class_Order_Family_
          Genus_epithet/*.jpg, plus <root>/{train_mini,val,train}.json. Class id = index of the sorted folder name
          (== NNNNN on the full 10,000-class set). Superclass = the json's `supercategory`, else the built-in id
          table; superclass ids are fixed by the authors' checkpoint (INAT21_SUPERCLASSES).
  folder  a two-level tree root/<superclass>/<class>/*.jpg (VegFru: 25 superclasses / 292 subclasses), or a flat
          ImageFolder root/<class>/* plus --hierarchy-csv with `class,superclass` rows.
  toy       the embedded default, iNat21-mini's role: 32 species (shape x pattern x tint) in 8 shape families, a
            fixed 50 images per class, rendered at 32 px and trained in pixel space; every species is a combination
            the base set never shows.
  toy-base  ImageNet's role: the same 8 shapes in other patterns, both tints, 64 classes, unlimited renders: the set the
            shipped toy base DiT was pre-trained on (TOY_SETS).

Images are read by read_rgb, right for every Pillow mode (16-bit ones are scaled, not clipped). Preprocessing is
DiT's: ADM centre crop, random horizontal flip, [-1, 1]. Unreadable images are skipped with a warning.

Latent cache (DiT trains on SD-VAE latents; encoding 500K images every epoch is the main cost otherwise):
    python data.py cache --data inat21 --data-path data/inat21 --vae pretrained/sd-vae-ft-ema --out cache/inat21-256
    torchrun --nproc_per_node=8 data.py cache ...    # same arguments; each rank encodes its own shard
It stores the VAE posterior (mean, logvar) of every image and of its mirror, so `LatentCacheDataset` can draw
z ~ N(mean, exp(logvar)) * 0.18215 afresh each time -- the same distribution as encoding on the fly.
Other commands:
    python data.py info --data inat21 --data-path data/inat21 --split val    # counts and the hierarchy
    python data.py preview --data toy --out toy.png                          # a grid, one row per class
"""

import collections
import functools
import hashlib
import itertools
import os
import shlex
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from hardening import (CACHE_FORMAT, CACHE_VERSION, ArgumentParser, UserError, atomic_write, folder_path,
                       inat21_categories, init_distributed, nonnegative_int, on_rank0, open_cache, open_cache_arrays,
                       out_file, positive_int, prepare_cache_dir, read_hierarchy_csv, read_rgb, run_cli, worker_init,
                       write_json)
from model import INAT21_SUPERCLASSES, inat21_superclass_of, make_hierarchy
from toy import TOY_PATTERNS, TOY_SHAPES, TOY_TINTS, render_toy, toy_looks
from vae import LATENT_SCALE, AutoencoderKL, latent_scale, scaled_latent

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
INAT21_URL = "https://github.com/visipedia/inat_comp/tree/master/2021"
# DataLoader workers per process: 4, fewer on a machine with fewer cores (PyTorch warns past its core count)
DEFAULT_WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)



# ----------------------------------------------------------------------------------------------------------------
# The label hierarchy of a dataset (hierarchy.py: its one representation)
# ----------------------------------------------------------------------------------------------------------------

class HierarchyMixin:
    """A dataset's hierarchy (a make_hierarchy dict) and its views; `targets[i]` is item i's class id."""

    def set_hierarchy(self, hierarchy):
        self._hierarchy = hierarchy

    def hierarchy(self):
        return self._hierarchy

    class_names = property(lambda self: self._hierarchy["class_names"])
    superclass_names = property(lambda self: self._hierarchy["superclass_names"])
    superclass_of = property(lambda self: self._hierarchy["superclass_of"])
    num_classes = property(lambda self: len(self._hierarchy["class_names"]))
    num_superclasses = property(lambda self: len(self._hierarchy["superclass_names"]))

    def make_coarse(self):
        """Relabel every item with its superclass id; the classes become the superclasses (each its own parent).
        Used to pre-train a base model on coarse labels before fine-grained fine-tuning."""
        superclass_of = np.asarray(self.superclass_of, dtype=np.int64)
        self.labels = superclass_of[np.asarray(self.targets, dtype=np.int64)]  # N
        self.targets = self.labels.tolist()
        names = list(self.superclass_names)
        self.set_hierarchy(make_hierarchy(names, names, range(len(names))))


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing (exactly DiT's, which is ADM's)
# ----------------------------------------------------------------------------------------------------------------

def center_crop_arr(pil_image, image_size):
    """ADM centre crop: box-halve while >= 2x too big, bicubic-resize the short side to image_size, crop the centre."""
    # Repeated 2x box downsampling first: cheap, and avoids the aliasing of one big bicubic step.
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)  # (H, W, C)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size])


def dit_transform(image_size, flip=True):
    """PIL RGB image -> float tensor 3 x image_size x image_size in [-1, 1], as in DiT's train.py."""
    steps = [transforms.Lambda(functools.partial(center_crop_arr, image_size=image_size))]  # partial: picklable
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], inplace=True)]
    return transforms.Compose(steps)


# ----------------------------------------------------------------------------------------------------------------
# Image files on disk (iNat21 and folder trees)
# ----------------------------------------------------------------------------------------------------------------

class ImageListDataset(HierarchyMixin, Dataset):
    """Image files under `root` with class ids; decoded with PIL, preprocessed as DiT; unreadable files skipped."""

    def __init__(self, root, files, labels, hierarchy, image_size=256, flip=True, coarse=False):
        if len(files) == 0:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        self.root = root
        # One numpy bytes array instead of 500K Python strings: DataLoader workers then share it without the
        # copy-on-access that refcount updates cause on lists of objects.
        self.files = np.array([os.fsencode(f) for f in files])  # N, relative paths
        self.labels = np.asarray(labels, dtype=np.int64)  # N
        self.targets = self.labels.tolist()
        self.set_hierarchy(hierarchy)
        if coarse:
            self.make_coarse()
        self.image_size, self.flip = image_size, flip
        self.transform = dit_transform(image_size, flip)
        self._unreadable = set()  # indices that failed to decode in this process: skipped without retrying

    def __len__(self):
        return len(self.files)

    def path(self, index):
        return os.path.join(self.root, os.fsdecode(self.files[index]))

    def read(self, i):
        """Item i itself, (image, class id), or a UserError naming its file when that cannot be read."""
        return self.transform(read_rgb(self.path(i))), int(self.labels[i])

    def __getitem__(self, index):
        # A bad file must not end an epoch (or a 500K-image cache run): the next readable item stands in, with its
        # own label. Statistics and previews must not count or show that item twice: they use exact_item.
        for step in range(len(self)):
            i = (index + step) % len(self)
            if i in self._unreadable:
                continue
            try:
                return self.read(i)
            except UserError as err:
                self._unreadable.add(i)
                warnings.warn(f"{err} (skipped: the next readable image stands in)", stacklevel=2)
        raise UserError(f"no readable image under {self.root}")


def exact_item(dataset, index):
    """Item `index` of a dataset itself, (image, class id), or None with a warning when its file cannot be read.
    For statistics and previews: dataset[index] gives training's stand-in instead (the next readable item), which
    would be counted or shown twice, and across a class boundary under another class."""
    if not isinstance(dataset, ImageListDataset):
        return dataset[index]  # rendered items (toy) are never unreadable
    try:
        return dataset.read(index)
    except UserError as err:
        warnings.warn(f"{err} (left out)", stacklevel=2)
        return None


def readable_items(dataset, indices):
    """exact_item of each index in turn, those left out skipped (say, the first n readable images of a class)."""
    for i in indices:
        item = exact_item(dataset, int(i))
        if item is not None:
            yield item


def _list_dirs(folder):
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def list_images(folder):
    # os.scandir gets names and types from one directory read: no stat() per file, so 500K files scan in seconds.
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())


def _scan_classes(root, class_dirs, class_ids):
    """Files (relative to root) and labels of the images in root/<class_dirs[j]>/, labelled class_ids[j]."""
    files, labels = [], []
    for class_dir, class_id in zip(class_dirs, class_ids):
        names = list_images(os.path.join(root, class_dir))
        files += [os.path.join(class_dir, name) for name in names]
        labels += [class_id] * len(names)
    return files, labels


def _require_dir(path, what, hint=""):
    if not path:
        raise UserError(f"{what}: no data path given (--data-path){hint}")
    if not os.path.isdir(path):
        raise UserError(f"{what}: {path} is not a directory (put the dataset there or pass --data-path){hint}")


def _inat21_categories(root, split):
    """The `categories` list of an iNat21 json under root (all splits share it), or None if there is no json."""
    candidates = [os.path.join(root, name + ".json") for name in (split, "train_mini", "val", "train")]
    candidates = [path for path in candidates if os.path.isfile(path)]
    # Any split's json has the same 10,000 categories; parse the smallest (train.json is ~1 GB of image records).
    return inat21_categories(min(candidates, key=os.path.getsize)) if candidates else None


def inat21_dataset(root, split="train_mini", image_size=256, flip=True, coarse=False):
    """iNaturalist 2021 from its published layout. Class id = index of the sorted class folder names."""
    hint = f" (expected <root>/{split}/NNNNN_Kingdom_..._Genus_epithet/*.jpg; iNat21 is published at {INAT21_URL})"
    _require_dir(root, "iNat21", hint)
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir) and os.path.basename(os.path.normpath(root)) == split:
        split_dir, root = root, os.path.dirname(os.path.normpath(root))  # user pointed at the split folder itself
    if not os.path.isdir(split_dir):
        present = ", ".join(d for d in _list_dirs(root) if d in ("train_mini", "train", "val")) or "none"
        raise UserError(f"iNat21: no {split}/ folder in {root} (splits present: {present}){hint}")
    class_dirs = _list_dirs(split_dir)
    if not class_dirs:
        raise UserError(f"iNat21: {split_dir} holds no class folders{hint}")

    categories = _inat21_categories(root, split) or []
    by_dir = {c["image_dir_name"]: c for c in categories if c.get("image_dir_name")}
    by_id = {c["id"]: c for c in categories}
    table, animalia = inat21_superclass_of(10000), INAT21_SUPERCLASSES.index("Animalia")  # json-less fallback
    superclass_names = list(INAT21_SUPERCLASSES)
    index = {name: s for s, name in enumerate(superclass_names)}
    class_names, superclass_of = [], []
    for k, class_dir in enumerate(class_dirs):
        parts = class_dir.split("_")
        official_id = int(parts[0]) if parts[0].isdigit() else k  # NNNNN is the id in the full 10,000-class set
        category = by_dir.get(class_dir) or by_id.get(official_id)
        if category is not None and category.get("supercategory"):
            supercategory = category["supercategory"]
            if supercategory not in index:  # not iNat21's eleven: append, keeping the fixed ids
                index[supercategory] = len(superclass_names)
                superclass_names.append(supercategory)
            superclass_of.append(index[supercategory])
        else:
            superclass_of.append(table[official_id] if official_id < len(table) else animalia)
        if category is not None and category.get("name"):
            class_names.append(category["name"])
        else:
            class_names.append(" ".join(parts[6:]) if len(parts) >= 8 else class_dir)  # "Genus epithet"

    files, labels = _scan_classes(split_dir, class_dirs, range(len(class_dirs)))
    dataset = ImageListDataset(split_dir, files, labels, make_hierarchy(class_names, superclass_names, superclass_of),
                               image_size, flip, coarse)
    if not coarse:
        dataset.class_folders = class_dirs  # NNNNN_Kingdom_..._Genus_epithet, beside the readable class_names
    return dataset


def folder_dataset(root, split="train", image_size=256, flip=True, coarse=False, hierarchy_csv=None):
    """A two-level tree root/<superclass>/<class>/*, or with `hierarchy_csv` a flat root/<class>/*.

    If root/<split> exists it is used as the root (e.g. a VegFru copy arranged as root/train/<super>/<class>).
    Ids, two-level: superclass ids = sorted superclass folders; class ids = sorted (superclass, class) pairs,
    i.e. classes numbered superclass by superclass. Ids, flat + CSV: the CSV is the hierarchy, numbered the same
    way over its rows (sorted superclasses; classes by sorted (superclass, class)), so the same data arranged
    either way gets the same ids, and ids do not shift when a split lacks a class.
    """
    _require_dir(root, "folder dataset")
    if split and os.path.isdir(os.path.join(root, split)):
        root = os.path.join(root, split)
    if hierarchy_csv:
        pairs = read_hierarchy_csv(hierarchy_csv)  # class -> superclass
        present = _list_dirs(root)
        unknown = [c for c in present if c not in pairs]
        if unknown:
            raise UserError(f"{len(unknown)} class folders of {root} are not in {hierarchy_csv}, "
                            f"e.g. {', '.join(unknown[:5])}")
        superclass_names = sorted(set(pairs.values()))
        index = {name: s for s, name in enumerate(superclass_names)}
        ordered = sorted(pairs, key=lambda c: (pairs[c], c))  # class names in id order
        superclass_of = [index[pairs[c]] for c in ordered]
        class_ids = {c: k for k, c in enumerate(ordered)}
        files, labels = _scan_classes(root, present, [class_ids[c] for c in present])
        class_names = ordered
    else:
        superclass_names = _list_dirs(root)
        if not superclass_names:
            raise UserError(f"folder dataset: {root} holds no superclass folders (expected root/<superclass>/<class>/)")
        class_dirs, superclass_of = [], []
        for s, superclass in enumerate(superclass_names):
            classes = _list_dirs(os.path.join(root, superclass))
            if not classes and list_images(os.path.join(root, superclass)):
                raise UserError(f"folder dataset: {os.path.join(root, superclass)} holds images, not class folders; "
                                f"for a flat root/<class>/ layout pass --hierarchy-csv with class,superclass rows")
            class_dirs += [os.path.join(superclass, c) for c in classes]
            superclass_of += [s] * len(classes)
        files, labels = _scan_classes(root, class_dirs, range(len(class_dirs)))
        leaf = [os.path.basename(d) for d in class_dirs]
        # a class name repeated under two superclasses is qualified as "superclass/class" to stay unambiguous
        repeated = collections.Counter(leaf)
        class_names = [n if repeated[n] == 1 else d.replace(os.sep, "/") for n, d in zip(leaf, class_dirs)]
    return ImageListDataset(root, files, labels, make_hierarchy(class_names, superclass_names, superclass_of),
                            image_size, flip, coarse)


# ----------------------------------------------------------------------------------------------------------------
# The toy world: the embedded default (no download), one base set and one fine-grained set
# ----------------------------------------------------------------------------------------------------------------
# A toy image is a look: a shape (8 families, each with its own hue), a pattern (6) and a tint (pale or deep), drawn
# upright, with a small random offset and size, background and noise. The two sets mirror the paper's data:
#   toy-base  ImageNet's role: every shape in 4 of the 6 patterns, each in both tints: 64 classes, unlimited
#             renders. The shipped toy base DiT (train.TOY_BASE) is pre-trained on it.
#   toy       iNat21-mini's role: the 16 (shape, pattern) combinations the base set never shows, each in both tints:
#             32 species in 8 superclasses (the shape families), a fixed 50 training images per class.
# So the fine-grained classes are combinations the base never saw, of shapes, patterns and colours it knows.

_TOY_SPLITS = {"train": 0, "val": 1, "test": 2}


class ToyDataset(HierarchyMixin, Dataset):
    """A set of the toy world (TOY_SETS): `images_per_class` renders of each of its looks (toy_looks).

    Item i is class i // images_per_class, instance j = i % images_per_class, rendered from the numpy rng seeded with
    (seed, split, class, j): the same image for the same (seed, split, index), on any machine. The superclass of a
    class is its shape. coarse=True labels items with their superclass (each class its own superclass).
    """

    max_prerender_bytes = 256 << 20  # pre-render the whole set when it fits; otherwise render per item

    def __init__(self, name="toy", image_size=32, images_per_class=50, seed=0, coarse=False, flip=True, split="train"):
        if name not in TOY_SETS:
            raise UserError(f"unknown toy set {name!r} (choose {', '.join(TOY_SETS)})")
        if split not in _TOY_SPLITS:
            raise UserError(f"toy dataset: unknown split {split!r} (choose {', '.join(_TOY_SPLITS)})")
        self.name, self.looks = name, toy_looks(name)
        self.image_size, self.images_per_class, self.seed, self.flip = image_size, images_per_class, seed, flip
        self.split_id = _TOY_SPLITS[split]
        names = ["/".join([TOY_SHAPES[f], TOY_PATTERNS[p], TOY_TINTS[t]]) for f, p, t in self.looks]
        self.set_hierarchy(make_hierarchy(names, TOY_SHAPES, [f for f, _, _ in self.looks]))
        self.fine_labels = np.repeat(np.arange(len(self.looks)), images_per_class)  # (N,): class of item i
        self.labels = self.fine_labels.copy()
        self.targets = self.labels.tolist()
        if coarse:
            self.make_coarse()
        self.images = None  # (N, H, W, 3) uint8 when pre-rendered
        if len(self) * image_size * image_size * 3 <= self.max_prerender_bytes:
            self.images = np.concatenate([self.raw_images(range(i, min(i + 512, len(self))))
                                          for i in range(0, len(self), 512)])

    def __len__(self):
        return len(self.fine_labels)

    def raw_images(self, indices):
        """uint8 (B, H, W, 3) images of the given items (no flip), rendered afresh."""
        indices = list(indices)
        classes = [int(self.fine_labels[i]) for i in indices]
        rngs = [np.random.default_rng([self.seed, self.split_id, c, i % self.images_per_class])
                for c, i in zip(classes, indices)]
        return render_toy([self.looks[c] for c in classes], rngs, self.image_size)

    def __getitem__(self, index):
        arr = self.images[index] if self.images is not None else self.raw_images([index])[0]  # (H, W, 3) uint8
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[index])


# The two toy sets, and how many images a training run sees of each class: the base set is a broad, unlimited
# world (renders are cheap), the fine-grained one a fixed 50 per class whatever the training --seed, as iNat21-mini's.
TOY_SETS = {"toy-base": dict(images_per_class=512), "toy": dict(images_per_class=50, seed=0)}
DATASETS = ("inat21", "folder", *TOY_SETS)


def toy_dataset(name, image_size=32, split="train", flip=True, seed=0, coarse=False, **override):
    """One of TOY_SETS; `override` changes its ToyDataset arguments (e.g. images_per_class for a classifier)."""
    return ToyDataset(name, **{**dict(image_size=image_size, split=split, flip=flip, seed=seed, coarse=coarse),
                               **TOY_SETS[name], **override})


# ----------------------------------------------------------------------------------------------------------------
# One entry point
# ----------------------------------------------------------------------------------------------------------------

def build_dataset(name, data_path=None, image_size=None, split=None, flip=True, seed=0, coarse=False,
                  hierarchy_csv=None):
    """'inat21' | 'folder' | 'toy' | 'toy-base' -> a Dataset of (image in [-1, 1], class id) exposing its hierarchy.
    The defaults every command shares (a None argument): the root data/<name>/ (the toy sets are rendered: none),
    the split train_mini for iNat21 and train for the others, 32 px for the toy sets and 256 for the others."""
    data_path = dataset_root(name, data_path)
    split = split or ("train_mini" if name == "inat21" else "train")
    image_size = image_size or default_image_size(name)
    if name == "inat21":
        return inat21_dataset(data_path, split, image_size, flip, coarse)
    if name == "folder":
        return folder_dataset(data_path, split, image_size, flip, coarse, hierarchy_csv)
    if name in TOY_SETS:
        return toy_dataset(name, image_size, split, flip, seed, coarse)
    raise UserError(f"unknown dataset {name!r}: choose {', '.join(DATASETS)}")


def default_image_size(name):
    return 32 if name in TOY_SETS else 256


def dataset_root(name, data_path=None):
    """--data-path, else data/<name>/; None for the toy sets, which are rendered."""
    return data_path or (None if name in TOY_SETS else os.path.join("data", name))


# ----------------------------------------------------------------------------------------------------------------
# VAE-latent cache
# ----------------------------------------------------------------------------------------------------------------
# Layout of a cache directory (all .npy files are plain numpy arrays, opened as memmaps):
#   moments.npy  float16 (N, 2, 2C, h, w)   [i, 0] = original image, [i, 1] = its horizontal mirror;
#                channels [:C] = posterior mean, [C:] = logvar (the LDM "moments" layout)
#   labels.npy   int64   N                    class id of the image actually encoded in row i
#   done.npy     bool    N                    row i is written (resume skips it)
#   meta.json    format, version, data, data_path, split, image_size, num_images, latent_shape (C, h, w),
#                hierarchy, vae (identity), files_sha256, command, complete
# Rows are written, then flushed, then marked done and flushed: a crash in between only re-encodes one batch.

def _files_fingerprint(dataset):
    """sha256 over the file list and labels, so resuming into a cache of other files is refused (None for toy)."""
    if not hasattr(dataset, "files"):
        return None
    digest = hashlib.sha256(b"\n".join(dataset.files.tolist()))
    digest.update(np.asarray(dataset.targets, dtype=np.int64).tobytes())
    return digest.hexdigest()


class _Indexed(Dataset):
    """dataset[indices[k]] with its index: (index, image, label)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        return (self.indices[k], *self.dataset[self.indices[k]])


def build_latent_cache(dataset, vae, out_dir, batch_size=32, num_workers=DEFAULT_WORKERS, meta=None, device=None, progress=True):
    """Encode every image of `dataset` and its mirror with `vae.encode(x) -> (mean, logvar)`; store the moments.

    `dataset` must not flip (both views are stored). `meta`: extra fields for meta.json (data, data_path, split,
    vae identity, command). Resumes an interrupted cache in out_dir. Under torch.distributed each rank encodes a
    contiguous shard; all ranks must share the page cache of out_dir (one node), rank 0 writes meta.json.
    Returns the meta dict.
    """
    if getattr(dataset, "flip", False):
        raise ValueError("build the dataset with flip=False: the cache stores both the image and its mirror")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = vae.to(device).eval()

    n = len(dataset)
    x0 = dataset[0][0]  # (3, H, W)
    with torch.no_grad():
        mean0, _ = vae.encode(x0[None].to(device))  # one probe encode: the latent shape, whatever the VAE's factor
    meta = dict(format=CACHE_FORMAT, version=CACHE_VERSION, **(meta or {}), image_size=int(x0.shape[-1]),
                num_images=n, latent_shape=list(mean0.shape[1:]), moments_dtype="float16",
                hierarchy=dataset.hierarchy(), files_sha256=_files_fingerprint(dataset), complete=False)

    on_rank0(lambda: prepare_cache_dir(out_dir, meta))   # the others wait until the files exist

    arrays = open_cache_arrays(out_dir, meta, mode="r+")
    moments, labels, done = arrays["moments.npy"], arrays["labels.npy"], arrays["done.npy"]  # (N, 2, 2C, h, w), (N,)
    shard = range(rank * n // world, (rank + 1) * n // world)
    todo = [i for i in shard if not done[i]]
    loader = DataLoader(_Indexed(dataset, todo), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=worker_init)
    bar = tqdm(loader, desc=f"encoding {len(todo)} of {n} images", disable=not progress or rank != 0)
    with torch.no_grad():
        for index, x, y in bar:
            x = x.to(device, non_blocking=True)  # (B, 3, H, W)
            mean, logvar = vae.encode(torch.cat([x, x.flip(-1)]))  # (2B, C, h, w) each
            both = torch.cat([mean, logvar], dim=1).float()  # (2B, 2C, h, w)
            both = both.view(2, len(x), *both.shape[1:]).transpose(0, 1)  # (B, 2, 2C, h, w) (original, mirror)
            rows = index.numpy()
            moments[rows] = both.cpu().numpy().astype(np.float16)
            labels[rows] = y.numpy()  # the label of what was encoded (an unreadable file's substitute included)
            moments.flush()
            labels.flush()
            done[rows] = True  # only after the data is on disk
            done.flush()

    if distributed:
        dist.barrier()
    if rank == 0:
        meta["complete"] = bool(done.all())                # every rank's rows: one file, flushed by each
        write_json(os.path.join(out_dir, "meta.json"), meta)
    return meta


class LatentCacheDataset(HierarchyMixin, Dataset):
    """(z, class_id) from a latent cache: z = scale * (mean + exp(logvar / 2) * eps), fresh eps per call, on the
    original or (flip=True, p = 1/2) the mirrored image -- the distribution of DiT's on-the-fly
    `vae.encode(x).latent_dist.sample().mul_(0.18215)` with random flips; scale is the latent scale of the VAE the
    cache records (0.18215 for the SD VAE).

    expect: fields the cache must match, keys as in meta.json, e.g. dict(data="inat21", data_path=...) (None values
    are not checked; hardening.open_cache).
    """

    def __init__(self, path, expect=None, flip=True, coarse=False):
        self.path, self.flip = path, flip
        self.meta, arrays = open_cache(path, expect or {})
        self.set_hierarchy(self.meta["hierarchy"])
        self.labels = np.array(arrays["labels.npy"])  # (N,)
        self.targets = self.labels.tolist()
        if coarse:
            self.make_coarse()
        self.image_size, self.latent_shape = self.meta["image_size"], self.meta["latent_shape"]
        self.scale = latent_scale(self.meta["vae"]) if isinstance(self.meta.get("vae"), dict) else LATENT_SCALE
        self._moments = None  # opened lazily, once per DataLoader worker

    def __len__(self):
        return len(self.labels)

    def __getstate__(self):  # never pickle the memmap (it would copy the whole array into the worker)
        return {**self.__dict__, "_moments": None}

    def __getitem__(self, index):
        if self._moments is None:
            self._moments = np.load(os.path.join(self.path, "moments.npy"), mmap_mode="r")
        view = int(torch.randint(2, ())) if self.flip else 0  # 0 original, 1 mirror
        moments = torch.from_numpy(self._moments[index, view].astype(np.float32))  # (2C, h, w)
        return scaled_latent(*moments.chunk(2), self.scale), int(self.labels[index])  # (C, h, w)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def _dataset_from_args(args, flip):
    """The dataset of --data, --data-path, --split, --image-size, --hierarchy-csv -> (dataset, split, image_size)."""
    split = args.split or ("train_mini" if args.data == "inat21" else "train")
    image_size = args.image_size or default_image_size(args.data)
    return build_dataset(args.data, args.data_path, image_size, split, flip=flip,
                         hierarchy_csv=args.hierarchy_csv), split, image_size


def cmd_cache(args):
    if args.image_size is not None and args.image_size % 8:   # else e.g. 36 px would store 4x4 latents
        raise UserError(f"--image-size {args.image_size}: the SD VAE's latents are 8x smaller than the image: "
                        "use a multiple of 8")
    _, _, device = init_distributed()
    try:
        dataset, split, image_size = _dataset_from_args(args, flip=False)
        command = ["python", "data.py", "cache", "--data", args.data, "--split", split, "--image-size",
                   str(image_size), "--vae", args.vae, "--out", args.out]
        if args.data_path:
            command[5:5] = ["--data-path", args.data_path]
        if args.hierarchy_csv:
            command += ["--hierarchy-csv", args.hierarchy_csv]
        vae = AutoencoderKL.from_pretrained(args.vae)
        meta = dict(data=args.data, data_path=os.path.realpath(args.data_path) if args.data_path else None,
                    split=split, vae=vae.identity(), command=shlex.join(command))
        meta = build_latent_cache(dataset, vae, args.out, args.batch_size, args.num_workers, meta=meta, device=device)
        if meta["complete"]:
            print(f"latent cache complete: {meta['num_images']} images, latents {meta['latent_shape']}, in {args.out}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cmd_info(args):
    dataset, split, _ = _dataset_from_args(args, flip=False)
    counts = np.bincount(dataset.targets, minlength=dataset.num_classes)
    print(f"{args.data} {split}: {len(dataset)} images, {dataset.num_classes} classes, "
          f"{dataset.num_superclasses} superclasses")
    superclass_of = np.asarray(dataset.superclass_of)
    for s, name in enumerate(dataset.superclass_names):
        members = superclass_of == s
        print(f"  {s:3d} {name:24s} {int(members.sum()):6d} classes {int(counts[members].sum()):8d} images")


def cmd_preview(args):
    dataset, _, image_size = _dataset_from_args(args, flip=False)
    targets = np.asarray(dataset.targets)
    rows = []
    for k in range(min(dataset.num_classes, args.max_classes)):
        items = itertools.islice(readable_items(dataset, np.flatnonzero(targets == k)), args.per_class)
        row = np.zeros((image_size, image_size * args.per_class, 3), dtype=np.uint8)
        for j, (x, _) in enumerate(items):  # x: (3, H, W) in [-1, 1]
            row[:, j * image_size:(j + 1) * image_size] = ((x + 1) * 127.5).round().clamp(0, 255).permute(1, 2, 0)
        rows.append(row)
    atomic_write(args.out, lambda f: Image.fromarray(np.concatenate(rows)).save(f, format="PNG"))
    print(f"wrote {args.out}: rows = classes {', '.join(dataset.class_names[:len(rows)])}")


def main(argv=None):
    parser = ArgumentParser(description="FineDiffusion data: latent cache, dataset info, previews")
    commands = parser.add_subparsers(dest="command", required=True)
    cache = commands.add_parser("cache", help="encode a dataset with the VAE into a resumable latent cache")
    info = commands.add_parser("info", help="print image / class counts per superclass")
    preview = commands.add_parser("preview", help="save a grid of images, one row per class")
    for p in (cache, info, preview):
        p.add_argument("--data", choices=DATASETS, default="toy" if p is preview else None,
                       required=p is not preview)
        p.add_argument("--data-path", default=None)
        p.add_argument("--split", default=None, help="default: train_mini for inat21, else train")
        p.add_argument("--image-size", type=positive_int, default=None, help="default: 32 for toy, else 256")
        p.add_argument("--hierarchy-csv", default=None, help="class,superclass rows for a flat class folder")
    cache.add_argument("--vae", default="sd-vae-ft-ema", help="SD VAE folder or weights file (also looked up "
                                                              "under pretrained/)")
    cache.add_argument("--out", type=folder_path, required=True, help="cache directory (re-run the same command to resume)")
    cache.add_argument("--batch-size", type=positive_int, default=32)
    cache.add_argument("--num-workers", type=nonnegative_int, default=DEFAULT_WORKERS,
                       help="DataLoader workers (default: 4, or the number of cores if fewer)")
    preview.add_argument("--out", type=out_file, default="preview.png")
    preview.add_argument("--per-class", type=positive_int, default=8)
    preview.add_argument("--max-classes", type=positive_int, default=16)
    args = parser.parse_args(argv)
    {"cache": cmd_cache, "info": cmd_info, "preview": cmd_preview}[args.command](args)


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Data for FineDiffusion (paper §4.1): iNaturalist 2021 with its superclasses, VegFru, any folder of images with a
hierarchy, DiT's preprocessing, and a cache of VAE latents.

    python data.py info --data inat21 --data-path data/inat21 --split val     # counts per superclass
    python data.py preview --data toy --out toy.png                           # a grid, one row per class
    python data.py cache --data inat21 --vae pretrained/sd-vae-ft-ema --out cache/inat21-256
    torchrun --nproc_per_node=8 data.py cache ...                             # each rank encodes its share

Every dataset yields (image, class id), the image 3 x H x W in [-1, 1], and holds its hierarchy (model.make_hierarchy:
class_names, superclass_names, superclass_of, and the ranks between: genus, family, ...), which caches, checkpoints,
statistics and samples carry unchanged; `train.py --tiers` gives any of its ranks rows in the label table.
  inat21    <root>/{train_mini,train,val}/NNNNN_Kingdom_Phylum_Class_Order_Family_Genus_epithet/*.jpg and the jsons.
            Class id = index of the sorted folder name (NNNNN on the full set); superclass = the json's
            supercategory, else the built-in id table, in the row order of the authors' checkpoint; genus ...
            kingdom: the json's.
  vegfru    <root>/vegfru_list/{vegfru,supvegfru}_{train,val,test}.txt, the split lists of VegFru's download: each
            image (veg200_images/<subclass>/*.jpg, fru92_images/...) with its subclass (0 ... 291) and superclass
            (0 ... 24). A subclass is named by its images' folder; the lists pair it with its images' superclass.
  folder    root/<superclass>/<class>/*, or root/<class>/* with a --hierarchy-csv of `class,superclass` rows (or
            `class,genus,superclass`: a column a rank, named by the header, the superclass last).
  toy, toy-base   the built-in toy world (toy.py): iNat21-mini's and ImageNet's roles, rendered, no download;
            shape families (superclass) over shape-pattern genera over tinted species.
Preprocessing is DiT's: ADM centre crop, random flip, [-1, 1]; an unreadable image is skipped with a warning. The cache
stores the VAE posterior (mean, logvar) of every image and of its mirror: LatentCacheDataset draws z ~ N(mean,
exp(logvar)) times the latent scale afresh each time, as encoding on the fly would.
"""
import collections
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

import toy
from hardening import (CACHE_FORMAT, CACHE_VERSION, INAT21_RANKS, ArgumentParser, UserError, atomic_write,
                       folder_path, inat21_categories, init_distributed, multiple_of_8, nonnegative_int, on_rank0,
                       open_cache, open_cache_arrays, out_file, positive_int, prepare_cache_dir, read_hierarchy_csv,
                       read_rgb, read_vegfru_lists, require_dir, run_cli, worker_init, write_json)
from model import (INAT21_SUPERCLASSES, HierarchyView, inat21_superclass_of, make_hierarchy, ranks_between,
                   vegfru_hierarchy)
from vae import LATENT_SCALE, AutoencoderKL, latent_scale, scaled_latent

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
INAT21_URL = "https://github.com/visipedia/inat_comp/tree/master/2021"
# DataLoader workers per process: 4, fewer on a machine with fewer cores (PyTorch warns past its core count)
DEFAULT_WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------------------------
# iNaturalist 2021, and any folder of images with a hierarchy
# ----------------------------------------------------------------------------------------------------------------

def inat21_dataset(root, split="train_mini", image_size=256, flip=True):
    """iNaturalist 2021 from its published layout. Class id = index of the sorted class folder names."""
    hint = f" (expected <root>/{split}/NNNNN_Kingdom_..._Genus_epithet/*.jpg; iNat21 is published at {INAT21_URL})"
    split_dir = os.path.join(root or "", split)
    if not os.path.isdir(split_dir) and root and os.path.basename(os.path.normpath(root)) == split:
        split_dir, root = root, os.path.dirname(os.path.abspath(root))  # the user named the split folder itself
    require_dir(root, split_dir, "iNat21", hint)
    class_dirs = _list_dirs(split_dir)
    categories = _inat21_categories(root, split) or []
    by_dir = {c["image_dir_name"]: c for c in categories if c.get("image_dir_name")}
    by_id = {c["id"]: c for c in categories}
    table, animalia = inat21_superclass_of(10000), INAT21_SUPERCLASSES.index("Animalia")  # without a json
    superclass_names = list(INAT21_SUPERCLASSES)
    index = {name: s for s, name in enumerate(superclass_names)}
    class_names, superclass_of, lineages = [], [], []
    for k, class_dir in enumerate(class_dirs):
        parts = class_dir.split("_")
        official_id = int(parts[0]) if parts[0].isdigit() else k  # NNNNN is the id in the full 10,000-class set
        category = by_dir.get(class_dir) or by_id.get(official_id) or {}
        supercategory = category.get("supercategory")
        if supercategory and supercategory not in index:   # not one of iNat21's eleven: appended, the ids kept
            index[supercategory] = len(superclass_names)
            superclass_names.append(supercategory)
        superclass_of.append(index[supercategory] if supercategory else
                             table[official_id] if official_id < len(table) else animalia)
        class_names.append(category.get("name") or (" ".join(parts[6:]) if len(parts) >= 8 else class_dir))
        # genus ... kingdom, where the json carries the taxonomy (the published one does for every species)
        lineages.append([category[r] for r in INAT21_RANKS] + [superclass_names[superclass_of[-1]]]
                        if all(category.get(r) for r in INAT21_RANKS) else None)
    ranks = ranks_between(INAT21_RANKS, lineages) if None not in lineages else []
    files, labels = _scan_classes(split_dir, class_dirs, range(len(class_dirs)))
    return ImageListDataset(split_dir, files, labels,
                            make_hierarchy(class_names, superclass_names, superclass_of, ranks), image_size, flip)


def _inat21_categories(root, split):
    """The `categories` of an iNat21 json under root (every split's are the same), or None without one."""
    candidates = [os.path.join(root, name + ".json") for name in (split, "train_mini", "val", "train")]
    candidates = [path for path in candidates if os.path.isfile(path)]
    # parse the smallest (train.json is ~1 GB of image records)
    return inat21_categories(min(candidates, key=os.path.getsize)) if candidates else None


def folder_dataset(root, split="train", image_size=256, flip=True, hierarchy_csv=None):
    """A two-level tree root/<superclass>/<class>/*, or with `hierarchy_csv` a flat root/<class>/* (root/<split> is
    used when it exists). Superclass ids: sorted superclass names; class ids: sorted (superclass, class), so the same
    data arranged either way gets the same ids, which do not shift when a split lacks a class."""
    require_dir(root, root, "folder dataset")
    root = os.path.join(root, split) if split and os.path.isdir(os.path.join(root, split)) else root
    ranks = []
    if hierarchy_csv:
        nodes, between = read_hierarchy_csv(hierarchy_csv)  # class -> [its node at each rank], the superclass last
        present = _list_dirs(root)
        unknown = [c for c in present if c not in nodes]
        if unknown:
            raise UserError(f"{len(unknown)} class folders of {root} are not in {hierarchy_csv}, "
                            f"e.g. {', '.join(unknown[:5])}")
        class_names = sorted(nodes, key=lambda c: (nodes[c][-1], c))                  # in id order
        superclass_names = sorted({lineage[-1] for lineage in nodes.values()})
        superclass_of = [superclass_names.index(nodes[c][-1]) for c in class_names]
        ranks = ranks_between(between, [nodes[c] for c in class_names])
        ids = {c: k for k, c in enumerate(class_names)}
        files, labels = _scan_classes(root, present, [ids[c] for c in present])
    else:
        superclass_names, class_dirs, superclass_of = _list_dirs(root), [], []
        if not superclass_names:
            raise UserError(f"folder dataset: {root} holds no superclass folders (expected root/<superclass>/<class>/)")
        for s, superclass in enumerate(superclass_names):
            classes = _list_dirs(os.path.join(root, superclass))
            if not classes and list_images(os.path.join(root, superclass)):
                raise UserError(f"folder dataset: {os.path.join(root, superclass)} holds images, not class folders; "
                                "for a flat root/<class>/ layout pass --hierarchy-csv with class,superclass rows")
            class_dirs += [os.path.join(superclass, c) for c in classes]
            superclass_of += [s] * len(classes)
        files, labels = _scan_classes(root, class_dirs, range(len(class_dirs)))
        leaf = [os.path.basename(d) for d in class_dirs]
        repeated = collections.Counter(leaf)    # a name under two superclasses is qualified: "superclass/class"
        class_names = [n if repeated[n] == 1 else d.replace(os.sep, "/") for n, d in zip(leaf, class_dirs)]
    return ImageListDataset(root, files, labels, make_hierarchy(class_names, superclass_names, superclass_of, ranks),
                            image_size, flip)


def vegfru_dataset(root, split="train", image_size=256, flip=True):
    """VegFru from its own split lists (hardening.read_vegfru_lists): the images of vegfru_<split>.txt with their
    subclass ids, the hierarchy from every split's lists (so train, val and test share ids and names)."""
    splits, class_names, superclass_of = read_vegfru_lists(root, split)
    return ImageListDataset(root, *splits[split], vegfru_hierarchy(class_names, superclass_of), image_size, flip)


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


# ----------------------------------------------------------------------------------------------------------------
# Images on disk, preprocessed as DiT (ADM's centre crop, flips, [-1, 1])
# ----------------------------------------------------------------------------------------------------------------

class ImageListDataset(HierarchyView, Dataset):
    """Image files under `root` with class ids; read with hardening.read_rgb (any Pillow mode), preprocessed as DiT."""

    def __init__(self, root, files, labels, hierarchy, image_size=256, flip=True):
        if len(files) == 0:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        self.root, self.image_size, self.flip, self.hierarchy_ = root, image_size, flip, hierarchy
        # One numpy bytes array, not 500K Python strings: workers share it without refcount copy-on-access.
        self.files = np.array([os.fsencode(f) for f in files])  # (N,) relative paths
        self.labels = np.asarray(labels, dtype=np.int64)  # (N,)
        self.targets = self.labels.tolist()
        self._unreadable = set()  # indices that failed to decode in this process: skipped without retrying

    def __len__(self):
        return len(self.files)

    def read(self, i):
        """Item i itself, (image, class id), or a UserError naming its file when that cannot be read."""
        image = read_rgb(os.path.join(self.root, os.fsdecode(self.files[i])))
        return dit_preprocess(image, self.image_size, self.flip), int(self.labels[i])

    def __getitem__(self, index):
        # A bad file must not end an epoch (or a 500K-image cache): the next readable item stands in, with its own
        # label. Statistics and previews must not count or show that item twice: they use exact_item.
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
    """Item `index` itself, or None with a warning when its file cannot be read (statistics and previews: training's
    stand-in would count an image twice, across a class boundary)."""
    if not isinstance(dataset, ImageListDataset):
        return dataset[index]  # rendered items (toy) are never unreadable
    try:
        return dataset.read(index)
    except UserError as err:
        warnings.warn(f"{err} (left out)", stacklevel=2)
        return None


def readable_items(dataset, indices):
    """exact_item of each index in turn, those left out skipped (say, the first n readable images of a class)."""
    return filter(None, (exact_item(dataset, int(i)) for i in indices))


def center_crop_arr(pil_image, image_size):
    """ADM centre crop: box-halve while >= 2x too big, bicubic-resize the short side to image_size, crop the centre."""
    while min(*pil_image.size) >= 2 * image_size:        # cheap, and no aliasing of one big bicubic step
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)  # (H, W, C)
    crop_y, crop_x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size])


def dit_preprocess(image, image_size, flip=True):
    """PIL RGB image -> (3, image_size, image_size) in [-1, 1], as DiT's train.py: ADM centre crop, a random horizontal
    flip (torchvision's draw: torch.rand(1) < 0.5), ToTensor, Normalize(0.5, 0.5)."""
    x = transforms.functional.to_tensor(center_crop_arr(image, image_size))     # (3, H, W) in [0, 1]
    if flip and torch.rand(1) < 0.5:
        x = x.flip(-1)
    return (x - 0.5) / 0.5


# ----------------------------------------------------------------------------------------------------------------
# One entry point, and the flags that name a dataset
# ----------------------------------------------------------------------------------------------------------------

DATASETS = ("inat21", "vegfru", "folder", *toy.TOY_SETS)


def build_dataset(name, data_path=None, image_size=None, split=None, flip=True, seed=0, hierarchy_csv=None):
    """'inat21' | 'vegfru' | 'folder' | 'toy' | 'toy-base' -> a Dataset of (image in [-1, 1], class id) holding its
    hierarchy. Defaults (None): the root data/<name>/ (toy sets are rendered), the split train_mini for iNat21 and train for
    the others, 32 px for the toy sets and 256 for the others."""
    data_path = dataset_root(name, data_path)
    split = split or ("train_mini" if name == "inat21" else "train")
    image_size = image_size or default_image_size(name)
    if name == "inat21":
        return inat21_dataset(data_path, split, image_size, flip)
    if name == "vegfru":
        return vegfru_dataset(data_path, split, image_size, flip)
    if name == "folder":
        return folder_dataset(data_path, split, image_size, flip, hierarchy_csv)
    return toy.toy_dataset(name, image_size, split, flip, seed)


def default_image_size(name):
    return 32 if name in toy.TOY_SETS else 256


def dataset_root(name, data_path=None):
    """--data-path, else data/<name>/; None for the toy sets, which are rendered."""
    return data_path or (os.path.join("data", name) if name in ("inat21", "vegfru", "folder") else None)


def add_data_args(p, split="train_mini for inat21, else train", required=False):
    """The flags that name a dataset, for every command that reads one."""
    p.add_argument("--data", choices=DATASETS, required=required, help="dataset (README: the paper's workflow at scale)")
    p.add_argument("--data-path", help="dataset root; default: data/<--data> (inat21: the folder of its splits; vegfru: "
                                       "the folder of vegfru_list/)")
    p.add_argument("--split", help=f"default: {split}")
    p.add_argument("--hierarchy-csv", help="class,superclass rows for a flat folder of class folders (more ranks: a "
                                           "header naming them, class,genus,superclass)")


# ----------------------------------------------------------------------------------------------------------------
# The VAE-latent cache (layout: hardening.CACHE_ARRAYS); encoding 500K images every epoch is otherwise the main cost
# ----------------------------------------------------------------------------------------------------------------

class _Indexed(Dataset):
    """dataset[indices[k]] with its index: (index, image, label)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        return (self.indices[k], *self.dataset[self.indices[k]])


def build_latent_cache(dataset, vae, out_dir, batch_size=32, num_workers=DEFAULT_WORKERS, meta=None, device=None,
                       progress=True):
    """Encode every image of `dataset` (built with flip=False) and its mirror with vae.encode(x) -> (mean, logvar),
    and store the moments; an interrupted cache resumes. Under torchrun each rank encodes an even share of the images
    left (a contiguous run of them; one node: the ranks share out_dir's page cache), and rank 0's bar counts the
    world's images; rank 0 writes meta.json. meta: its extra fields. -> the meta dict."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = vae.to(device).eval()
    n, x0 = len(dataset), dataset[0][0]  # (3, H, W)
    with torch.no_grad():
        mean0, _ = vae.encode(x0[None].to(device))  # one probe encode: the latent shape, whatever the VAE's factor
    files = hashlib.sha256(b"\n".join(dataset.files.tolist()) + np.asarray(dataset.targets, np.int64).tobytes()) \
        .hexdigest() if hasattr(dataset, "files") else None      # another file list must not resume this cache
    meta = dict(format=CACHE_FORMAT, version=CACHE_VERSION, **(meta or {}), image_size=int(x0.shape[-1]),
                num_images=n, latent_shape=list(mean0.shape[1:]), moments_dtype="float16",
                hierarchy=dataset.hierarchy(), files_sha256=files, complete=False)

    def images_left():
        prepare_cache_dir(out_dir, meta)
        return np.flatnonzero(~open_cache_arrays(out_dir, meta)["done.npy"])
    left = on_rank0(images_left)         # read before any rank writes; the others wait until the files exist
    arrays = open_cache_arrays(out_dir, meta, mode="r+")
    moments, labels, done = arrays["moments.npy"], arrays["labels.npy"], arrays["done.npy"]  # (N, 2, 2C, h, w), (N,)
    shares = np.array_split(left, world)                 # rank 0's the largest: its last step is the world's last
    loader = DataLoader(_Indexed(dataset, shares[rank].tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda", worker_init_fn=worker_init)
    bar = tqdm(total=len(left), unit="img", desc=f"encoding {len(left)} of {n} images", disable=not progress or rank)
    with torch.no_grad(), bar:
        for step, (index, x, y) in enumerate(loader):
            x = x.to(device, non_blocking=True)  # (B, 3, H, W)
            mean, logvar = vae.encode(torch.cat([x, x.flip(-1)]))  # (2B, C, h, w) each
            both = torch.cat([mean, logvar], dim=1).float()  # (2B, 2C, h, w)
            both = both.view(2, len(x), *both.shape[1:]).transpose(0, 1)  # (B, 2, 2C, h, w): image, mirror
            rows = index.numpy()
            moments[rows] = both.cpu().numpy().astype(np.float16)
            labels[rows] = y.numpy()  # the label of what was encoded (an unreadable file's stand-in too)
            moments.flush()
            labels.flush()
            done[rows] = True  # only once the data is on disk
            done.flush()
            bar.update(sum(min(batch_size, max(0, len(share) - step * batch_size)) for share in shares))  # the world's
    if world > 1:
        dist.barrier()
    if rank == 0:
        meta["complete"] = bool(done.all())                # every rank's rows: one file, flushed by each
        write_json(os.path.join(out_dir, "meta.json"), meta)
    return meta


class LatentCacheDataset(HierarchyView, Dataset):
    """(z, class id) from a latent cache: z = scale * (mean + exp(logvar / 2) * eps), eps fresh each call, of the image
    or (flip, p = 1/2) its mirror: DiT's `vae.encode(x).latent_dist.sample().mul_(0.18215)` with random flips, the
    scale that of the VAE the cache records. expect: meta.json fields this run needs (hardening.open_cache)."""

    def __init__(self, path, expect=None, flip=True):
        self.path, self.flip = path, flip
        self.meta, arrays = open_cache(path, expect or {})
        self.hierarchy_ = self.meta["hierarchy"]
        self.labels = np.array(arrays["labels.npy"])  # (N,)
        self.targets = self.labels.tolist()
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
        view = int(torch.randint(2, ())) if self.flip else 0  # 0 the image, 1 its mirror
        moments = torch.from_numpy(self._moments[index, view].astype(np.float32))  # (2C, h, w)
        return scaled_latent(*moments.chunk(2), self.scale), int(self.labels[index])  # (C, h, w)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def dataset_of(args, flip=False):
    """The dataset of the flags -> (dataset, split, image_size); under torchrun built by rank 0 alone."""
    split = args.split or ("train_mini" if args.data == "inat21" else "train")
    image_size = args.image_size or default_image_size(args.data)
    dataset = on_rank0(lambda: build_dataset(args.data, args.data_path, image_size, split, flip,
                                             hierarchy_csv=args.hierarchy_csv))
    return dataset, split, image_size


def cmd_cache(args):
    _, _, device = init_distributed()
    try:
        dataset, split, image_size = dataset_of(args)
        command = ["python", "data.py", "cache", "--data", args.data, "--split", split, "--image-size",
                   str(image_size), "--vae", args.vae, "--out", args.out]
        command += ["--data-path", args.data_path] * bool(args.data_path) + ["--hierarchy-csv", args.hierarchy_csv] * \
            bool(args.hierarchy_csv)
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
    dataset, split, _ = dataset_of(args)
    counts = np.bincount(dataset.targets, minlength=dataset.num_classes)
    between = "".join(f"{len(r['names'])} {r['rank']} nodes, " for r in dataset.hierarchy().get("ranks", []))
    print(f"{args.data} {split}: {len(dataset)} images, {dataset.num_classes} classes, {between}"
          f"{dataset.num_superclasses} superclasses")
    superclass_of = np.asarray(dataset.superclass_of)
    for s, name in enumerate(dataset.superclass_names):
        members = superclass_of == s
        print(f"  {s:3d} {name:24s} {int(members.sum()):6d} classes {int(counts[members].sum()):8d} images")


def cmd_preview(args):
    dataset, _, size = dataset_of(args)
    targets, rows = np.asarray(dataset.targets), []
    for k in range(min(dataset.num_classes, args.max_classes)):
        row = np.zeros((size, size * args.per_class, 3), dtype=np.uint8)
        for j, (x, _) in enumerate(itertools.islice(readable_items(dataset, np.flatnonzero(targets == k)),
                                                    args.per_class)):  # x: (3, H, W) in [-1, 1]
            row[:, j * size:(j + 1) * size] = ((x + 1) * 127.5).round().clamp(0, 255).permute(1, 2, 0)
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
        add_data_args(p, required=p is not preview)
        p.add_argument("--image-size", type=multiple_of_8 if p is cache else positive_int,
                       help="default: 32 for toy, else 256" + (" (a multiple of 8: the VAE's)" if p is cache else ""))
    preview.set_defaults(data="toy")
    cache.add_argument("--vae", default="sd-vae-ft-ema", help="SD VAE folder or weights file (also under pretrained/)")
    cache.add_argument("--out", type=folder_path, required=True, help="cache folder (the same command resumes it)")
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

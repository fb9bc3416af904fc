"""Paper Table 1: FID per superclass and overall, and LPIPS diversity, of samples drawn over the 10,000 iNat21 classes
(§4.3); the toy tables and the paper's figures offline.

    # reference statistics of the real validation images, per superclass (iNat21 under data/inat21/)
    python evaluate.py stats --data inat21 --split val --out results/inat21_val.npz
    # 100,000 samples spread over the classes (eq. 1, w = 4, 250 DDPM steps) on 8 GPUs, then Table 1
    torchrun --nproc_per_node=8 evaluate.py generate --ckpt pretrained/FineDiffusion-iNat.pt --num-samples 100000 \
        --out samples/finediffusion --fid results/inat21_val.npz --out-csv results/table1.csv
    # or score generated images (a generate folder, or an .npz with arr_0 [N,H,W,3] uint8) later
    python evaluate.py fid --real results/inat21_val.npz --fake samples/finediffusion --out-csv results/table1.csv
    # offline: the toy tables (accuracy, classifier FID, diversity) and the figures (figures.py)
    python evaluate.py toy --ckpt results/toy-finediffusion-s0 results/toy-full-s0 --cfg-scales 1 2 4 --plot sweep.png
    python evaluate.py embeddings --ckpt results/toy-finediffusion-s0 --out fig7.png           # Fig. 7
    python evaluate.py grid --ckpt results/toy-finediffusion-s0 --class-ids 8 9 10 11 --data toy --out fig5.png

FID (Heusel et al. 2017), lower is better: the Frechet distance between Gaussians fitted to the 2048-d Inception-v3
pool features of real and of generated images, overall and within each superclass; beside it, from the same Inception
pass, the metrics the field prints (fid_inception.py): sFID, KID, Inception Score, precision and recall. LPIPS (Zhang
et al. 2018, v0.1, AlexNet), higher is better: the mean perceptual distance between two generated images of one class.
Where a superclass has fewer images than FID's 2048 dimensions (five of iNat21's in val), read KID: FID is biased by
the count, KID is not. FIDs compare only when every detail of the features matches, so fid_inception.py ports the TF
Inception graph pytorch-fid uses, and statistics record what made them (image size and crop, Inception sha256): `fid`
refuses to compare two that differ.
"""
import hashlib
import json
import math
import os
import re
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch.utils.data import DataLoader, Dataset
from torchvision.models import alexnet
from tqdm import tqdm

import data
import figures
import toy
from fid_inception import (FID_WEIGHTS, IS_SPLITS, KID_SUBSET_SIZE, KID_SUBSETS, PR_NEIGHBOURS, feature_stats,
                           frechet_distance, inception_features, inception_score, kernel_inception_distance,
                           load_inception, precision_recall, unit_images)
from hardening import (MANIFEST, ArgumentParser, UserError, atomic_write, check_comparable, check_hierarchy,
                       device_name, file_sha256, find_file, find_weights, folder_path, init_distributed,
                       int_in, load_strict, lock_folder, nonnegative_int, npz_member_layout, on_rank0, out_file,
                       out_of_memory_advice, positive_int, read_checkpoint, read_json, read_manifest, read_npz,
                       read_provenance, release, remove_stale_temp_files, run_cli, statistics_file, stats_hierarchy,
                       worker_init, write_csv, write_json, write_npz_rows)
from model import inat21_hierarchy
from sample import add_guidance_arg, add_sampler_args, guide_labels, load_for_sampling, sample_images, sample_pairs, sampler_of

ALEXNET_WEIGHTS, LPIPS_LIN_WEIGHTS = "alexnet-owt-7be5be79.pth", "alex.pth"


# --- Table 1: statistics per superclass, and its rows ----------------------------------------------------------------
# A statistics .npz holds, of all images: count; mu and sigma (FID); spatial_mu and spatial_sigma (sFID); isc (the
# Inception Score's mean and std); `features`, the pool features themselves (float32), which KID and precision/recall
# need: every one, for both metrics depend on how many they compare (100,000 iNat21 val images: 819 MB); `provenance`
# (JSON: their source, the size and crop they were scored at, the Inception weights' sha256, the count). For images
# with a hierarchy, that hierarchy (JSON), `superclass` (each feature's) and, for each superclass index s of it,
# count_<s>, mu_<s>, sigma_<s>, spatial_mu_<s>, spatial_sigma_<s>, isc_<s>. Files made before sFID, KID, IS and
# precision/recall were added lack their parts: those columns are left empty.

def image_stats(features, labels=None, hierarchy=None, provenance=None, logits=None, spatial=None):
    """Statistics of all images and of each superclass (when the images' classes and hierarchy are known). features:
    pool features (N, D); logits (N, C) and spatial features (N, 2023): the same pass's (forward_all), where given."""
    stats = {"count": np.int64(len(features)), "features": np.asarray(features, np.float32),
             **group_stats(features, logits, spatial)}
    if provenance is not None:
        stats["provenance"] = np.array(json.dumps(provenance))
    if hierarchy is None or labels is None or not (np.asarray(labels) >= 0).any():
        return stats
    stats["hierarchy"] = np.array(json.dumps(hierarchy))
    stats["superclass"] = superclasses = superclasses_of(labels, hierarchy)   # (N,)
    for s in range(len(hierarchy["superclass_names"])):
        group = superclasses == s
        stats[f"count_{s}"] = np.int64(group.sum())
        if group.sum() >= 2:  # a covariance needs two images
            stats.update(group_stats(features[group], *(None if a is None else a[group] for a in (logits, spatial)),
                                     suffix=f"_{s}"))
    return stats


def group_stats(features, logits=None, spatial=None, suffix=""):
    """One group's FID mean and covariance, its sFID ones and its Inception Score (where given), named with `suffix`."""
    stats = dict(zip(("mu" + suffix, "sigma" + suffix), feature_stats(features)))
    if spatial is not None:
        stats.update(zip(("spatial_mu" + suffix, "spatial_sigma" + suffix), feature_stats(spatial)))
    if logits is not None:
        stats["isc" + suffix] = np.array(inception_score(logits))   # (mean, std)
    return stats


def superclasses_of(labels, hierarchy):
    """The superclass id of each image (-1 for an unlabelled one)."""
    superclass_of = np.append(np.asarray(hierarchy["superclass_of"], np.int64), -1)   # index -1: unlabelled
    return superclass_of[np.asarray(labels, np.int64)]


def members(hierarchy, s):
    """The names of the classes of superclass s."""
    return {n for n, p in zip(hierarchy["class_names"], hierarchy["superclass_of"]) if p == s}


def fid_table(real, fake, lpips=None, overall_only=False, device="cpu"):
    """Rows like paper Table 1, one per superclass of the generated images (in the reference's order), then Overall
    (metric_row's). Superclasses are matched by name, never by position, and a row is given only where both sides'
    superclass holds the same classes (else it would compare different things: it is dropped, and said).
    lpips: lpips_diversity's."""
    rows = []
    foreign = "count" not in real                  # another tool's reference statistics: the overall row alone
    fake_h = None if overall_only or foreign else stats_hierarchy(fake)
    if fake_h is not None:
        real_h = stats_hierarchy(real)
        if real_h is None:
            raise UserError("the reference statistics have no per-superclass parts: recompute them from labelled "
                            "images with `evaluate.py stats --data ...`, or pass --overall-only")
        fake_names, real_names = fake_h["superclass_names"], real_h["superclass_names"]
        present = [s for s in range(len(fake_names)) if int(fake.get(f"count_{s}", 0)) > 0]
        dropped = [fake_names[s] for s in present if fake_names[s] not in real_names]
        for r, name in enumerate(real_names):
            s = fake_names.index(name) if name in fake_names else None
            if s not in present:
                continue
            if members(real_h, r) != members(fake_h, s):
                dropped.append(name)
                continue
            rows.append(metric_row(name, part(real, r), part(fake, s),
                                   lpips["per_superclass"].get(s, math.nan) if lpips else math.nan, device))
        if dropped:
            print(f"note: no per-superclass row for {', '.join(dropped)}: the reference statistics' hierarchy holds "
                  "other classes there (or none), so those FIDs would compare different things", file=sys.stderr)
    rows.append(metric_row("Overall", part(real), part(fake), lpips["overall"] if lpips else math.nan, device))
    for side, name in ((real, "reference"), (fake, "generated images'")):
        if "count" in side and "features" not in side:
            print(f"note: the {name} statistics were made before sFID, KID, IS and precision/recall: their columns "
                  "are left empty; make them again with `evaluate.py stats` to fill them", file=sys.stderr)
    return rows


def part(stats, s=None):
    """One side's statistics of superclass s (None: of all its images), named without the suffix _<s>."""
    suffix = "" if s is None else f"_{s}"
    got = {n: stats[n + suffix] for n in ("count", "mu", "sigma", "spatial_mu", "spatial_sigma", "isc")
           if n + suffix in stats}
    if "features" in stats:
        got["features"] = stats["features"] if s is None else stats["features"][stats["superclass"] == s]
    return got


def metric_row(superclass, real, fake, lpips, device="cpu"):
    """One row of Table 1 from two sides' part()s: {"superclass", "fid" (max(0, d): a distance), "fid_raw" (d as
    computed), "sfid", "kid", "kid_std", "is", "is_std" (the generated images'), "precision", "recall", "lpips",
    "count_real", "count_fake", "kid_subset" (the subset size KID drew: 1000, or a side's count where it has fewer)}.
    Round-off can make d slightly negative (identical sets give -3e-5): the table shows max(0, d), and keeps d as
    fid_raw. A metric whose parts a side lacks, or that needs more images than it has, is NaN."""
    both = lambda name: name in real and name in fake
    fid = frechet_distance(real["mu"], real["sigma"], fake["mu"], fake["sigma"]) if both("mu") else math.nan
    sfid = frechet_distance(real["spatial_mu"], real["spatial_sigma"], fake["spatial_mu"], fake["spatial_sigma"]) \
        if both("spatial_mu") else math.nan
    kid, kid_std, subset = kernel_inception_distance(fake["features"], real["features"]) if both("features") else \
        (math.nan, math.nan, None)
    precision, recall = precision_recall(real["features"], fake["features"], device=device) if both("features") else \
        (math.nan, math.nan)
    is_mean, is_std = map(float, fake.get("isc", (math.nan, math.nan)))
    count = lambda side: int(side["count"]) if "count" in side else None
    return {"superclass": superclass, "fid": fid if math.isnan(fid) else max(0.0, fid), "fid_raw": fid,
            "sfid": sfid if math.isnan(sfid) else max(0.0, sfid), "kid": kid, "kid_std": kid_std, "is": is_mean,
            "is_std": is_std, "precision": precision, "recall": recall, "lpips": lpips, "count_real": count(real),
            "count_fake": count(fake), "kid_subset": subset}


def print_table(rows, csv_path=None, json_path=None, **meta):
    """Table 1 on the console, and as CSV and/or JSON (NaN: an empty cell / null; fid_raw in the JSON alone)."""
    num = lambda v, digits=3: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"
    count = lambda v: "-" if v is None else v
    width = max(12, *(len(r["superclass"]) for r in rows))
    print(f"{'':<{width}}  {'FID↓':>9}  {'sFID↓':>9}  {'KID↓':>7}  {'IS↑':>7}  {'Prec↑':>6}  {'Rec↑':>6}  "
          f"{'LPIPS↑':>7}  {'n real':>7}  {'n fake':>7}")
    for r in rows:
        print(f"{r['superclass']:<{width}}  {num(r['fid']):>9}  {num(r['sfid']):>9}  {num(r['kid'], 4):>7}  "
              f"{num(r['is'], 2):>7}  {num(r['precision']):>6}  {num(r['recall']):>6}  {num(r['lpips']):>7}  "
              f"{count(r['count_real']):>7}  {count(r['count_fake']):>7}")
    fewer = [f"{r['superclass']} ({r['kid_subset']})" for r in rows if (r["kid_subset"] or math.inf) < KID_SUBSET_SIZE]
    if fewer:
        print(f"note: KID drew subsets of fewer than {KID_SUBSET_SIZE} images where a side has fewer (kid_subset): "
              f"{', '.join(fewer)}", file=sys.stderr)
    clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
    if csv_path:
        write_csv(csv_path, [{k: v for k, v in r.items() if k != "fid_raw"} for r in clean])
    if json_path:
        write_json(json_path, {**meta, "rows": clean}, indent=2)


def compute_stats(source, model, device="cpu", batch_size=50, workers=0, progress=True):
    """Feature statistics of an ImageSource, overall and per superclass, each image counted under its own label (an
    image left out takes its label with it), recording what made them: the source, the size and crop of its images
    (each checked to be that size), the Inception weights (model.weights_sha256) and the count."""
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_images,
                        pin_memory=torch.device(device).type == "cuda", worker_init_fn=worker_init)
    labels = []  # (B,) per batch, in step with the features of its images

    def images():
        for x, y in tqdm(loader, desc="inception features", unit="batch", disable=not progress):
            if len(y) and list(x.shape[2:]) != source.made["image_size"]:
                raise UserError(f"{source.name}: an image is {x.shape[2]}x{x.shape[3]} px where its source says "
                                f"{'x'.join(map(str, source.made['image_size']))}: pass --image-size to crop them "
                                "all to one size")
            if len(y):
                labels.append(y)
                yield x, y  # (B, 3, H, W), (B,)

    out = inception_features(model, images(), device, progress=False, count=len(source))  # pool (N, 2048), ...: in order
    provenance = dict(source.made, count=len(out["pool"]), inception_sha256=model.weights_sha256)
    return image_stats(out["pool"], torch.cat(labels).numpy(), source.hierarchy, provenance, out["logits"],
                       out["spatial"])


# --- LPIPS v0.1 (AlexNet): the diversity of same-class samples -------------------------------------------------------

class LPIPS(nn.Module):
    """LPIPS v0.1, AlexNet variant: images in [0, 1] -> one distance per image pair, shape (N,)."""

    taps = (1, 4, 7, 9, 11)  # the ReLUs of alexnet().features whose outputs are compared
    channels = (64, 192, 384, 256, 256)

    def __init__(self):
        super().__init__()
        self.features = alexnet().features  # key names as in the published alexnet-owt-7be5be79.pth
        # one learned 1x1 conv (no bias) per layer weighs the channels of the squared feature difference
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in self.channels)
        # the ImageNet input normalisation of the lpips release, for inputs in [-1, 1]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, alexnet_path=None, lin_path=None):
        """LPIPS with the published AlexNet trunk (alexnet-owt-7be5be79.pth; its classifier unused) and the v0.1
        linear heads (alex.pth: lin{i}.model.1.weight, index 1 following a Dropout, a no-op here)."""
        model = cls()
        alexnet_path, lin_path = find_weights(alexnet_path, ALEXNET_WEIGHTS), find_weights(lin_path, LPIPS_LIN_WEIGHTS)
        trunk, heads = {}, {}
        for key, value in read_checkpoint(alexnet_path).items():
            if not key.startswith(("features.", "classifier.")):
                raise UserError(f"{alexnet_path}: unexpected tensor '{key}'")
            if key.startswith("features."):
                trunk[key[len("features."):]] = value
        load_strict(model.features, trunk, alexnet_path)
        for key, value in read_checkpoint(lin_path).items():
            match = re.fullmatch(r"lin(\d)\.model\.1\.weight", key)
            if match is None:
                raise UserError(f"{lin_path}: unexpected tensor '{key}'")
            heads[f"{match.group(1)}.weight"] = value
        try:
            load_strict(model.lins, heads, lin_path)
        except UserError as e:  # name the tensor as published
            raise UserError(re.sub(r"'(\d)\.weight'", r"'lin\1.model.1.weight'", str(e))) from None
        return model.eval().requires_grad_(False)

    def forward(self, x, y):  # x, y: (N, 3, H, W) in [0, 1]
        h = (torch.cat([x, y]) * 2 - 1 - self.shift) / self.scale       # both images in one pass: (2N, 3, H, W)
        distance = 0
        for i, layer in enumerate(self.features[:self.taps[-1] + 1]):   # the final max pool is not used
            h = layer(h)
            if i in self.taps:                                           # (2N, C, h, w)
                # unit-normalise each spatial feature vector over channels, so layers compare directions
                f = h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                fx, fy = f.chunk(2)                                       # (N, C, h, w) each
                distance = distance + self.lins[self.taps.index(i)]((fx - fy) ** 2).mean(dim=(1, 2, 3))  # (N,)
        return distance  # (N,)


class _Pairs(Dataset):
    """Item i -> (image a_i, image b_i), so pairs are decoded in DataLoader workers."""

    def __init__(self, images, a, b):
        self.images, self.a, self.b = images, a, b

    def __len__(self):
        return len(self.a)

    def __getitem__(self, i):
        first = lambda item: item[0] if isinstance(item, (tuple, list)) else item   # (image, label) of an ImageSource
        return first(self.images[self.a[i]]), first(self.images[self.b[i]])


def _group_means(values, groups):
    """{group: mean of the values in it} for integer group ids."""
    ids, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return {int(g): float(v) for g, v in zip(ids, np.bincount(inverse, weights=values) / counts)}


@torch.inference_mode()
def lpips_diversity(lpips, images, labels, num_pairs=1000, seed=0, superclass_of=None, batch_size=32,
                    device="cpu", workers=0, progress=False):
    """Mean LPIPS between random pairs of distinct generated images of one class (higher: more diverse).
    images[i]: (3, H, W) uint8 or [0, 1] float, or a tuple starting with it; labels: class id per image (-1:
    unlabelled); superclass_of: class id -> superclass id (optional).
    -> {"overall", "pairs", "per_class": {c: mean}, "per_superclass": {s: mean}}."""
    labels = np.asarray(labels, dtype=np.int64)
    a, b = sample_pairs(labels, num_pairs, np.random.default_rng(seed))
    loader = DataLoader(_Pairs(images, a, b), batch_size=batch_size, num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda", worker_init_fn=worker_init)
    lpips = lpips.to(device).eval()
    distances = []
    for x, y in tqdm(loader, desc="lpips pairs", unit="batch", disable=not progress):
        distances.append(lpips(unit_images(x).to(device), unit_images(y).to(device)).float().cpu())  # (B,)
    d = torch.cat(distances).double().numpy()  # (P,)
    pair_class = labels[a]  # (P,)
    per_superclass = {} if superclass_of is None else _group_means(d, np.asarray(superclass_of)[pair_class])
    return {"overall": float(d.mean()), "pairs": len(d), "per_class": _group_means(d, pair_class),
            "per_superclass": per_superclass}


# --- What is scored: images with their classes and hierarchy, and what they are --------------------------------------
# A generate folder (OUT/samples.json says each image's class and the hierarchy), an .npz of images (arr_0 (N, H, W,
# 3) uint8; optional labels and hierarchy), a folder of unlabelled images, or a data.py dataset. An image always
# travels with its own label. Every reader pickles, so DataLoader workers start under any start method.

ADM_CROP = "ADM centre crop"


class ImageSource(Dataset):
    """Images to score: item i -> (uint8 [3, H, W], class id or -1), or None for a real image left out (its file cannot
    be read; collate_images drops it with its label). `read(i)`: image i as uint8 (H, W, 3) or None. `made`: what the
    images are, as statistics record it: {"source": {"kind", ...}, "image_size": [H, W] as scored, "crop"}."""

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
    """read(i): row i of an .npz's arr_0, read alone at its byte offset where the member is stored uncompressed
    (np.savez, ADM's batches, ours): any N costs one image of memory (a memory map's pages would count in the RSS as
    they are read, all N by the end of a pass); a compressed one (np.savez_compressed) is read whole, once a process."""

    def __init__(self, path):
        self.path, self.shape, self.dtype, self.offset = path, *npz_member_layout(path, "arr_0.npy")
        self.row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        self._array = None

    def __getstate__(self):                    # a worker reads the compressed array itself (not a pickled copy)
        return {**self.__dict__, "_array": None}

    def __call__(self, i):
        if self.offset is None:
            if self._array is None:
                self._array = read_npz(self.path, ["arr_0"])["arr_0"]
            return self._array[i]
        with open(self.path, "rb") as f:
            f.seek(self.offset + i * self.row_bytes)
            return np.frombuffer(f.read(self.row_bytes), self.dtype).reshape(self.shape[1:])


class CroppedImages:
    """read(i): another reader's image i, centre-cropped and resized to image_size (ADM's preprocessing)."""

    def __init__(self, read, image_size):
        self.read, self.image_size = read, image_size

    def __call__(self, i):
        return np.array(data.center_crop_arr(Image.fromarray(np.asarray(self.read(i))), self.image_size))


def dataset_images(dataset, name, data=None, split=None, root=None):
    """Real images of a data.py dataset (no flips) with its labels and hierarchy, each the item itself (labels[i] is
    its class); a file that cannot be read is left out, with a warning. data, split, root: for the provenance."""
    size = dataset.image_size
    made = dict(source=dict(kind="dataset", data=data, split=split, root=root and os.path.realpath(root)),
                image_size=[size, size], crop=ADM_CROP if hasattr(dataset, "files") else "none")
    return ImageSource(name, DatasetImages(dataset), dataset.targets, dataset.hierarchy(), made)


def load_hierarchy(spec):
    """--hierarchy: 'inat21' (the built-in iNat21 table) or a JSON file with the three hierarchy keys."""
    return inat21_hierarchy() if spec == "inat21" else check_hierarchy(read_json(spec, "hierarchy"), spec)


def open_images(path, image_size=0, hierarchy=None):
    """A generate folder, an .npz (arr_0 [N, H, W, 3] uint8; optional labels and hierarchy) or a folder of unlabelled
    images as an ImageSource. `hierarchy` overrides the file's; `image_size` centre-crops and resizes every image to
    it (0: as they are)."""
    crop = ADM_CROP if image_size else "none"
    size = [image_size] * 2 if image_size else None
    if os.path.isdir(path):
        manifest = read_manifest(path)
        if manifest is None:
            files = [os.path.join(path, f) for f in data.list_images(path)]
            if not files:
                raise UserError(f"no images ({', '.join(data.IMAGE_EXTENSIONS)}) and no samples.json in {path}")
            made = dict(source=dict(kind="folder", folder=os.path.realpath(path)),
                        image_size=size or first_image_size(files[0]), crop=crop)
            return ImageSource(path, ImageFiles(files, image_size), [-1] * len(files), hierarchy, made)
        files = [os.path.join(path, f) for f, _ in manifest["images"]]
        missing = sum(not os.path.isfile(f) for f in files)
        if missing:
            raise UserError(f"{path}: {missing} of {len(files)} images are not generated yet: finish them with the "
                            "same `evaluate.py generate` command")
        made_size = manifest["made_by"].get("image_size")
        made = dict(source=dict(kind="generate", folder=os.path.realpath(path), made_by=manifest["made_by"]),
                    image_size=size or ([made_size] * 2 if isinstance(made_size, int) else first_image_size(files[0])),
                    crop=crop)
        return ImageSource(path, ImageFiles(files, image_size), [c for _, c in manifest["images"]],
                           hierarchy or manifest["hierarchy"], made)
    path = find_file(path)
    images = NpzImages(path)
    if len(images.shape) != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(f"{path}: expected images arr_0 [N, H, W, 3] uint8, found {images.dtype} {list(images.shape)}")
    extra = read_npz(path, ["labels", "hierarchy"])
    labels = extra.get("labels", np.full(images.shape[0], -1))
    if labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu":
        raise UserError(f"{path}: labels {labels.dtype} {list(labels.shape)} are not one class id per image")
    made = dict(source=dict(kind="npz", file=os.path.realpath(path)), image_size=size or list(images.shape[1:3]),
                crop=crop)
    return ImageSource(path, CroppedImages(images, image_size) if image_size else images, labels,
                       hierarchy or stats_hierarchy(extra, path), made)


def first_image_size(path):
    """[H, W] of an image file, from its header."""
    try:
        with Image.open(path) as image:
            return [image.height, image.width]
    except Exception as e:       # whatever Pillow raises: the file is unusable
        raise UserError(f"cannot read image {path}: {e}") from None


def collate_images(batch):
    """ImageSource items -> ([B, 3, H, W] uint8, [B] labels), less the images left out (None); B may be 0."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return torch.zeros(0, 3, 0, 0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)  # [0, 3, 0, 0], [0]
    images, labels = zip(*batch)
    if len({tuple(x.shape) for x in images}) > 1:
        raise UserError("images differ in size; pass --image-size to centre-crop and resize them")
    return torch.stack(images), torch.tensor(labels)


# --- stats and fid -------------------------------------------------------------------------------------------------

def scored_side(args, path):
    """One side of a comparison: a statistics file's arrays as they are, or the images to describe (an ImageSource)
    from --data (a dataset, real images) or a path (a generate folder, an .npz, a folder): images are never taken for
    statistics."""
    if path is not None and not os.path.isdir(path):
        stats = statistics_file(path)
        if stats is not None:
            return stats
    if path is None:
        split = args.split or "val"
        dataset = data.build_dataset(args.data, args.data_path, args.image_size, split, flip=False,
                                     hierarchy_csv=args.hierarchy_csv)
        return dataset_images(dataset, args.data_path or args.data, args.data, split, args.data_path)
    source = open_images(path, args.image_size or 0, load_hierarchy(args.hierarchy) if args.hierarchy else None)
    if source.hierarchy is None and (source.labels >= 0).any():
        print(f"note: {source.name} has class labels but no hierarchy (--hierarchy): overall statistics only",
              file=sys.stderr)
    return source


def made_of(side, inception):
    """What a side was (or will be) made from: a statistics file's provenance (None if it does not say), or the
    images' own record with the Inception weights that will describe them."""
    return read_provenance(side) if isinstance(side, dict) else dict(side.made, inception_sha256=inception.weights_sha256)


def stats_of(side, inception, args):
    """The statistics of a side (scored_side): a file's as they are, or computed from its images."""
    if isinstance(side, dict):
        return side
    print(f"{side.name}: {len(side)} images", file=sys.stderr)
    return compute_stats(side, inception, args.device, args.batch_size, args.workers)


def cmd_stats(args):
    if (args.images is None) == (args.data is None):
        raise UserError("give the images to describe: --data NAME (a dataset) or --images PATH")
    side = scored_side(args, args.images)
    if args.npz and isinstance(side, dict):
        raise UserError(f"--npz: {args.images} holds statistics, not images to write")
    stats = stats_of(side, load_inception(args.inception), args)
    atomic_write(args.out, lambda f: np.savez(f, **stats))
    h = stats_hierarchy(stats)
    detail = f", {len(h['superclass_names'])} superclasses" if h else " (no hierarchy: overall only)"
    print(f"wrote {args.out}: {int(stats['count'])} images{detail}")
    if args.npz:                     # the same images again, those left out left out: as many as were described
        write_npz(args.npz, side, int(stats["count"]), args)


# AlexNet's strided convolution and two 3x3 max pools leave no pixel of an image under 31 px (lpips then fails).
LPIPS_MIN_SIZE = 31


def lpips_for(source, args):
    """LPIPS diversity of the generated images, or None (with a note) when it cannot or should not be run."""
    skipped = None
    if args.pairs <= 0:
        return None
    if source is None or not (source.labels >= 0).any():
        skipped = "it needs generated images with their classes"
    elif not (np.bincount(source.labels[source.labels >= 0]) >= 2).any():
        skipped = "it needs at least two generated images of one class"
    elif min(source.made["image_size"]) < LPIPS_MIN_SIZE:       # the LPIPS release refuses them too: no resize
        skipped = (f"its AlexNet needs images of at least {LPIPS_MIN_SIZE} px, these are "
                   f"{'x'.join(map(str, source.made['image_size']))}")
    if skipped:
        print(f"note: LPIPS skipped (its column is left empty): {skipped}", file=sys.stderr)
        return None
    try:
        model = LPIPS.from_pretrained(args.lpips_alex, args.lpips_lin)
    except UserError as e:
        if args.lpips_alex or args.lpips_lin:
            raise  # asked for explicitly: a missing file is an error
        print(f"note: LPIPS skipped: {e}", file=sys.stderr)
        return None
    superclass_of = source.hierarchy["superclass_of"] if source.hierarchy else None
    return lpips_diversity(model, source, source.labels, args.pairs, args.seed, superclass_of,
                           args.batch_size, args.device, args.workers, progress=True)


def cmd_fid(args, inception=None):
    if (args.real is None) == (args.data is None):
        raise UserError("give the reference: --real FILE (statistics or images) or --data NAME (a dataset)")
    real, fake = scored_side(args, args.real), scored_side(args, args.fake)
    if inception is None and not (isinstance(real, dict) and isinstance(fake, dict)):
        inception = load_inception(args.inception)
    check_comparable(made_of(real, inception), made_of(fake, inception), [args.real or args.data, args.fake],
                     isinstance(real, dict))                                # before any feature is made
    real_stats, fake_stats = stats_of(real, inception, args), stats_of(fake, inception, args)
    lpips = lpips_for(None if isinstance(fake, dict) else fake, args)
    print_table(fid_table(real_stats, fake_stats, lpips, args.overall_only, args.device), args.out_csv, args.out_json,
                real=args.real, fake=args.fake, real_made_by=read_provenance(real_stats),
                fake_made_by=read_provenance(fake_stats), lpips_pairs=lpips["pairs"] if lpips else 0, seed=args.seed,
                kid_subsets=KID_SUBSETS, kid_subset_size=KID_SUBSET_SIZE, is_splits=IS_SPLITS,
                pr_neighbours=PR_NEIGHBOURS)


# --- generate: samples for FID over the classes, on any number of processes, resumable -------------------------------
# The work is cut into batches of (class, index) jobs; batch j is drawn by rank j % world, each image from its own noise
# stream seeded by (seed, class, index), so an image depends on neither --batch-size nor the number of GPUs, and a run
# resumes batch by batch. Images land as OUT/<class id>/<index>.png; OUT/samples.json records what made them (the
# checkpoint's sha256, the VAE and its latent scale, guidance, sampler, image size, ...), the hierarchy and each
# image's class. A rerun resumes only what the same settings made: else it stops, or with --overwrite starts over.

# The most images one generate run draws (10x Table 1's 100,000): its manifest lists each, so more is refused at once.
MAX_IMAGES = 1_000_000
MADE_BY_KEY = "finediffusion-made-by"   # the PNG text chunk that says under which settings an image was drawn


def generation_jobs(num_classes, num_samples=None, per_class=None):
    """[(class id, index within class)]: `per_class` each, or `num_samples` spread evenly: round-robin, or, with
    fewer samples than classes, every (K / N)-th class, so that each superclass range of iNat21 gets its share."""
    if per_class is not None:
        if per_class * num_classes > MAX_IMAGES:
            raise UserError(f"--per-class {per_class} over {num_classes} classes is {per_class * num_classes:,} images, "
                            f"more than the {MAX_IMAGES:,} one run draws: lower it, or use --num-samples")
        return [(c, i) for c in range(num_classes) for i in range(per_class)]
    if num_samples < num_classes:
        return [(n * num_classes // num_samples, 0) for n in range(num_samples)]
    return [(n % num_classes, n // num_classes) for n in range(num_samples)]


def image_seed(seed, class_id, index):
    """The seed of one Table 1 image, a function of (--seed, class, index) alone (64 bits of numpy's SeedSequence:
    distinct streams): the image is the same whatever --batch-size, number of GPUs or resume draws it."""
    return int(np.random.SeedSequence([seed, class_id, index]).generate_state(1, np.uint64)[0])


def job_file(class_id, index):
    return os.path.join(f"{class_id:05d}", f"{index:06d}.png")


def start_folder(out, manifest, overwrite):
    """Write OUT/samples.json, or check that the one there is of the same settings (then the run resumes); else
    refuse, or with `overwrite` delete the other settings' images and start over. Called holding OUT's lock."""
    remove_stale_temp_files(out)                          # images a killed run was writing
    old = read_manifest(out)
    same = old is not None and (old["made_by"], old["images"]) == (manifest["made_by"], manifest["images"])
    if old is not None and not same and not overwrite:
        changed = ", ".join(f"{k} {old['made_by'].get(k)!r} -> {v!r}" for k, v in manifest["made_by"].items()
                            if old["made_by"].get(k) != v)
        raise UserError(f"{out} holds samples made with other settings ({changed}): choose another --out, or pass "
                        "--overwrite to start over")
    for name, _ in old["images"] if old is not None and not same else []:   # each inside OUT (read_manifest checks)
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    write_json(os.path.join(out, MANIFEST), manifest, indent=None)


def made_tag(made_by):
    """What a generated PNG records of the settings it was drawn under: a resume keeps an image only if it was made
    under the manifest it resumes."""
    return hashlib.sha256(json.dumps(made_by, sort_keys=True).encode()).hexdigest()


def made_under(path, tag):
    """Is the PNG at `path` there, readable, and drawn under the settings `tag` says?"""
    try:
        with Image.open(path) as image:
            return image.text.get(MADE_BY_KEY) == tag
    except (OSError, ValueError, SyntaxError):                    # missing, cut short, not a PNG
        return False


def cmd_generate(args):
    if (args.num_samples is None) == (args.per_class is None):
        raise UserError("give exactly one of --num-samples and --per-class")
    sampler = sampler_of(args)                             # a bad --steps or interval fails before any work
    rank, world, device = init_distributed(args.device)
    model, info, vae = load_for_sampling(args.ckpt, args.base, args.vae, data.dataset_root(args.data, args.data_path))
    guide_labels(model, torch.zeros(1, dtype=torch.long), args.guidance, args.cfg_scale)  # has the table the rows?
    inception = fid_reference_fits(args, info["config"]["image_size"]) if args.fid and rank == 0 else None
    jobs = generation_jobs(model.y_embedder.num_classes, args.num_samples, args.per_class)
    # What the images depend on, read from what makes them (the checkpoint file read and the VAE by content, not by
    # path; the sampler built): a rerun resumes only these.
    made_by = dict(ckpt_sha256=file_sha256(info["path"]), vae_sha256=vae.identity()["sha256"] if vae else None,
                   latent_scale=vae.scaling_factor if vae else None, guidance=args.guidance, cfg_scale=args.cfg_scale,
                   **sampler.record(), seed=args.seed, precision=args.precision,
                   image_size=info["config"]["image_size"])
    manifest = dict(made_by=made_by, ckpt=os.path.abspath(info["path"]), hierarchy=model.hierarchy,
                    images=[[job_file(c, i), c] for c, i in jobs])
    held = []                     # OUT's lock, held by rank 0 for the whole run: one writer per folder

    def claim():
        held.append(lock_folder(args.out, "another evaluate.py generate", "wait for it to end, or choose another --out"))
        try:
            start_folder(args.out, manifest, args.overwrite)
        except BaseException:
            release(held.pop(), undo=True)
            raise
    try:
        on_rank0(claim)                                                    # the others wait for it
        generate_into(args, model, vae, jobs, sampler, made_tag(made_by), rank, world, device)
        if rank == 0 and args.npz:
            samples = open_images(args.out)
            write_npz(args.npz, samples, len(samples), args)
        if rank == 0 and args.fid:
            args.real, args.fake, args.data, args.hierarchy, args.image_size = args.fid, args.out, None, None, None
            cmd_fid(args, inception)
    finally:
        for lock in held:
            release(lock)


def generate_into(args, model, vae, jobs, sampler, tag, rank, world, device):
    """This rank's share of the images not yet drawn under these settings (tag), each from its own noise."""
    batches = [jobs[i:i + args.batch_size] for i in range(0, len(jobs), args.batch_size)]
    mine = [j for j in range(rank, len(batches), world)
            if not all(made_under(os.path.join(args.out, job_file(c, i)), tag) for c, i in batches[j])]
    if rank == 0:
        print(f"{len(jobs)} images in {len(batches)} batches over {world} process(es); rank 0 has {len(mine)} to do",
              file=sys.stderr)
    made = PngInfo()
    made.add_text(MADE_BY_KEY, tag)
    kept = f"; the images written so far are kept: the same command with it resumes ({args.out})"
    with out_of_memory_advice(f"--batch-size {max(1, args.batch_size // 2)}", kept):
        for j in tqdm(mine, desc=f"generate (rank {rank})", disable=rank != 0):
            classes = torch.tensor([c for c, _ in batches[j]])
            seeds = [image_seed(args.seed, c, i) for c, i in batches[j]]       # each image its own noise
            images = sample_images(model, classes, guide_labels(model, classes, args.guidance, args.cfg_scale),
                                   args.cfg_scale, sampler, vae, seeds, device, args.precision,
                                   progress=False)   # (B, H, W, 3) uint8
            for (c, i), image in zip(batches[j], images.numpy()):
                atomic_write(os.path.join(args.out, job_file(c, i)),
                             lambda f: Image.fromarray(image).save(f, format="PNG", pnginfo=made))
    if world > 1:
        dist.barrier()


def write_npz(path, source, count, args):
    """An ImageSource's images in one .npz as ADM's evaluator reads them, arr_0 uint8 [N, H, W, 3] (generate --npz:
    the samples; stats --npz: a reference batch of the real images, cropped and sized as scored), with their labels
    and hierarchy. Streamed: memory holds a batch, whatever N. count: the images that will come (unreadable ones are
    left out, with their labels)."""
    loader = DataLoader(source, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_images,
                        worker_init_fn=worker_init)
    # one array, not a tensor kept a batch: small blocks kept between the batches' large ones fragment the C heap,
    # which then grows by about a batch a step
    labels = np.empty(count, np.int64)

    def batches():
        done = 0
        for x, y in tqdm(loader, desc=f"writing {path}", unit="batch"):
            if len(y):
                yield x.permute(0, 2, 3, 1).numpy()  # (B, H, W, 3); the writer stops past `count` images
                labels[done:done + len(y)], done = y.numpy(), done + len(y)

    hierarchy = {} if source.hierarchy is None else {"hierarchy": np.array(json.dumps(source.hierarchy))}
    write_npz_rows(path, count, batches(), lambda: dict(labels=labels, **hierarchy))
    print(f"wrote {path}: {count} images", file=sys.stderr)


def fid_reference_fits(args, image_size):
    """generate --fid: the reference statistics checked against the images to come (their size, the Inception
    network) before the first is drawn. -> the Inception network."""
    reference = statistics_file(args.fid)
    if reference is None:
        raise UserError(f"--fid {args.fid}: not a statistics file (make one with `evaluate.py stats`)")
    inception = load_inception(args.inception)
    check_comparable(read_provenance(reference), dict(image_size=[image_size] * 2,
                                                      inception_sha256=inception.weights_sha256),
                     [args.fid, f"the {image_size} px images of {args.ckpt}"], True)
    return inception


# --- toy: paper Tables 1-2 in miniature, offline (toy.py scores) ------------------------------------------------------

def cmd_toy(args):
    if args.plot:
        figures.figure_path(args.plot)
    rows, sampler = toy.score_toy(args)
    toy.print_toy_table(rows)
    seeds = args.seeds or [args.seed]
    print(f"{sampler}; seeds {' '.join(map(str, seeds))}" + (" (mean±half the range)" if len(seeds) > 1 else ""))
    if args.out_json:
        write_json(args.out_json, rows)
    if args.out_csv:
        write_csv(args.out_csv, rows)
    if args.plot:
        figures.save_figure(args.plot, figures.tradeoff_panel(rows).image, rows)


# --- Command line ----------------------------------------------------------------------------------------------------

def add_image_args(p):
    data.add_data_args(p, split="val")
    p.add_argument("--hierarchy", help="'inat21' or a JSON hierarchy, for images labelled by class only")
    p.add_argument("--image-size", type=positive_int, help="centre-crop and resize to this (ADM preprocessing); "
                   "default: datasets 256 (toy 32), generated images as they are")
    p.add_argument("--inception", help=f"{FID_WEIGHTS} (default: as named, under pretrained/, in $TORCH_HOME)")
    p.add_argument("--batch-size", type=positive_int, default=50)
    p.add_argument("--workers", type=nonnegative_int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")


def add_fid_args(p):
    p.add_argument("--overall-only", action="store_true", help="skip the per-superclass rows")
    p.add_argument("--lpips-alex", help=f"{ALEXNET_WEIGHTS} (default: as named, under pretrained/, in $TORCH_HOME)")
    p.add_argument("--lpips-lin", help=f"LPIPS v0.1 {LPIPS_LIN_WEIGHTS} (default: as named, under pretrained/)")
    p.add_argument("--pairs", type=nonnegative_int, default=1000, help="random same-class pairs for LPIPS (0: none)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the LPIPS pairs (generate: and the noise)")
    p.add_argument("--out-csv", type=out_file)
    p.add_argument("--out-json", type=out_file)


def main(argv=None):
    parser = ArgumentParser(description="FID (overall, per superclass) and LPIPS diversity for FineDiffusion "
                                        "(paper §4.3, Table 1), generation at scale, the toy tables.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stats", help="reference Inception statistics (per superclass) of real or generated images")
    p.add_argument("--images", help="a generate folder, an .npz (arr_0 [N,H,W,3] uint8) or a folder of images")
    p.add_argument("--out", type=out_file, required=True, help="statistics .npz to write")
    p.add_argument("--npz", type=out_file, help="also write the images as an ADM reference batch (arr_0 uint8 "
                   "[N,H,W,3], labels, hierarchy), cropped and sized as described")
    add_image_args(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("fid", help="FID and LPIPS of generated images against reference statistics (Table 1)")
    p.add_argument("--real", help="statistics .npz from `stats` (or images); or --data: real images, described now")
    p.add_argument("--fake", required=True, help="generated images: a generate folder or an .npz")
    add_image_args(p)
    add_fid_args(p)
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("generate", help="samples for FID, spread over the classes; torchrun for several GPUs")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--base", help="base checkpoint of a delta checkpoint, if it moved")
    p.add_argument("--vae", help="SD VAE for latent models; default: the checkpoint's, else sd-vae-ft-ema")
    p.add_argument("--out", type=folder_path, required=True, help="folder: OUT/<class>/<index>.png and OUT/samples.json")
    p.add_argument("--overwrite", action="store_true", help="start over when OUT holds samples of other settings")
    p.add_argument("--num-samples", type=int_in(1, MAX_IMAGES), help="in all, spread evenly over the classes")
    p.add_argument("--per-class", type=int_in(1, MAX_IMAGES), help="or this many of every class")
    add_guidance_arg(p)
    add_sampler_args(p)
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--npz", type=out_file, help="also pack every image into this .npz (arr_0, labels, hierarchy)")
    p.add_argument("--fid", help="reference statistics .npz: compute FID and LPIPS when done")
    add_image_args(p)
    add_fid_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("toy", help="offline paper Tables 1-2 in miniature: accuracy, FID, diversity on the toy data")
    toy.add_toy_args(p)
    p.set_defaults(func=cmd_toy)
    figures.add_figure_commands(sub)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))

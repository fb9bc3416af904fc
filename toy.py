"""The toy world: the embedded default that plays the paper's data on a CPU, with no download. Its renderer, its two
datasets, and the classifier that scores samples of them (paper Tables 1-2 in miniature: `evaluate.py toy`).

A toy image is a look -- a shape (8 families, each with its own hue), a pattern (6) and a tint (pale or deep) -- drawn
upright with a small random offset and size, a random background and noise. The two sets mirror the paper's data:
  toy-base  ImageNet's role: every shape in 4 of its 6 patterns, in both tints: 64 classes, 512 renders each. The
            shipped base DiT (train.TOY_BASE) was pre-trained on it.
  toy       iNat21-mini's role: the 16 shape-pattern combinations the base never shows, in both tints: 32 species in 16
            genera (shape and pattern) in 8 superclasses (the shape families), a fixed 50 training images each.
The pose varies little on purpose: a DiT small enough to train on 2 CPU cores in an hour draws upright shapes
recognisably, not shapes turned and shifted at random. A small CNN trained on real toy images stands in for Inception:
it says whether a sample shows its subclass, its tint within its genus and its superclass, gives features for a Frechet distance, and (unit-normalised
feature maps, as LPIPS) a distance between two samples of one class.
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fid_inception import feature_stats, frechet_distance
from hardening import (UserError, atomic_write, finite_float, folder_path, load_strict, nonnegative_int, out_file,
                       positive_int, read_checkpoint)
from model import HierarchyView, checkpoint_label, make_hierarchy, nodes_at, ranks_between, two_levels
from sample import (add_sampler_args, guide_labels, has_guide_rows, load_for_sampling, sample_images, sample_pairs,
                    sampler_of)

TOY_SHAPES = ["disc", "square", "triangle", "cross", "diamond", "hexagon", "ellipse", "star"]
TOY_PATTERNS = ["plain", "striped", "spotted", "eyed", "checkered", "ringed"]
TOY_TINTS = ["pale", "deep"]
# The two sets and their images per class: the base a broad world, the fine-grained one a fixed 50 per class whatever
# the training --seed, as iNat21-mini's.
TOY_SETS = {"toy-base": dict(images_per_class=512), "toy": dict(images_per_class=50, seed=0)}


# ----------------------------------------------------------------------------------------------------------------
# The look of a toy image, rendered with numpy
# ----------------------------------------------------------------------------------------------------------------

def toy_unseen_patterns(shape):
    """The two patterns shape `shape` never wears in the base set (every pattern is worn by 5 or 6 other shapes)."""
    return shape % 6, (shape + 3) % 6


def toy_looks(name):
    """[(shape, pattern, tint)] of a toy set's classes in class-id order. Both sets name the tint in the label, as
    ImageNet's classes come with their colours (tried: a base whose tints were blended at random, unlabelled, drew a
    third of the deep species pale after FineDiffusion's tuning: its 1% of the weights could not learn tint)."""
    families = range(len(TOY_SHAPES))
    if name == "toy-base":
        shape_patterns = [(f, p) for f in families for p in range(len(TOY_PATTERNS)) if p not in toy_unseen_patterns(f)]
    else:
        shape_patterns = [(f, p) for f in families for p in toy_unseen_patterns(f)]
    return [(f, p, t) for f, p in shape_patterns for t in range(len(TOY_TINTS))]


def _shape_mask(shape, x, y):
    """Inside-test of a unit-sized shape in its own frame; x, y: arrays of object-frame coordinates."""
    ax, ay = np.abs(x), np.abs(y)
    if shape == "disc":
        return x * x + y * y <= 1.0
    if shape == "square":
        return np.maximum(ax, ay) <= 0.85
    if shape == "triangle":  # apex up (image y grows downwards)
        return (y <= 0.65) & (y >= -1.0 + 1.65 / 0.95 * ax)
    if shape == "cross":
        return ((ax <= 0.34) & (ay <= 0.95)) | ((ay <= 0.34) & (ax <= 0.95))
    if shape == "diamond":  # an elongated rhombus, so it is not just a rotated square
        return ax / 0.75 + ay / 1.05 <= 1.0
    if shape == "hexagon":
        return (ay <= 0.866) & (1.732 * ax + ay <= 1.732)
    if shape == "ellipse":
        return (x / 1.0) ** 2 + (y / 0.6) ** 2 <= 1.0
    if shape == "star":
        return np.hypot(x, y) <= 0.62 + 0.38 * np.cos(5 * np.arctan2(x, -y))
    raise ValueError(shape)


def _pattern_mask(pattern, x, y):
    """Where a pattern marks the body, in the object frame (so it turns with the shape); sizes suit 32 px."""
    if pattern == "plain":
        return np.zeros(x.shape, dtype=bool)
    if pattern == "striped":  # dark bands, period 0.7 radii
        return ((y * 1.43) % 1.0) < 0.5
    if pattern == "spotted":  # light dots on a 0.8-radius grid
        return ((x * 1.25) % 1.0 - 0.5) ** 2 + ((y * 1.25) % 1.0 - 0.5) ** 2 < 0.08
    if pattern == "eyed":  # one dark central eye
        return x * x + y * y < 0.17
    if pattern == "checkered":  # dark squares of 0.6 radii
        return (np.floor(x * 1.67) + np.floor(y * 1.67)) % 2 == 0
    if pattern == "ringed":  # one dark ring around the centre
        return np.abs(np.hypot(x, y) - 0.55) < 0.15
    raise ValueError(pattern)


def _hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB; h, s, v: arrays of shape (B,) in [0, 1] -> (B, 3)."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    return np.stack([np.choose(i, [c[channel] for c in choices]) for channel in range(3)], axis=-1)


def _coverage(mask, supersample):
    """(B, n, n) bool mask -> (B, n/s, n/s, 1): the fraction of each output pixel's s x s subpixels inside."""
    B, n, _ = mask.shape
    m = n // supersample
    return mask.reshape(B, m, supersample, m, supersample).mean(axis=(2, 4), dtype=np.float32)[..., None]


def render_toy(looks, rngs, image_size, supersample=2):
    """One uint8 image (H, W, 3) per (look, rng), stacked (B, H, W, 3); each image depends on its own rng only.
    look: (shape, pattern, tint), tint 0 pale, 1 deep."""
    B = len(looks)
    shape, pattern = (np.array([look[k] for look in looks]) for k in (0, 1))  # (B,), (B,)
    u = np.stack([rng.random(10) for rng in rngs]).astype(np.float32)  # (B, 10): the image's random look
    noise = np.stack([rng.standard_normal((image_size, image_size, 3), dtype=np.float32) for rng in rngs])
    tint = np.array([look[2] for look in looks], np.float32)  # (B,)

    # pose: upright, centre within +-0.04 of the middle, radius 0.60-0.66 of the half-width
    cx, cy = (u[:, 0] - 0.5) * 0.08, (u[:, 1] - 0.5) * 0.08
    radius = 0.60 + 0.06 * u[:, 2]
    # colour: the family's hue; pale (light, washed out) or deep (dark, saturated), a little jitter on each
    hue = shape / len(TOY_SHAPES) + 0.02 * (u[:, 3] - 0.5)
    sat = 0.35 + 0.6 * tint + 0.08 * (u[:, 4] - 0.5)
    val = 1.0 - 0.4 * tint + 0.08 * (u[:, 5] - 0.5)
    fg = _hsv_to_rgb((hue % 1.0).astype(np.float32), sat, np.clip(val, 0, 1))  # (B, 3)
    bg = _hsv_to_rgb(u[:, 6], 0.15 * u[:, 7], 0.1 + 0.25 * u[:, 8])  # (B, 3): dark, nearly grey
    dark, light = 0.3 * fg, 0.35 * fg + 0.65  # (B, 3): colours of the pattern marks
    mark_rgb = np.where((pattern == TOY_PATTERNS.index("spotted"))[:, None], light, dark)

    # supersampled pixel-centre grid in [-1, 1], then each image's object frame (unit = shape radius)
    n = image_size * supersample
    t = ((np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1)
    gy, gx = t[None, :, None], t[None, None, :]  # (1, n, 1), (1, 1, n)
    dx, dy = gx - cx[:, None, None], gy - cy[:, None, None]  # (B, n, n)
    x, y = dx / radius[:, None, None], dy / radius[:, None, None]  # (B, n, n)

    inside = np.zeros((B, n, n), dtype=bool)  # the shape
    mark = np.zeros((B, n, n), dtype=bool)  # its pattern, where it differs from the body
    for f in np.unique(shape):
        inside[shape == f] = _shape_mask(TOY_SHAPES[f], x[shape == f], y[shape == f])
    for k in np.unique(pattern):
        sel = pattern == k
        mark[sel] = _pattern_mask(TOY_PATTERNS[k], x[sel], y[sel])

    # anti-aliasing: average the supersampled masks into per-pixel coverage, then composite the flat colours
    shape_cover = _coverage(inside, supersample)  # (B, H, W, 1)
    mark_cover = _coverage(inside & mark, supersample)  # (B, H, W, 1)
    t = t.reshape(image_size, supersample).mean(axis=1)  # pixel centres at the output resolution
    direction = 2 * np.pi * u[:, 9, None, None]
    gradient = 1.0 + 0.2 * (np.cos(direction) * t[None, None, :] + np.sin(direction) * t[None, :, None])  # (B, H, W)
    img = bg[:, None, None, :] * gradient[..., None] * (1.0 - shape_cover)  # (B, H, W, 3)
    img += fg[:, None, None, :] * (shape_cover - mark_cover) + mark_rgb[:, None, None, :] * mark_cover
    img += 0.015 * noise
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)  # (B, H, W, 3)


# ----------------------------------------------------------------------------------------------------------------
# The two datasets
# ----------------------------------------------------------------------------------------------------------------

_TOY_SPLITS = {"train": 0, "val": 1, "test": 2}


class ToyDataset(HierarchyView, Dataset):
    """`images_per_class` renders of each look of a toy set (toy_looks). Item i is class i // images_per_class,
    instance i % images_per_class, rendered from the numpy rng seeded with (seed, split, class, instance): the same
    image on any machine. A class's superclass is its shape, its genus its shape and pattern."""

    max_prerender_bytes = 256 << 20  # pre-render the whole set when it fits; otherwise render per item

    def __init__(self, name="toy", image_size=32, images_per_class=50, seed=0, flip=True, split="train"):
        self.name, self.looks = name, toy_looks(name)
        self.image_size, self.images_per_class, self.seed, self.flip = image_size, images_per_class, seed, flip
        self.split_id = _TOY_SPLITS[split]
        names = ["/".join([TOY_SHAPES[f], TOY_PATTERNS[p], TOY_TINTS[t]]) for f, p, t in self.looks]
        genus = ranks_between(["genus"], [[f"{TOY_SHAPES[f]}/{TOY_PATTERNS[p]}", TOY_SHAPES[f]]    # shape + pattern
                                          for f, p, _ in self.looks])
        self.hierarchy_ = make_hierarchy(names, TOY_SHAPES, [f for f, _, _ in self.looks], genus)
        self.labels = np.repeat(np.arange(len(self.looks)), images_per_class)  # (N,): class of item i
        self.targets = self.labels.tolist()
        self.images = None  # (N, H, W, 3) uint8 when pre-rendered
        if len(self) * image_size * image_size * 3 <= self.max_prerender_bytes:
            self.images = np.concatenate([self.raw_images(range(i, min(i + 512, len(self))))
                                          for i in range(0, len(self), 512)])

    def __len__(self):
        return len(self.labels)

    def raw_images(self, indices):
        """uint8 (B, H, W, 3) images of the given items (no flip), rendered afresh."""
        classes = [int(self.labels[i]) for i in indices]
        rngs = [np.random.default_rng([self.seed, self.split_id, c, i % self.images_per_class])
                for c, i in zip(classes, indices)]
        return render_toy([self.looks[c] for c in classes], rngs, self.image_size)

    def __getitem__(self, index):
        arr = self.images[index] if self.images is not None else self.raw_images([index])[0]  # (H, W, 3) uint8
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[index])


def toy_dataset(name, image_size=32, split="train", flip=True, seed=0, **override):
    """One of TOY_SETS; `override` changes its ToyDataset arguments (e.g. images_per_class for a classifier)."""
    return ToyDataset(name, **{**dict(image_size=image_size, split=split, flip=flip, seed=seed), **TOY_SETS[name],
                               **override})


def toy_set_of(hierarchy):
    """The name of the toy set whose classes a checkpoint has, or None."""
    return next((name for name in TOY_SETS if hierarchy is not None and
                 two_levels(toy_dataset(name, 8, images_per_class=1).hierarchy()) == two_levels(hierarchy)), None)


# ----------------------------------------------------------------------------------------------------------------
# Scoring samples: the classifier, its metrics, the table (`evaluate.py toy`)
# ----------------------------------------------------------------------------------------------------------------

class ToyClassifier(nn.Module):
    def __init__(self, num_classes, width=32):
        super().__init__()
        w = width
        self.stages = nn.ModuleList([
            nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU())])
        self.fc = nn.Linear(4 * w, num_classes)

    def feature_maps(self, x):                    # x: (N, 3, H, W) in [-1, 1]
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)                        # (N, w, H/2, W/2), (N, 2w, H/4, W/4), (N, 4w, H/4, W/4)
        return maps

    def forward(self, x):
        features = self.feature_maps(x)[-1].mean(dim=(2, 3))  # (N, 4w)
        return self.fc(features), features


def toy_classifier(image_size, cache_dir="results", epochs=4, seed=0, toy_set="toy"):
    """The classifier of a toy set's images at `image_size`, trained once (CPU seconds) on 256 real images a class --
    more than the set's 50: it plays Inception, not a fine-tuned model -- and cached (a damaged cache is retrained)."""
    path = os.path.join(cache_dir, f"{toy_set.replace('-', '_')}_classifier_{image_size}px.pt")
    train_set = toy_dataset(toy_set, image_size, "train", seed=seed, images_per_class=256)
    with torch.random.fork_rng(devices=[]):   # the same classifier in every clone; the caller's streams untouched
        torch.manual_seed(seed)
        net = ToyClassifier(train_set.num_classes)
        if os.path.isfile(path):
            try:
                load_strict(net, read_checkpoint(path), path)
                return net.eval()
            except UserError as e:
                print(f"note: retraining the toy classifier: {e}", file=sys.stderr)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in tqdm(range(epochs), desc="toy classifier (first use, cached)", unit="epoch"):
            for x, y in DataLoader(train_set, batch_size=128, shuffle=True):
                loss = F.cross_entropy(net(x)[0], y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write(path, lambda f: torch.save(net.state_dict(), f))
    return net.eval()


@torch.no_grad()
def toy_metrics(net, images, labels, hierarchy, real_features, pairs=200, seed=0):
    """Subclass, superclass and tint accuracy (the species among the two of its true genus: what a genus guide
    should sharpen), classifier-feature FID and LPIPS-style diversity of images in [-1, 1]."""
    logits, features = net(images)
    pred, sc = logits.argmax(1), torch.as_tensor(nodes_at(hierarchy, "superclass")[1])
    genus = torch.as_tensor(nodes_at(hierarchy, "genus")[1])
    in_genus = logits.masked_fill(genus[None, :] != genus[labels][:, None], -math.inf).argmax(1)   # (N,)
    a, b = sample_pairs(labels.numpy(), pairs, np.random.default_rng(seed))
    unit = lambda m: m / (m.norm(dim=1, keepdim=True) + 1e-10)
    diversity = sum(((unit(p) - unit(q)) ** 2).sum(1).mean(dim=(1, 2))
                    for p, q in zip(net.feature_maps(images[a]), net.feature_maps(images[b])))
    return dict(sub_acc=(pred == labels).float().mean().item(), super_acc=(sc[pred] == sc[labels]).float().mean().item(),
                tint_acc=(in_genus == labels).float().mean().item(),
                fid=frechet_distance(*feature_stats(features.numpy()), *feature_stats(real_features)),
                diversity=diversity.mean().item())


def toy_images(dataset):
    """All images (N, 3, H, W) in [-1, 1] and labels (N,) of a toy dataset."""
    return torch.stack([dataset[i][0] for i in range(len(dataset))]), torch.as_tensor(dataset.targets)


def toy_reference(name, size, args):
    """A toy set's classifier, the features of its real val images (the FID reference) and a row for held-out real
    test images: the best a sampler could score."""
    real = toy_dataset(name, size, "val", flip=False, seed=args.seed)
    net = toy_classifier(size, args.cache_dir, args.classifier_epochs, toy_set=name)
    with torch.no_grad():
        real_features = net(toy_images(real)[0])[1].numpy()
    held_out = toy_dataset(name, size, "test", flip=False, seed=args.seed, images_per_class=args.per_class)
    row = dict(ckpt=f"real {name} images (test)", method="-", guidance="-", cfg_scale=None, step=None,
               train_time_s=None, **toy_metrics(net, *toy_images(held_out), real.hierarchy(), real_features,
                                                 args.pairs, args.seed))
    return net, real, real_features, row


def add_toy_args(p):
    """The flags of `evaluate.py toy`."""
    p.add_argument("--ckpt", nargs="+", required=True, help="toy checkpoints or run folders (e.g. one per method)")
    p.add_argument("--guidance", nargs="+", choices=["none", "null", "superclass", "genus"],
                   default=["none", "null", "superclass"], help="guides, each where the table has its rows")
    p.add_argument("--per-class", type=positive_int, default=16, help="samples of each class")
    add_sampler_args(p, steps=50)
    p.add_argument("--cfg-scales", nargs="+", type=finite_float, help="a guidance sweep: every guide at each of "
                   "these scales (e.g. 1 1.5 2 3 4 6), instead of --cfg-scale alone")
    p.add_argument("--pairs", type=positive_int, default=500, help="same-class pairs for the diversity")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the real reference images (and default noise)")
    p.add_argument("--seeds", type=nonnegative_int, nargs="+", help="noise seeds, one row each in the JSON, "
                   "mean±half the range in the table (default: --seed)")
    p.add_argument("--cache-dir", type=folder_path, default="results", help="where the toy classifier is cached")
    p.add_argument("--classifier-epochs", type=positive_int, default=4, help="training of the toy classifier, on first use")
    p.add_argument("--out-json", type=out_file)
    p.add_argument("--out-csv", type=out_file)
    p.add_argument("--plot", type=out_file, help="PNG: FID (cls) against subclass accuracy, a curve per checkpoint and "
                   "guide over the scales (and PLOT.csv beside it)")


def score_toy(args):
    """`evaluate.py toy`: each checkpoint sampled at every guide its table has rows for (w = 1 is the unguided sampler
    whatever the guide, eq. 1: sampled once) and each seed, scored by its toy set's classifier -> the table's rows."""
    sampler = sampler_of(args)                             # a bad --steps or interval fails before any work
    rows, references = [], {}
    for ckpt in args.ckpt:
        model, info, _ = load_for_sampling(ckpt)
        path, size, name = info["path"], info["config"]["image_size"], toy_set_of(model.hierarchy)
        if not info["config"]["pixel_space"] or name is None:
            raise UserError(f"{path} is not a toy checkpoint (train one with --data toy or toy-base)")
        if (name, size) not in references:
            references[name, size] = toy_reference(name, size, args)
            rows.append(references[name, size][3])
        net, real, real_features, _ = references[name, size]
        y = torch.arange(real.num_classes).repeat_interleave(args.per_class)
        settings = [(g, w) for g in args.guidance if g == "none" or has_guide_rows(model, g)
                    for w in ([None] if g == "none" else args.cfg_scales or [args.cfg_scale])]
        done = {}
        for (guidance, scale), seed in tqdm([(g, seed) for g in settings for seed in args.seeds or [args.seed]],
                                            desc=f"sampling {checkpoint_label(path)}", unit="setting"):
            key = ("none", 1.0, seed) if guidance == "none" or scale == 1.0 else (guidance, scale, seed)
            if key not in done:
                images = sample_images(model, y, guide_labels(model, y, *key[:2]), key[1], sampler, seed=seed,
                                       progress=False)
                x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0   # (N, 3, H, W) in [-1, 1]
                done[key] = toy_metrics(net, x, y, real.hierarchy(), real_features, args.pairs, seed)
            rows.append(dict(ckpt=checkpoint_label(path), method=info["config"].get("method", "?"), guidance=guidance,
                             cfg_scale=scale, step=info.get("step"), train_time_s=info["time_s"], seed=seed,
                             **sampler.record(), **done[key]))
    return rows, sampler


TOY_COLUMNS = [("sub_acc", "sub acc↑", 9, ".3f"), ("super_acc", "super acc↑", 11, ".3f"), ("tint_acc", "tint acc↑", 10, ".3f"),
               ("fid", "FID(cls)↓", 10, ".2f"), ("diversity", "diversity↑", 11, ".3f")]   # key, header, width, format


def print_toy_table(rows):
    """A line per checkpoint, guidance and scale: its metrics, over several seeds `mean±half the range` (two seeds:
    exactly the two values), so the seed-to-seed noise stands beside every figure."""
    groups = {}
    for r in rows:
        groups.setdefault((r["ckpt"], r["method"], r["guidance"], r["cfg_scale"]), []).append(r)
    wider = 7 if any(len(g) > 1 for g in groups.values()) else 0
    headers = "".join(f"{header:>{width + wider}}" for _, header, width, _ in TOY_COLUMNS)
    print(f"{'checkpoint':<36}{'method':<15}{'guidance':<12}{'w':>5}{headers}{'train s':>9}")
    for (ckpt, method, guidance, scale), group in groups.items():
        cells = ""
        for key, _, width, fmt in TOY_COLUMNS:
            values = [r[key] for r in group]
            cell = f"{sum(values) / len(values):{fmt}}" + (f"±{(max(values) - min(values)) / 2:{fmt}}"
                                                          if len(values) > 1 else "")
            cells += f"{cell:>{width + wider}}"
        train_s = group[0]["train_time_s"]
        print(f"{ckpt[:35]:<36}{method:<15}{guidance:<12}{'-' if scale is None else format(scale, 'g'):>5}{cells}"
              f"{'-' if train_s is None else format(train_s, '.0f'):>9}")

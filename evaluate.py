"""Evaluation for FineDiffusion: FID (overall and per superclass) and LPIPS diversity (paper §4.3, Table 1),
sample generation at scale, and the paper's tables in miniature on the built-in toy data.

    # Table 1: reference statistics of the real validation images, per superclass (iNat21 under data/inat21/)
    python evaluate.py stats --data inat21 --split val --out results/inat21_val.npz
    # samples spread over the 10,000 classes (eq. 1, w = 4, 250 DDPM steps) on 8 GPUs, then FID and LPIPS
    torchrun --nproc_per_node=8 evaluate.py generate --ckpt pretrained/FineDiffusion-iNat.pt --num-samples 100000 \
        --out samples/finediffusion --fid results/inat21_val.npz --out-csv results/table1.csv
    # or score generated images (a generate folder, or an .npz with arr_0 [N,H,W,3] uint8) later
    python evaluate.py fid --real results/inat21_val.npz --fake samples/finediffusion --out-csv results/table1.csv
    # offline, on the toy: subclass/superclass accuracy, classifier FID and diversity of each checkpoint
    python evaluate.py toy --ckpt results/toy-finediffusion results/toy-full
    # ... at several guidance scales, with the trade-off plot (FID (cls) against subclass accuracy)
    python evaluate.py toy --ckpt results/toy-finediffusion results/toy-full --cfg-scales 1 1.5 2 3 4 6 --plot sweep.png
    # the paper's figures: Fig. 7 (t-SNE of the label tables), Fig. 5 (one seed across methods), Fig. 2 and losses
    python evaluate.py embeddings --ckpt results/toy-finediffusion results/toy-full --out fig7.png
    python evaluate.py grid --ckpt results/toy-finediffusion results/toy-full --class-ids 0 5 9 13 --data toy --out fig5.png
    python evaluate.py curves --runs results/toy-finediffusion results/toy-full --toy-json toy.json --out curves.png

The two numbers of Table 1:
  - FID (Heusel et al. 2017), lower is better: the Frechet distance between Gaussians fitted to the 2048-d
    Inception-v3 pool features of real and of generated images, overall and within each superclass.
  - LPIPS (Zhang et al. 2018, v0.1, AlexNet), higher is better: the mean perceptual distance between two
    generated images of the same class, i.e. how diverse the samples of one class are.
FID numbers are only comparable when every detail of the feature extractor matches the reference, so this file
carries its own port of the TF 2015-12-05 Inception graph that pytorch-fid uses (same layers, same TF pooling
quirks, the published weights pt_inception-2015-12-05-6726825d.pth) and pytorch-fid's Frechet distance. Weight
files are looked up as given, under pretrained/, then $TORCH_HOME/hub/checkpoints/; nothing is downloaded.

Read in this order: the metric (Inception, Frechet distance, LPIPS, Table 1's rows); image sources and
statistics files; the stats/fid commands; generation at scale; the toy tables; the figures (drawn with Pillow,
each FIGURE.png with its numbers beside it in FIGURE.csv / .json).
"""
import json
import math
import os
import re
import sys
import warnings
import zipfile

import numpy as np
import scipy
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from scipy import linalg
from torch.utils.data import DataLoader, Dataset
from torchvision.models import alexnet
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE
from tqdm import tqdm

import data
from cli import (ArgumentParser, UserError, device, finite_float, folder, nonnegative_int, out_file, positive_int,
                 run_cli)
from files import atomic_write, file_sha256, find_file, remove_stale_temp_files, write_csv, write_json
from hierarchy import inat21_hierarchy, read_hierarchy
from model import (METHODS, TABLE, build_model, checkpoint_tensors, load_strict, published_layout, read_checkpoint,
                   resolve_checkpoint)
from sample import (CFG_SCALE, add_sampler_args, guide_labels, load_for_sampling, resolve_class, sample_images,
                    sampler_of)

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"
LPIPS_LIN_WEIGHTS = "alex.pth"


def find_weights(path, filename):
    """A published weights file: `path` (or its file name) as given, under pretrained/, or in torch's cache."""
    torch_home = os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch"))
    return find_file(path or filename, also=[os.path.join(torch_home, "hub", "checkpoints", filename)],
                     published=filename)


# -------------------------------------------------------------------------------------------------------------
# FID Inception-v3: port of the TF 2015-12-05 graph (the one behind every published FID)
# -------------------------------------------------------------------------------------------------------------
# The TF graph differs from torchvision's Inception3 in its pool branches: TF's 'SAME' average pooling divides
# by the number of real pixels under the window (count_include_pad=False), and the last block max-pools.
# Feature statistics, hence FID, move measurably if these are not reproduced. Convolutions, their BatchNorm
# (eps 0.001) and the parameter names are torchvision's, so we build on its block classes.

def tf_avg_pool(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    """Mixed_5b/5c/5d: 1x1 | 5x5 | double 3x3 | TF avg pool + 1x1."""

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], dim=1)


class FIDInceptionC(InceptionC):
    """Mixed_6b-6e: 1x1 | factorised 7x7 | double factorised 7x7 | TF avg pool + 1x1."""

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(branch7x7dbl))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], dim=1)


class FIDInceptionE(InceptionE):
    """Mixed_7b (TF avg pool) and Mixed_7c (max pool: a quirk of the TF graph): 1x1 | split 3x3 | split
    double 3x3 | pool + 1x1."""

    def __init__(self, in_channels, pool):
        super().__init__(in_channels)
        assert pool in ("avg", "max")
        self.pool = pool

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1)
        if self.pool == "avg":
            pooled = tf_avg_pool(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], dim=1)


class FIDInceptionV3(nn.Module):
    """Images in [0, 1], N x 3 x H x W of any size -> 2048-d pool_3 features (N x 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        # The published graph classifies into 1008 classes. FID never uses the logits, but the weights file
        # carries them, and keeping the layer lets it load strictly, as published.
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):  # x: [N, 3, H, W] in [0, 1]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape [N, 3, H, W], got {list(x.shape)}")
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # [N, 3, 299, 299]
        x = 2 * x - 1  # the TF graph expects [-1, 1]
        x = self.Conv2d_1a_3x3(x)  # [N, 32, 149, 149]
        x = self.Conv2d_2a_3x3(x)  # [N, 32, 147, 147]
        x = self.Conv2d_2b_3x3(x)  # [N, 64, 147, 147]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [N, 64, 73, 73]
        x = self.Conv2d_3b_1x1(x)  # [N, 80, 73, 73]
        x = self.Conv2d_4a_3x3(x)  # [N, 192, 71, 71]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [N, 192, 35, 35]
        x = self.Mixed_5b(x)  # [N, 256, 35, 35]
        x = self.Mixed_5c(x)  # [N, 288, 35, 35]
        x = self.Mixed_5d(x)  # [N, 288, 35, 35]
        x = self.Mixed_6a(x)  # [N, 768, 17, 17]
        x = self.Mixed_6b(x)  # [N, 768, 17, 17]
        x = self.Mixed_6c(x)  # [N, 768, 17, 17]
        x = self.Mixed_6d(x)  # [N, 768, 17, 17]
        x = self.Mixed_6e(x)  # [N, 768, 17, 17]
        x = self.Mixed_7a(x)  # [N, 1280, 8, 8]
        x = self.Mixed_7b(x)  # [N, 2048, 8, 8]
        x = self.Mixed_7c(x)  # [N, 2048, 8, 8]
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # [N, 2048]


def load_inception(path=None):
    """The FID Inception with the published weights `pt_inception-2015-12-05-6726825d.pth`, in eval mode."""
    path = find_weights(path, FID_WEIGHTS)
    state = read_checkpoint(path)
    model = FIDInceptionV3()
    # BatchNorm's step counter is irrelevant in eval; state dicts from older torch versions lack it.
    for key, buffer in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = buffer
    load_strict(model, state, path)
    return model.eval().requires_grad_(False)


class _no_tf32:
    """fp32 means fp32: on Ampere+ GPUs cuDNN would otherwise run the convolutions in TF32 and shift FID."""

    def __enter__(self):
        self.saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def unit_images(images):
    """uint8 images, or floats already in [0, 1] -> float images in [0, 1]."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


@torch.inference_mode()
def inception_features(model, images, device="cpu", batch_size=50, progress=True):
    """Features [N, 2048] (np.float32) of every image: `images` is one tensor [N, 3, H, W] or an iterable of
    batches (a DataLoader of (images, labels)), uint8 or floats in [0, 1]."""
    if isinstance(images, torch.Tensor):
        images = images.split(batch_size)
    model = model.to(device).eval()
    features = []
    with _no_tf32():
        for batch in tqdm(images, desc="inception features", unit="batch", disable=not progress):
            x = unit_images(batch[0] if isinstance(batch, (tuple, list)) else batch)   # [B, 3, H, W] in [0, 1]
            features.append(model(x.to(device, non_blocking=True)).float().cpu())    # [B, 2048]
    if not features:
        raise UserError("no images to extract features from")
    return torch.cat(features).numpy()  # [N, 2048]


# -------------------------------------------------------------------------------------------------------------
# Frechet distance between two Gaussians (pytorch-fid's computation, float64)
# -------------------------------------------------------------------------------------------------------------

def feature_stats(features):
    """Mean [D] and covariance [D, D] (unbiased, as np.cov) of features [N, D], in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise UserError(f"need at least 2 feature vectors for a covariance, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


_SCIPY_VERSION = tuple(int(v) for v in re.findall(r"\d+", scipy.__version__)[:2])


def _sqrtm(a):
    # pytorch-fid calls sqrtm(disp=False); SciPy 1.16 deprecates `disp` (removed in 1.18) without changing
    # the square root itself, so pass it only where it exists and means "stay quiet".
    if _SCIPY_VERSION < (1, 16):
        return linalg.sqrtm(a, disp=False)[0]
    return linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), as pytorch-fid computes it."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise UserError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                        f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        # a singular product (fewer samples than dimensions): nudge both covariances off singularity
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        # tiny imaginary parts are round-off; large ones mean the statistics are broken
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise UserError(f"sqrt(sigma1 sigma2) has an imaginary component of {np.max(np.abs(covmean.imag)):g}; "
                            "the covariance estimates are unusable (too few images?)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# -------------------------------------------------------------------------------------------------------------
# LPIPS v0.1 (AlexNet): perceptual distance, used as a diversity score of same-class samples
# -------------------------------------------------------------------------------------------------------------

class LPIPS(nn.Module):
    """LPIPS v0.1, AlexNet variant: images in [0, 1] -> one distance per image pair, shape [N]."""

    taps = (1, 4, 7, 9, 11)  # indices of the ReLUs in alexnet().features whose outputs are compared
    channels = (64, 192, 384, 256, 256)

    def __init__(self):
        super().__init__()
        self.features = alexnet().features  # key names as in the published alexnet-owt-7be5be79.pth
        # one learned 1x1 conv (no bias) per layer weighs the channels of the squared feature difference
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in self.channels)
        # the ImageNet input normalisation of the lpips release, expressed for inputs in [-1, 1]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, alexnet_path=None, lin_path=None):
        """LPIPS with the published AlexNet trunk (alexnet-owt-7be5be79.pth; its classifier is not used) and the
        v0.1 linear heads (alex.pth, tensors lin{i}.model.1.weight: index 1 follows a Dropout, a no-op here)."""
        model = cls()
        alexnet_path = find_weights(alexnet_path, ALEXNET_WEIGHTS)
        trunk = {}
        for key, value in read_checkpoint(alexnet_path).items():
            if not key.startswith(("features.", "classifier.")):
                raise UserError(f"{alexnet_path}: unexpected tensor '{key}'")
            if key.startswith("features."):
                trunk[key[len("features."):]] = value
        load_strict(model.features, trunk, alexnet_path)
        lin_path = find_weights(lin_path, LPIPS_LIN_WEIGHTS)
        heads = {}
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

    def layer_features(self, x):  # x: [N, 3, H, W] in [-1, 1]
        h = (x - self.shift) / self.scale
        feats = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                feats.append(h)  # [N, 64|192|384|256|256, h_i, w_i]
            if i == self.taps[-1]:
                break  # the final max pool is not used
        return feats

    def forward(self, x, y):  # x, y: [N, 3, H, W] in [0, 1]
        feats = self.layer_features(torch.cat([x, y]) * 2 - 1)  # both images in one pass: [2N, C, h, w] each
        distance = 0
        for f, lin in zip(feats, self.lins):
            # unit-normalise each spatial feature vector over channels, so layers compare directions
            f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            fx, fy = f.chunk(2)  # [N, C, h, w] each
            distance = distance + lin((fx - fy) ** 2).mean(dim=(1, 2, 3))  # [N]
        return distance  # [N]


def sample_pairs(labels, num_pairs, rng):
    """Index pairs (a, b), a != b, of images of the same class. num_pairs=None: every such pair once."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")  # image indices grouped by class
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    keep = (classes >= 0) & (counts >= 2)  # unlabelled images and single-image classes form no pair
    classes, starts, counts = classes[keep], starts[keep], counts[keep]
    if len(classes) == 0:
        raise UserError("LPIPS diversity needs at least two generated images of one class")
    if num_pairs is None:
        pairs = [(order[s + i], order[s + j])
                 for s, n in zip(starts, counts) for i in range(n) for j in range(i + 1, n)]
        a, b = np.array(pairs).T  # [P] each
        return a, b
    # anchor uniform over the images that have a partner, partner uniform over the rest of its class
    class_of_slot = np.repeat(np.arange(len(classes)), counts)  # class index of each grouped slot
    slot_in_class = np.concatenate([np.arange(n) for n in counts])
    eligible = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, counts)])  # grouped slots
    slots = rng.choice(eligible, size=num_pairs)
    k = np.searchsorted(eligible, slots)
    cls, rank = class_of_slot[k], slot_in_class[k]
    other = rng.integers(0, counts[cls] - 1)  # among the n-1 other images of the class
    other = other + (other >= rank)
    return order[slots], order[starts[cls] + other]


class _Pairs(Dataset):
    """Item i -> (image a_i, image b_i), so pairs are decoded in DataLoader workers."""

    def __init__(self, images, a, b):
        self.images, self.a, self.b = images, a, b

    def __len__(self):
        return len(self.a)

    def __getitem__(self, i):
        return _image_of(self.images[self.a[i]]), _image_of(self.images[self.b[i]])


def _image_of(item):
    return item[0] if isinstance(item, (tuple, list)) else item  # (image, label) from an ImageSource


def _group_means(values, groups):
    """({group: mean of the values in it}, {group: count}) for integer group ids."""
    ids, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=values)
    return {int(g): float(v) for g, v in zip(ids, sums / counts)}, {int(g): int(n) for g, n in zip(ids, counts)}


@torch.inference_mode()
def lpips_diversity(lpips, images, labels, num_pairs=1000, seed=0, superclass_of=None, batch_size=32,
                    device="cpu", workers=0, progress=False):
    """Mean LPIPS between random pairs of distinct generated images of the same class (higher = more diverse).

    images: indexable, images[i] -> [3, H, W] (uint8 or [0, 1] float) or a tuple starting with it.
    labels: class id per image (-1: unlabelled). superclass_of: class id -> superclass id (optional).
    Returns {"overall", "pairs", "per_class": {c: mean}, "per_superclass": {s: mean}, "pairs_per_superclass"}.
    """
    labels = np.asarray(labels, dtype=np.int64)
    a, b = sample_pairs(labels, num_pairs, np.random.default_rng(seed))
    loader = DataLoader(_Pairs(images, a, b), batch_size=batch_size, num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda")
    lpips = lpips.to(device).eval()
    distances = []
    for x, y in tqdm(loader, desc="lpips pairs", unit="batch", disable=not progress):
        x, y = unit_images(x).to(device), unit_images(y).to(device)  # [B, 3, H, W] each
        distances.append(lpips(x, y).float().cpu())
    d = torch.cat(distances).double().numpy()  # [P]
    pair_class = labels[a]  # [P]
    per_class, _ = _group_means(d, pair_class)
    result = {"overall": float(d.mean()), "pairs": len(d), "per_class": per_class, "per_superclass": {},
              "pairs_per_superclass": {}}
    if superclass_of is not None:
        pair_super = np.asarray(superclass_of)[pair_class]  # [P]
        result["per_superclass"], result["pairs_per_superclass"] = _group_means(d, pair_super)
    return result


# -------------------------------------------------------------------------------------------------------------
# Table 1: statistics per superclass, and its rows
# -------------------------------------------------------------------------------------------------------------
# A statistics .npz holds mu, sigma, count of all images and, when the images carry a hierarchy, that
# hierarchy (as JSON) and mu_<s>, sigma_<s>, count_<s> for each superclass index s of it.

def image_stats(features, labels=None, hierarchy=None):
    """Feature statistics of all images and of each superclass (when the images' classes and hierarchy are known)."""
    mu, sigma = feature_stats(features)
    stats = {"mu": mu, "sigma": sigma, "count": np.int64(len(features))}
    if hierarchy is None or labels is None or not (np.asarray(labels) >= 0).any():
        return stats
    stats["hierarchy"] = np.array(json.dumps(hierarchy))
    superclasses = superclasses_of(labels, hierarchy)
    for s in range(len(hierarchy["superclass_names"])):
        group = features[superclasses == s]
        stats[f"count_{s}"] = np.int64(len(group))
        if len(group) >= 2:  # a covariance needs two images
            stats[f"mu_{s}"], stats[f"sigma_{s}"] = feature_stats(group)
    return stats


def superclasses_of(labels, hierarchy):
    """The superclass id of each image (-1 for an unlabelled one)."""
    labels = np.asarray(labels, np.int64)
    superclass_of = np.append(np.asarray(hierarchy["superclass_of"], np.int64), -1)   # index -1: unlabelled
    return superclass_of[labels]


def stats_hierarchy(stats, source="the statistics"):
    """The hierarchy a statistics file carries (as JSON), checked; None when it carries none."""
    if "hierarchy" not in stats:
        return None
    try:
        return read_hierarchy(json.loads(str(stats["hierarchy"])), source)
    except ValueError as e:
        raise UserError(f"{source}: its hierarchy is not JSON ({e})") from None


def fid_table(real, fake, lpips=None, overall_only=False):
    """Rows like paper Table 1: one per superclass of the generated images, then Overall.

    real, fake: statistics dicts. Superclasses are matched by name, never by position. lpips: lpips_diversity's
    result (per_superclass keyed by the generated images' superclass index) or None.
    Returns [{"superclass", "fid", "lpips", "count_real", "count_fake"}].
    """
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
        for s in present:
            if fake_names[s] not in real_names:
                raise UserError(f"superclass '{fake_names[s]}' of the generated images has no reference statistics")
        for r, name in enumerate(real_names):                  # rows in the reference's (the paper's) order
            s = fake_names.index(name) if name in fake_names else None
            if s not in present:
                continue
            fid = math.nan
            if f"mu_{r}" in real and f"mu_{s}" in fake:
                fid = frechet_distance(real[f"mu_{r}"], real[f"sigma_{r}"], fake[f"mu_{s}"], fake[f"sigma_{s}"])
            rows.append({"superclass": name, "fid": fid,
                         "lpips": lpips["per_superclass"].get(s, math.nan) if lpips else math.nan,
                         "count_real": int(real.get(f"count_{r}", 0)), "count_fake": int(fake[f"count_{s}"])})
    rows.append({"superclass": "Overall",
                 "fid": frechet_distance(real["mu"], real["sigma"], fake["mu"], fake["sigma"]),
                 "lpips": lpips["overall"] if lpips else math.nan,
                 "count_real": None if foreign else int(real["count"]), "count_fake": int(fake["count"])})
    return rows


def format_table(rows):
    def num(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
    count = lambda v: "-" if v is None else v
    width = max(12, *(len(r["superclass"]) for r in rows))
    lines = [f"{'':<{width}}  {'FID↓':>9}  {'LPIPS↑':>7}  {'n real':>7}  {'n fake':>7}"]
    for r in rows:
        lines.append(f"{r['superclass']:<{width}}  {num(r['fid']):>9}  {num(r['lpips']):>7}  "
                     f"{count(r['count_real']):>7}  {count(r['count_fake']):>7}")
    return "\n".join(lines)


def write_rows(rows, csv_path=None, json_path=None, **meta):
    """Table 1 as CSV and/or JSON (NaN: an empty cell / null)."""
    clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
    if csv_path:
        write_csv(csv_path, clean)
    if json_path:
        write_json(json_path, {**meta, "rows": clean}, indent=2)


# -------------------------------------------------------------------------------------------------------------
# Image sources: what to score, with the classes and hierarchy known of it
# -------------------------------------------------------------------------------------------------------------

class ImageSource(Dataset):
    """Images to score. item i -> (uint8 [3, H, W], class id or -1), or None for a real image left out (its file
    cannot be read; _collate drops it, its label with it); `labels` [N]; `hierarchy` or None.

    `read(i)` gives image i as uint8 [H, W, 3] (or None): a file (a generate folder's, or an unlabelled folder's,
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
        image = self.read(i)  # [H, W, 3]
        if image is None:
            return None
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), int(self.labels[i])


def read_png(path, image_size=0):
    image = data.read_rgb(path)  # any format and Pillow mode; a file it cannot read is a UserError naming it
    return np.array(data.center_crop_arr(image, image_size) if image_size else image)  # [H, W, 3]


def dataset_images(dataset, name):
    """Real images of a data.py dataset (no flips), as uint8 with its labels and hierarchy. Each is the item itself
    (data.exact_item), so labels[i] is its class; a file that cannot be read is left out, with a warning."""
    def read(i):
        item = data.exact_item(dataset, i)  # ([3, H, W] in [-1, 1], class id) or None
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


def _collate(batch):
    """ImageSource items -> ([B, 3, H, W] uint8, [B] labels), less the images left out (None); B may be 0."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return torch.zeros(0, 3, 0, 0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)  # [0, 3, 0, 0], [0]
    images, labels = zip(*batch)
    if len({tuple(x.shape) for x in images}) > 1:
        raise UserError("images differ in size; pass --image-size to centre-crop and resize them")
    return torch.stack(images), torch.tensor(labels)


def compute_stats(source, model, device="cpu", batch_size=50, workers=0, progress=True):
    """Feature statistics of an ImageSource (overall and per superclass), each image counted under the label it
    came with: an image left out takes its label with it."""
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
                        pin_memory=torch.device(device).type == "cuda")
    labels = []  # [B] per batch, in step with the features of its images

    def images():
        for x, y in tqdm(loader, desc="inception features", unit="batch", disable=not progress):
            if len(y):
                labels.append(y)
                yield x, y  # [B, 3, H, W], [B]

    features = inception_features(model, images(), device, progress=False)  # [N, 2048], source order
    return image_stats(features, torch.cat(labels).numpy(), source.hierarchy)


# -------------------------------------------------------------------------------------------------------------
# stats and fid
# -------------------------------------------------------------------------------------------------------------

def source_of(args, path):
    """Images from --data (a dataset, real images) or a path (a generate folder, an .npz, a folder)."""
    hierarchy = load_hierarchy(args.hierarchy) if args.hierarchy else None
    if path is None:
        root = args.data_path or (None if args.data in data.TOY_SETS else os.path.join("data", args.data))
        size = args.image_size or (32 if args.data in data.TOY_SETS else 256)
        dataset = data.build_dataset(args.data, root, size, args.split or "val", flip=False,
                                     hierarchy_csv=args.hierarchy_csv)
        return dataset_images(dataset, root or args.data)
    return open_images(path, args.image_size or 0, hierarchy)


def stats_of(args, path, cache):
    """Statistics of a statistics .npz as it is, else of the images (`cache` keeps the Inception loaded), and
    the image source (None for a statistics file)."""
    if path is not None and not os.path.isdir(path):
        arrays = read_npz(path)
        if "mu" in arrays and "sigma" in arrays:
            return statistics_file(arrays, path), None
    source = source_of(args, path)
    if source.hierarchy is None and (source.labels >= 0).any():
        print(f"note: {source.name} has class labels but no hierarchy (--hierarchy): overall statistics only",
              file=sys.stderr)
    if "inception" not in cache:
        cache["inception"] = load_inception(args.inception)
    print(f"{source.name}: {len(source)} images", file=sys.stderr)
    return compute_stats(source, cache["inception"], args.device, args.batch_size, args.workers), source


def cmd_stats(args):
    if (args.images is None) == (args.data is None):
        raise UserError("give the images to describe: --data NAME (a dataset) or --images PATH")
    stats, _ = stats_of(args, args.images, {})
    atomic_write(args.out, lambda f: np.savez(f, **stats))
    h = stats_hierarchy(stats)
    detail = f", {len(h['superclass_names'])} superclasses" if h else " (no hierarchy: overall only)"
    print(f"wrote {args.out}: {int(stats['count'])} images{detail}")


def lpips_for(source, args):
    """LPIPS diversity of the generated images, or None (with a note) when it cannot or should not be run."""
    if args.pairs <= 0:
        return None
    if source is None or not (source.labels >= 0).any():
        print("note: LPIPS skipped: it needs generated images with their classes", file=sys.stderr)
        return None
    if not (np.bincount(source.labels[source.labels >= 0]) >= 2).any():   # a metric that cannot be computed
        print("note: LPIPS skipped (its column is left empty): it needs at least two generated images of one class",
              file=sys.stderr)
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


def cmd_fid(args):
    cache = {}
    real, _ = stats_of(args, args.real, cache)
    fake, fake_source = stats_of(args, args.fake, cache)
    lpips = lpips_for(fake_source, args)
    rows = fid_table(real, fake, lpips, args.overall_only)
    print(format_table(rows))
    write_rows(rows, args.out_csv, args.out_json, real=args.real, fake=args.fake,
               lpips_pairs=lpips["pairs"] if lpips else 0, seed=args.seed)


# -------------------------------------------------------------------------------------------------------------
# generate: samples for FID, spread over the classes, over any number of processes (torchrun), resumable
# -------------------------------------------------------------------------------------------------------------
# The work is cut into fixed batches of (class, index) jobs; batch j is drawn by rank j % world with seed
# `seed + j`, so the images do not depend on the number of GPUs, and an interrupted run resumes batch-wise.
# Images land as OUT/<class id>/<index>.png; OUT/samples.json records what made them (checkpoint sha256,
# guidance, sampler, ...), the hierarchy and every image's class. A rerun resumes only what the same settings
# made: otherwise it stops, or with --overwrite starts over.

MANIFEST = "samples.json"


def generation_jobs(num_classes, num_samples=None, per_class=None):
    """[(class id, index within class)]: `per_class` each, or `num_samples` spread evenly: round-robin, or, with
    fewer samples than classes, every (K / N)-th class, so that each superclass range of iNat21 gets its share."""
    if per_class is not None:
        return [(c, i) for c in range(num_classes) for i in range(per_class)]
    if num_samples < num_classes:
        return [(n * num_classes // num_samples, 0) for n in range(num_samples)]
    return [(n % num_classes, n // num_classes) for n in range(num_samples)]


def job_file(class_id, index):
    return os.path.join(f"{class_id:05d}", f"{index:06d}.png")


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


def start_folder(out, manifest, overwrite):
    """Write OUT/samples.json, or check that the one there is of the same settings (then the run resumes);
    else refuse, or with `overwrite` delete the other settings' images and start over."""
    remove_stale_temp_files(out)                          # images a killed run was writing
    old = read_manifest(out)
    same = old is not None and (old["made_by"], old["images"]) == (manifest["made_by"], manifest["images"])
    if old is not None and not same and not overwrite:
        changed = ", ".join(f"{k} {old['made_by'].get(k)!r} -> {v!r}" for k, v in manifest["made_by"].items()
                            if old["made_by"].get(k) != v)
        raise UserError(f"{out} holds samples made with other settings ({changed}): choose another --out, or pass "
                        "--overwrite to start over")
    if old is not None and not same:
        for name, _ in old["images"]:
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    write_json(os.path.join(out, MANIFEST), manifest, indent=None)


def cmd_generate(args):
    if (args.num_samples is None) == (args.per_class is None):
        raise UserError("give exactly one of --num-samples and --per-class")
    sampler = sampler_of(args)                             # a bad --steps or interval fails before any work
    rank, world, device = data.init_distributed(args.device)
    model, info, vae = load_for_sampling(args.ckpt, args.base, args.vae)
    guide_labels(model, torch.zeros(1, dtype=torch.long), args.guidance, args.cfg_scale)  # has the table the rows?
    jobs = generation_jobs(model.y_embedder.num_classes, args.num_samples, args.per_class)
    # What the images depend on, read from what makes them (the checkpoint file read and the VAE by content, not
    # by path; the sampler built): a rerun resumes only these.
    made_by = dict(ckpt_sha256=file_sha256(info["path"]), vae_sha256=vae.identity()["sha256"] if vae else None,
                   guidance=args.guidance, cfg_scale=args.cfg_scale, **sampler.record(), seed=args.seed,
                   batch_size=args.batch_size, precision=args.precision, image_size=info["config"]["image_size"])
    manifest = dict(made_by=made_by, ckpt=os.path.abspath(info["path"]), hierarchy=model.hierarchy,
                    images=[[job_file(c, i), c] for c, i in jobs])
    data.on_rank0(lambda: start_folder(args.out, manifest, args.overwrite))   # the others wait for it
    batches = [jobs[i:i + args.batch_size] for i in range(0, len(jobs), args.batch_size)]
    mine = [j for j in range(rank, len(batches), world)
            if not all(os.path.isfile(os.path.join(args.out, job_file(c, i))) for c, i in batches[j])]
    if rank == 0:
        print(f"{len(jobs)} images in {len(batches)} batches over {world} process(es); rank 0 has {len(mine)} to do",
              file=sys.stderr)
    for j in tqdm(mine, desc=f"generate (rank {rank})", disable=rank != 0):
        classes = torch.tensor([c for c, _ in batches[j]])
        images = sample_images(model, classes, guide_labels(model, classes, args.guidance, args.cfg_scale),
                               args.cfg_scale, sampler, vae, args.seed + j, device, args.precision,
                               progress=False)   # (B, H, W, 3) uint8
        for (c, i), image in zip(batches[j], images.numpy()):
            atomic_write(os.path.join(args.out, job_file(c, i)), lambda f: Image.fromarray(image).save(f, format="PNG"))
    if world > 1:
        dist.barrier()
    if rank == 0 and args.npz:
        source = open_images(args.out)
        arrays = np.stack([source.read(i) for i in range(len(source))])
        atomic_write(args.npz, lambda f: np.savez(f, arr_0=arrays, labels=source.labels,
                                                  hierarchy=np.array(json.dumps(source.hierarchy))))
        print(f"wrote {args.npz}: {len(arrays)} images", file=sys.stderr)
    if rank == 0 and args.fid:
        args.real, args.fake, args.hierarchy, args.image_size = args.fid, args.out, None, None
        cmd_fid(args)


# -------------------------------------------------------------------------------------------------------------
# toy: paper Tables 1-2 in miniature, offline, on the built-in toy data
# -------------------------------------------------------------------------------------------------------------
# A small CNN classifier trained on real toy images (cached) stands in for the Inception network: it
# says whether a sample shows the requested subclass and superclass, gives features for a Frechet distance,
# and (unit-normalised feature maps, LPIPS-style) a distance between two samples of the same class. Each
# checkpoint is scored by the classifier of its own toy set (toy or toy-base, recognised by its classes).
# --cfg-scales sweeps the guidance scale w: at w = 1, eq. 1 is eps(x_t | c) whatever the guide, so every guide's
# curve starts at the unguided (`none`) point.

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
    """The classifier for images of a toy set (data.TOY_SETS) at `image_size`, trained once (a few CPU seconds)
    on 256 real images per class -- more than the toy set's 50: it plays Inception, not a fine-tuned model -- and
    cached."""
    path = os.path.join(cache_dir, f"{toy_set.replace('-', '_')}_classifier_{image_size}px.pt")
    train_set = data.toy_dataset(toy_set, image_size, "train", seed=seed, images_per_class=256)
    with torch.random.fork_rng(devices=[]):   # the same classifier in every clone; the caller's RNG untouched
        torch.manual_seed(seed)
        net = ToyClassifier(train_set.num_classes)
        if os.path.isfile(path):
            try:
                load_strict(net, read_checkpoint(path), path)
                return net.eval()
            except UserError as e:   # a cache, not an input: a damaged one is made again, not an error forever
                print(f"note: retraining the toy classifier: {e}", file=sys.stderr)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        loader = DataLoader(train_set, batch_size=128, shuffle=True)
        for _ in tqdm(range(epochs), desc="toy classifier (first use, cached)", unit="epoch"):
            for x, y in loader:
                loss = F.cross_entropy(net(x)[0], y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write(path, lambda f: torch.save(net.state_dict(), f))
    return net.eval()


@torch.no_grad()
def toy_metrics(net, images, labels, superclass_of, real_features, pairs=200, seed=0):
    """Subclass / superclass accuracy, classifier-feature FID and LPIPS-style diversity of images in [-1, 1]."""
    logits, features = net(images)
    pred = logits.argmax(1)
    sc = torch.as_tensor(superclass_of)
    a, b = sample_pairs(labels.numpy(), pairs, np.random.default_rng(seed))
    maps_a, maps_b = net.feature_maps(images[a]), net.feature_maps(images[b])
    unit = lambda m: m / (m.norm(dim=1, keepdim=True) + 1e-10)
    diversity = sum(((unit(p) - unit(q)) ** 2).sum(1).mean(dim=(1, 2)) for p, q in zip(maps_a, maps_b))
    return dict(sub_acc=(pred == labels).float().mean().item(), super_acc=(sc[pred] == sc[labels]).float().mean().item(),
                fid=frechet_distance(*feature_stats(features.numpy()), *feature_stats(real_features)),
                diversity=diversity.mean().item())


def checkpoint_label(path):
    """`run/0001500` for results/run/checkpoints/0001500.pt, else the file name."""
    folder, name = os.path.split(os.path.abspath(path))
    if os.path.basename(folder) == "checkpoints":
        return f"{os.path.basename(os.path.dirname(folder))}/{os.path.splitext(name)[0]}"
    return name


def toy_images(dataset):
    """All images (N, 3, H, W) in [-1, 1] and labels (N,) of a toy dataset."""
    return torch.stack([dataset[i][0] for i in range(len(dataset))]), torch.as_tensor(dataset.targets)


def toy_set_of(hierarchy):
    """The name of the toy set (data.TOY_SETS) whose classes a checkpoint has, or None."""
    for name in data.TOY_SETS:
        if data.toy_dataset(name, image_size=8, images_per_class=1).hierarchy() == hierarchy:
            return name
    return None


def toy_settings(model, guidances, scales):
    """(guidance, w) pairs to sample: ("none", None) once, every scale for each guide the table has rows for."""
    for guidance in guidances:
        if guidance == "none":
            yield guidance, None
            continue
        try:
            guide_labels(model, torch.zeros(1, dtype=torch.long), guidance)
        except UserError:
            continue                                   # this table has no row for that guide
        yield from ((guidance, w) for w in scales)


def read_log(path):
    """The records of a run's log.jsonl (a run folder or the file) in training order, each with `time_s`. A run
    resumed from an earlier checkpoint logs its steps again: the later records replace the earlier ones. Logs
    from before time_s was recorded get it rebuilt from each record's steps_per_s."""
    path = os.path.join(path, "log.jsonl") if os.path.isdir(path) else path
    try:
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the training log {path}: {e}") from None
    records = []
    for r in lines:
        while records and records[-1]["step"] >= r["step"]:
            records.pop()
        if r.get("time_s") is None:
            last = records[-1] if records else dict(step=0, time_s=0.0)
            r["time_s"] = last["time_s"] + (r["step"] - last["step"]) / r["steps_per_s"]
        records.append(r)
    return records


def checkpoint_time(path, info):
    """Training wall time (s) up to a checkpoint: recorded in it, else its run's log.jsonl at its step, else None."""
    if info.get("time_s") is not None:
        return info["time_s"]
    log_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "log.jsonl")
    if not os.path.isfile(log_path) or info.get("step") is None:
        return None
    return next((r["time_s"] for r in read_log(log_path) if r["step"] == info["step"]), None)


def toy_reference(name, size, args):
    """The classifier of a toy set, the features of its real val images (the FID reference) and a row of
    held-out real test images: the best a sampler could score."""
    real = data.toy_dataset(name, size, "val", flip=False, seed=args.seed)
    net = toy_classifier(size, args.cache_dir, args.classifier_epochs, toy_set=name)
    with torch.no_grad():
        real_features = net(toy_images(real)[0])[1].numpy()
    held_out = data.toy_dataset(name, size, "test", flip=False, seed=args.seed, images_per_class=args.per_class)
    row = dict(ckpt=f"real {name} images (test)", method="-", guidance="-", cfg_scale=None, step=None,
               train_time_s=None, **toy_metrics(net, *toy_images(held_out), real.superclass_of, real_features,
                                                 args.pairs, args.seed))
    return net, real, real_features, row


def cmd_toy(args):
    sampler = sampler_of(args)                             # a bad --steps or interval fails before any work
    if args.plot:
        figure_path(args.plot)
    seeds = args.seeds or [args.seed]
    rows, references = [], {}
    for ckpt in args.ckpt:
        model, info, _ = load_for_sampling(ckpt)
        path = info["path"]
        size, name = info["config"]["image_size"], toy_set_of(model.hierarchy)
        if not info["config"]["pixel_space"] or name is None:
            raise UserError(f"{path} is not a toy checkpoint (train one with --data toy or toy-base)")
        if (name, size) not in references:
            references[name, size] = toy_reference(name, size, args)
            rows.append(references[name, size][3])
        net, real, real_features, _ = references[name, size]
        y = torch.arange(real.num_classes).repeat_interleave(args.per_class)
        method, done = info["config"].get("method", "?"), {}
        settings = list(toy_settings(model, args.guidance, args.cfg_scales or [args.cfg_scale]))
        for (guidance, scale), seed in tqdm([(g, seed) for g in settings for seed in seeds],
                                            desc=f"sampling {checkpoint_label(path)}", unit="setting"):
            # w = 1 is the unguided sampler whatever the guide (eq. 1): sampled once, shared by those rows
            key = ("none", 1.0, seed) if guidance == "none" or scale == 1.0 else (guidance, scale, seed)
            if key not in done:
                images = sample_images(model, y, guide_labels(model, y, *key[:2]), key[1], sampler, seed=seed,
                                       progress=False)
                x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0   # (N, 3, H, W) in [-1, 1]
                done[key] = toy_metrics(net, x, y, real.superclass_of, real_features, args.pairs, seed)
            rows.append(dict(ckpt=checkpoint_label(path), method=method, guidance=guidance, cfg_scale=scale,
                             step=info.get("step"), train_time_s=checkpoint_time(path, info), seed=seed,
                             **sampler.record(), **done[key]))
    print_toy_table(rows)
    print(f"{sampler}; seeds {' '.join(map(str, seeds))}"
          + (" (mean±half the range)" if len(seeds) > 1 else ""))
    if args.out_json:
        write_json(args.out_json, rows)
    if args.out_csv:
        write_csv(args.out_csv, rows)
    if args.plot:
        save_figure(args.plot, tradeoff_panel(rows).image, rows)


TOY_COLUMNS = [("sub_acc", "sub acc↑", 9, ".3f"), ("super_acc", "super acc↑", 11, ".3f"),
               ("fid", "FID(cls)↓", 10, ".2f"), ("diversity", "diversity↑", 11, ".3f")]   # key, header, width, format


def print_toy_table(rows):
    """One line per checkpoint, guidance and scale: its metrics, or over several seeds `mean±half the range`
    (two seeds: exactly the two values), so the seed-to-seed noise stands beside every figure."""
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
            cell = f"{sum(values) / len(values):{fmt}}"
            if len(values) > 1:
                cell += f"±{(max(values) - min(values)) / 2:{fmt}}"
            cells += f"{cell:>{width + wider}}"
        train_s = group[0]["train_time_s"]
        print(f"{ckpt[:35]:<36}{method:<15}{guidance:<12}{'-' if scale is None else format(scale, 'g'):>5}{cells}"
              f"{'-' if train_s is None else format(train_s, '.0f'):>9}")


# -------------------------------------------------------------------------------------------------------------
# Figures, drawn with Pillow: the guidance sweep, paper Fig. 7 (label-table t-SNE), Fig. 5 (same-seed grid),
# training curves and Fig. 2 (FID against training time)
# -------------------------------------------------------------------------------------------------------------
# Pillow rather than matplotlib: a few scatter and line plots need no new dependency, and the tests check every
# figure wherever the suite runs. Panel is the one drawing helper: data -> pixels, axes, markers, lines, text, a
# legend. Every figure command writes FIGURE.png and, beside it, the numbers it shows: FIGURE.csv (and
# FIGURE.json where they do not fit one table).

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 128), (128, 128, 0)]
BLACK = (0, 0, 0)
PANEL_SIZE = (760, 420)


def font(size=12):
    try:
        return ImageFont.load_default(size=size)           # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def put_text(draw, xy, text, size=12, anchor="lt", fill=BLACK):
    """Text with its anchor (horizontal l/m/r, vertical t/m/b) at xy; works with any Pillow font."""
    f = font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    x = xy[0] - {"l": left, "m": (left + right) / 2, "r": right}[anchor[0]]
    y = xy[1] - {"t": top, "m": (top + bottom) / 2, "b": bottom}[anchor[1]]
    draw.text((x, y), text, fill=fill, font=f)


def nice_ticks(lo, hi, count=5):
    """Round tick values in [lo, hi]: steps of 1, 2 or 5 times a power of ten."""
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def data_limits(values):
    """(lo, hi) covering the values with a margin, so no marker sits on the frame."""
    values = [float(v) for v in values if v is not None and math.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(values), max(values)
    pad = 0.06 * (hi - lo) or 0.1 * abs(lo) or 1.0
    return lo - pad, hi + pad


class Panel:
    """One plot: data coordinates -> pixels inside `margin` (left, top, right, bottom), axes with ticks (or a bare
    frame: t-SNE axes mean nothing), markers o + * s, lines, text, and a legend in the right margin."""

    def __init__(self, title, xs, ys, xlabel="", ylabel="", size=PANEL_SIZE, margin=(70, 36, 220, 50), ticks=True):
        self.image = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.image)
        self.xlim, self.ylim = data_limits(xs), data_limits(ys)
        self.box = (margin[0], margin[1], size[0] - margin[2], size[1] - margin[3])
        self.draw.rectangle(self.box, outline=BLACK)
        put_text(self.draw, (size[0] / 2, 8), title, 14, "mt")
        if ticks:
            self.axes(xlabel, ylabel)

    def xy(self, x, y):
        x0, y0, x1, y1 = self.box
        (a, b), (c, d) = self.xlim, self.ylim
        return x0 + (x - a) / (b - a) * (x1 - x0), y1 - (y - c) / (d - c) * (y1 - y0)

    def axes(self, xlabel, ylabel):
        x0, y0, x1, y1 = self.box
        for t in nice_ticks(*self.xlim):
            px = self.xy(t, 0)[0]
            self.draw.line([(px, y1), (px, y1 + 4)], fill=BLACK)
            put_text(self.draw, (px, y1 + 6), f"{t:g}", 11, "mt")
        for t in nice_ticks(*self.ylim):
            py = self.xy(0, t)[1]
            self.draw.line([(x0 - 4, py), (x0, py)], fill=BLACK)
            put_text(self.draw, (x0 - 6, py), f"{t:g}", 11, "rm")
        put_text(self.draw, ((x0 + x1) / 2, y1 + 26), xlabel, 12, "mt")
        label = Image.new("RGB", (int(self.draw.textlength(ylabel, font=font(12))) + 4, 16), "white")
        put_text(ImageDraw.Draw(label), (2, 8), ylabel, 12, "lm")
        label = label.rotate(90, expand=True)                 # Pillow draws text horizontally only
        self.image.paste(label, (4, int((y0 + y1 - label.height) / 2)))

    def marker(self, x, y, colour, shape="o", r=4):
        glyph(self.draw, self.xy(x, y), colour, shape, r)

    def line(self, xs, ys, colour, width=2):
        points = [self.xy(x, y) for x, y in zip(xs, ys)]
        if len(points) > 1:
            self.draw.line(points, fill=colour, width=width)

    def text(self, x, y, text, colour=BLACK, size=11):
        px, py = self.xy(x, y)
        put_text(self.draw, (px + 6, py - 2), text, size, "lb", colour)

    def legend(self, entries):
        """entries: [(label, colour, shape)], right of the frame, where they hide no data."""
        x, y = self.box[2] + 8, self.box[1] + 6
        for i, (label, colour, shape) in enumerate(entries):
            glyph(self.draw, (x + 8, y + 16 * i + 6), colour, shape, 4 if shape == "o" else 6)
            put_text(self.draw, (x + 20, y + 16 * i + 6), label, 11, "lm")


def glyph(draw, centre, colour, shape, r):
    """A marker: o (disc), s (square), + (superclass row), * (star: subclass mean)."""
    x, y = centre
    if shape == "o":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == "s":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour, outline=BLACK)
    elif shape == "+":
        draw.line([(x - r, y), (x + r, y)], fill=colour, width=3)
        draw.line([(x, y - r), (x, y + r)], fill=colour, width=3)
    elif shape == "*":
        draw.polygon([(x + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
                       y - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5)) for k in range(10)],
                     fill=colour, outline=BLACK)
    else:
        raise ValueError(shape)


def tile(images, columns):
    """Equal-size panels in a sheet, row by row."""
    w, h = images[0].size
    sheet = Image.new("RGB", (w * min(columns, len(images)), h * math.ceil(len(images) / columns)), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    return sheet


def figure_path(path):
    """--out of a figure command, checked before any work: a .png, with FIGURE.csv / .json written beside it."""
    if not path.lower().endswith(".png"):
        raise UserError(f"--out {path}: figures are written as .png (the numbers go beside it, as .csv and .json)")
    return path


def save_figure(path, image, rows, extra=None):
    """FIGURE.png, and beside it FIGURE.csv (`rows`: the numbers it shows) and, with `extra`, FIGURE.json."""
    figure_path(path)
    atomic_write(path, lambda f: image.save(f, format="PNG"))
    stem = os.path.splitext(path)[0]
    write_csv(stem + ".csv", rows)
    if extra is not None:
        write_json(stem + ".json", extra)
    print(f"wrote {path} ({image.width}x{image.height}) and {stem}.csv" + (f", {stem}.json" if extra else ""),
          file=sys.stderr)


# ---- the guidance sweep: FID (cls) against subclass accuracy (evaluate.py toy --plot) --------------------------

def tradeoff_panel(rows):
    """A curve over the guidance scale w per checkpoint and guide, each point labelled by w, a colour per
    checkpoint and a marker per guide (square: unguided; black: real images). Lower right is better."""
    panel = Panel("guidance sweep: FID (cls) against subclass accuracy", [r["sub_acc"] for r in rows],
                  [r["fid"] for r in rows], "subclass accuracy", "FID (cls)", size=(900, 440), margin=(70, 36, 320, 50))
    curves, colours = {}, {}
    for r in rows:
        curves.setdefault((r["ckpt"], r["guidance"]), []).append(r)
        colours.setdefault(r["ckpt"], BLACK if r["guidance"] == "-" else PALETTE[len(colours) % len(PALETTE)])
    shape = {"-": "s", "none": "s", "null": "o", "superclass": "*"}
    for (ckpt, guidance), group in curves.items():
        group.sort(key=lambda r: r["cfg_scale"] or 0)
        panel.line([r["sub_acc"] for r in group], [r["fid"] for r in group], colours[ckpt])
        for r in group:
            panel.marker(r["sub_acc"], r["fid"], colours[ckpt], shape[guidance], 6 if guidance == "superclass" else 4)
            if r["cfg_scale"]:
                panel.text(r["sub_acc"], r["fid"], f"{r['cfg_scale']:g}", colours[ckpt])
    panel.legend([(ckpt if guidance == "-" else f"{ckpt}: {guidance}", colours[ckpt], shape[guidance])
                  for ckpt, guidance in curves])
    return panel


# ---- paper Fig. 7: t-SNE of the label table ---------------------------------------------------------------------
# t-SNE (van der Maaten & Hinton 2008), exact, in torch. High-dimensional similarities are Gaussian around each
# point, with a bandwidth chosen per point so that its neighbourhood has a fixed perplexity; low-dimensional ones
# are Student-t (one degree of freedom), whose heavy tail lets clusters separate; the map minimises KL(P || Q) by
# gradient descent with momentum, per-coordinate gains and early exaggeration. Settings: those of scikit-learn's
# TSNE(method="exact") -- perplexity 30, exaggeration 12 for the first 250 of 1000 iterations, momentum 0.5 then
# 0.8, learning rate max(N / 48, 50) -- with the paper's start, Y ~ N(0, 1e-4 I), from a fixed seed.

def squared_distances(x):
    """||x_i - x_j||^2 for rows x [N, D] -> [N, N] (>= 0 despite round-off)."""
    sq = (x * x).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)


def conditional_affinities(sq_dist, perplexity, steps=100, tol=1e-5):
    """p_{j|i} = exp(-beta_i d_ij^2) / sum_{k != i} exp(-beta_i d_ik^2) [N, N], beta_i (= 1 / 2 sigma_i^2) found by
    bisection so that each row's perplexity exp(H(P_i)) (H in nats) is `perplexity`: dense regions get narrow
    Gaussians, sparse ones wide, so every point has about `perplexity` effective neighbours."""
    n = len(sq_dist)
    off = ~torch.eye(n, dtype=torch.bool, device=sq_dist.device)
    d = sq_dist - sq_dist.masked_fill(~off, math.inf).min(1, keepdim=True).values  # p is shift-free; exp() safe
    beta = torch.ones(n, 1, dtype=d.dtype, device=d.device)
    lo, hi = torch.zeros_like(beta), torch.full_like(beta, math.inf)
    target = math.log(perplexity)
    for _ in range(steps):
        p = torch.exp(-d * beta) * off
        total = p.sum(1, keepdim=True)
        entropy = torch.log(total) + beta * (d * p).sum(1, keepdim=True) / total
        if (entropy - target).abs().max() < tol:
            break
        too_flat = entropy > target                            # beta too small: the Gaussian is too wide
        lo, hi = torch.where(too_flat, beta, lo), torch.where(too_flat, hi, beta)
        beta = torch.where(torch.isinf(hi), 2 * beta, (lo + hi) / 2)
    return p / total


def tsne_affinities(sq_dist, perplexity):
    """The joint P of t-SNE: p_ij = (p_{j|i} + p_{i|j}) / 2N, symmetric, summing to 1, and every point (an outlier
    too) holds at least 1/2N of the mass, so each one has a say in the map."""
    p = conditional_affinities(sq_dist, perplexity)
    return (p + p.T) / (2 * len(p))


def tsne_gradient(p, y):
    """(dKL(P || Q) / dY, Q) for the map Y [N, 2]: q_ij = (1 + |y_i - y_j|^2)^-1 / sum_{k != l} (1 + |y_k - y_l|^2)^-1
    (Student-t, one degree of freedom: its heavy tail lets clusters separate), and the gradient (paper eq. 5)
    dC/dy_i = 4 sum_j (p_ij - q_ij)(y_i - y_j)(1 + |y_i - y_j|^2)^-1."""
    num = 1 / (1 + squared_distances(y))
    num.fill_diagonal_(0)
    q = (num / num.sum()).clamp_min(1e-12)
    pq = (p - q) * num
    return 4 * (pq.sum(1, keepdim=True) * y - pq @ y), q


def tsne(x, perplexity=30.0, iters=1000, seed=0, progress=False):
    """2-D t-SNE of rows x [N, D] -> (Y [N, 2], KL(P || Q) at the end)."""
    n = len(x)
    p = tsne_affinities(squared_distances(x), min(perplexity, (n - 1) / 3)).clamp_min(1e-12)
    g = torch.Generator().manual_seed(seed)
    y = (1e-2 * torch.randn(n, 2, generator=g, dtype=x.dtype)).to(x.device)
    update, gains = torch.zeros_like(y), torch.ones_like(y)
    lr = max(n / 12 / 4, 50.0)
    for it in tqdm(range(iters), desc="t-SNE", unit="iter", disable=not progress):
        exaggeration, momentum = (12.0, 0.5) if it < 250 else (1.0, 0.8)   # early on: tight, movable clusters
        grad, _ = tsne_gradient(exaggeration * p, y)
        gains = torch.where(update * grad < 0, gains + 0.2, gains * 0.8).clamp_min(0.01)
        update = momentum * update - lr * gains * grad
        y = y + update
        y = y - y.mean(0)                                        # KL is translation-free: keep the map centred
    q = tsne_gradient(p, y)[1]
    return y, float((p * torch.log(p / q)).sum())


def same_superclass_neighbours(x, superclass, k=10, chunk=2048):
    """Mean over points of the fraction of their k nearest neighbours (Euclidean, itself excluded) that share
    its superclass. Chance is sum_s n_s (n_s - 1) / N (N - 1); the best possible is mean_i min(k, n_s(i) - 1) / k."""
    k, hits = min(k, len(x) - 1), 0.0
    for start in range(0, len(x), chunk):                       # N x N distances a chunk of rows at a time
        d = torch.cdist(x[start:start + chunk].double(), x.double())
        d[torch.arange(len(d)), torch.arange(start, start + len(d))] = math.inf
        nearest = d.topk(k, largest=False).indices               # (chunk, k)
        hits += (superclass[nearest] == superclass[start:start + chunk, None]).double().sum().item()
    return hits / (len(x) * k)


def label_table(path):
    """(table [rows, D] of EMA weights, K, S, hierarchy, method) of a checkpoint, read from the file alone: only
    the table is needed, so no DiT is built and no base file or VAE is needed (the authors' XL file is 2.7 GB)."""
    ckpt = read_checkpoint(path)
    state = checkpoint_tensors(ckpt)                            # ours (a delta too: every method tunes the table)
    if TABLE not in state:
        raise UserError(f"{path} holds no label table ({TABLE})")
    if "config" in ckpt:
        method = ckpt["config"].get("method", "?")
        hierarchy = None if ckpt.get("hierarchy") is None else read_hierarchy(ckpt["hierarchy"], path)
        with torch.device("meta"):                              # which rows the method's table has, at no cost
            embedder = build_model(**ckpt["config"]).y_embedder
        K, S = embedder.num_classes, embedder.num_superclasses
    else:                                                       # official DiT / the authors': as load_model reads them
        _, config, hierarchy = published_layout(state)
        K, S = config["num_classes"], config["num_superclasses"]
        method = "finediffusion" if S else "?"
    if hierarchy is None:
        raise UserError(f"{path} carries no class hierarchy: its subclasses cannot be coloured by superclass")
    return state[TABLE].float(), K, S, hierarchy, method


def embed_label_table(table, K, S, superclass_of, args):
    """Fig. 7's picture and number for one table: t-SNE of (subclass rows, at most --max-points of them; the S
    superclass rows; the mean subclass row of each superclass), and the same-superclass share of each subclass's
    nearest subclasses in 2-D and in the table's own space, on the same subclasses."""
    sup = torch.as_tensor(superclass_of)
    g = torch.Generator().manual_seed(args.seed)
    keep = torch.arange(K)
    if 0 < args.max_points < K:                                 # a random subset, the same for every checkpoint
        keep = torch.randperm(K, generator=g)[:args.max_points].sort().values
    present = sup.unique()
    means = torch.stack([table[:K][sup == s].mean(0) for s in present])    # of every subclass, not only those kept
    if len(keep) < 2:
        raise UserError(f"a label table of {len(keep)} subclass rows has no neighbours to count")
    x = torch.cat([table[keep], table[K:K + S], means]).to(args.device)
    y, kl = tsne(x, args.perplexity, args.iters, args.seed, progress=True)
    y, n = y.cpu(), len(keep)
    counts = torch.bincount(sup[keep]).double()
    k = min(args.neighbours, n - 1)
    return dict(points=n, neighbours=k,
                same_superclass_2d=same_superclass_neighbours(y[:n], sup[keep], k),
                same_superclass_original=same_superclass_neighbours(table[keep], sup[keep], k),
                chance=float((counts * (counts - 1)).sum() / (n * (n - 1))),
                best=float(((counts[sup[keep]] - 1).clamp(max=k) / k).mean()), kl=kl,
                subclass=[[*xy, int(c), int(sup[c])] for xy, c in zip(y[:n].tolist(), keep)],
                superclass=[[*xy, s] for s, xy in enumerate(y[n:n + S].tolist())],
                mean=[[*xy, int(s)] for xy, s in zip(y[n + S:].tolist(), present)])


def embedding_panel(result, title, superclass_names):
    """Subclass rows as dots coloured by superclass, superclass rows as +, subclass means as stars."""
    points = result["subclass"] + result["superclass"] + result["mean"]
    panel = Panel(title, [p[0] for p in points], [p[1] for p in points], size=(640, 460),
                  margin=(12, 36, 190, 12), ticks=False)
    colour = lambda s: PALETTE[s % len(PALETTE)]
    for x, y, _, s in result["subclass"]:
        panel.marker(x, y, colour(s), "o", 2)
    for x, y, s in result["mean"]:
        panel.marker(x, y, colour(s), "*", 9)
    for x, y, s in result["superclass"]:                       # on top: a superclass row may sit on its mean
        panel.marker(x, y, colour(s), "+", 8)
    legend = [(name[:24], colour(s), "o") for s, name in enumerate(superclass_names)][:20]
    panel.legend(legend + [("superclass row", BLACK, "+"), ("mean of subclasses", BLACK, "*")])
    x0, _, _, y1 = panel.box
    put_text(panel.draw, (x0 + 6, y1 - 6), f"same-superclass {result['neighbours']}-NN: 2-D "
             f"{result['same_superclass_2d']:.2f}, table {result['same_superclass_original']:.2f} "
             f"(chance {result['chance']:.2f})", 12, "lb")
    return panel


def cmd_embeddings(args):
    figure_path(args.out)
    if args.iters < 1 or args.neighbours < 1 or args.perplexity <= 1:
        raise UserError("--iters and --neighbours must be positive and --perplexity above 1")
    rows, results, panels = [], [], []
    for path in map(resolve_checkpoint, args.ckpt):
        table, K, S, hierarchy, method = label_table(path)
        result = embed_label_table(table, K, S, hierarchy["superclass_of"], args)
        row = dict(ckpt=checkpoint_label(path), method=method, classes=K, superclasses=S,
                   **{k: v for k, v in result.items() if k not in ("subclass", "superclass", "mean")})
        rows.append(row)
        results.append(dict(**row, superclass_names=hierarchy["superclass_names"], subclass=result["subclass"],
                            superclass=result["superclass"], mean=result["mean"]))
        panels.append(embedding_panel(result, f"{row['ckpt']} ({method})", hierarchy["superclass_names"]).image)
    print(f"{'checkpoint':<36}{'method':<15}{'points':>7}   same-superclass share of the k nearest subclasses")
    print(f"{'':<58}{'k':>3}{'2-D':>7}{'table':>7}{'chance':>8}{'best':>6}")
    for r in rows:
        print(f"{r['ckpt'][:35]:<36}{r['method']:<15}{r['points']:>7}{r['neighbours']:>3}"
              f"{r['same_superclass_2d']:>7.3f}{r['same_superclass_original']:>7.3f}{r['chance']:>8.3f}{r['best']:>6.3f}")
    settings = dict(max_points=args.max_points, perplexity=args.perplexity, iters=args.iters, seed=args.seed)
    save_figure(args.out, tile(panels, min(len(panels), 4)), rows, dict(settings=settings, checkpoints=results))


# ---- paper Fig. 5: the same classes and seed across methods ------------------------------------------------------

GRID_LABEL_WIDTH, GRID_HEADER, GRID_PAD, GRID_MIN_CELL = 170, 40, 4, 96


def grid_image(cells, row_labels, column_labels):
    """cells[r][c]: uint8 (H, W, 3) images, shown at max(H, GRID_MIN_CELL) pixels (small toy images enlarged
    pixel by pixel); labels: a list of lines per row, one line per column. Size: GRID_LABEL_WIDTH + columns *
    (cell + GRID_PAD) by GRID_HEADER + rows * (cell + GRID_PAD)."""
    cell = max(cells[0][0].shape[0], GRID_MIN_CELL)
    sheet = Image.new("RGB", (GRID_LABEL_WIDTH + len(column_labels) * (cell + GRID_PAD),
                              GRID_HEADER + len(cells) * (cell + GRID_PAD)), "white")
    draw = ImageDraw.Draw(sheet)
    fit = lambda text, width: next(text[:n] for n in range(len(text), -1, -1)      # cut to the width
                                   if draw.textlength(text[:n], font=font(11)) <= width)
    for c, label in enumerate(column_labels):
        for i, line in enumerate(label):
            put_text(draw, (GRID_LABEL_WIDTH + c * (cell + GRID_PAD) + cell / 2, 6 + 15 * i), fit(line, cell), 11, "mt")
    for r, (row, label) in enumerate(zip(cells, row_labels)):
        top = GRID_HEADER + r * (cell + GRID_PAD)
        for i, line in enumerate(label):
            put_text(draw, (6, top + 8 + 15 * i), fit(line, GRID_LABEL_WIDTH - 10), 11, "lt")
        for c, image in enumerate(row):
            tile_image = Image.fromarray(image).resize((cell, cell), Image.NEAREST)
            sheet.paste(tile_image, (GRID_LABEL_WIDTH + c * (cell + GRID_PAD), top))
    return sheet


def real_row(args, num_classes, image_size):
    """One real image of each --class-ids class (the first readable one of its class in --split) from --data."""
    root = args.data_path or (None if args.data in data.TOY_SETS else os.path.join("data", args.data))
    dataset = data.build_dataset(args.data, root, image_size, args.split or "val", flip=False,
                                 hierarchy_csv=args.hierarchy_csv)
    if dataset.num_classes != num_classes:
        raise UserError(f"--data {args.data} has {dataset.num_classes} classes, the checkpoints {num_classes}")
    targets, images = np.asarray(dataset.targets), []
    for c in args.class_ids:
        x, _ = next(data.readable_items(dataset, np.flatnonzero(targets == c)), (None, None))  # (3, H, W) in [-1, 1]
        if x is None:
            raise UserError(f"--data {args.data} (split {args.split or 'val'}) has no readable image of class {c}")
        images.append(((x + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
    return images


def cmd_grid(args):
    figure_path(args.out)
    sampler = sampler_of(args)
    cells, labels, rows, hierarchy, num_classes = [], [], [], None, None
    for ckpt in args.ckpt:
        model, info, vae = load_for_sampling(ckpt, vae=args.vae)
        path = info["path"]
        if cells and (model.hierarchy, model.y_embedder.num_classes) != (hierarchy, num_classes):
            raise UserError(f"{path} has other classes than {args.ckpt[0]}: a grid compares methods on the same "
                            "classes")
        hierarchy, num_classes, size = model.hierarchy, model.y_embedder.num_classes, info["config"]["image_size"]
        for c in args.class_ids:
            resolve_class(hierarchy, num_classes, class_id=c, flag="--class-ids")
        guidance = args.guidance
        if guidance == "auto":                       # each method as it is meant to be sampled: eq. 1 or standard CFG
            guidance = "superclass" if model.y_embedder.num_superclasses else "null"
        y = torch.tensor(args.class_ids)
        guide = guide_labels(model, y, guidance, args.cfg_scale)
        images = sample_images(model, y, guide, args.cfg_scale, sampler, vae, args.seed, args.device,
                               progress=False)   # every row: the same seed, the same noise
        method = info["config"].get("method", "?")
        cells.append(list(images.numpy()))
        labels.append([checkpoint_label(path), method,
                       "unguided" if guide is None else f"{guidance}, w = {args.cfg_scale:g}"])
        rows += [dict(row=len(cells), ckpt=checkpoint_label(path), method=method, guidance=guidance,
                      guide_row=None if guide is None else int(guide[i]), cfg_scale=args.cfg_scale,
                      **sampler.record(), seed=args.seed, class_id=c)
                 for i, c in enumerate(args.class_ids)]
        del model, vae
    if args.data:
        cells.insert(0, real_row(args, num_classes, size))
        labels.insert(0, ["real images", f"--data {args.data}"])
        rows = [dict(row=0, ckpt="real", class_id=c) for c in args.class_ids] + rows
    names = hierarchy["class_names"] if hierarchy else None
    columns = [[f"class {c}", names[c] if names else ""] for c in args.class_ids]
    for r in rows:
        r["class_name"] = names[r["class_id"]] if names else None
    save_figure(args.out, grid_image(cells, labels, columns), rows)


# ---- training curves and paper Fig. 2: FID against training time --------------------------------------------------

def time_unit(seconds):
    """A readable unit for a time axis that reaches `seconds`: (divisor, name)."""
    return (1, "s") if seconds < 300 else (60, "min") if seconds < 3 * 3600 else (3600, "h")


def loss_panels(logs):
    """Loss against step and against wall time, a curve per run."""
    records = [r for log in logs.values() for r in log]
    div, unit = time_unit(max(r["time_s"] for r in records))
    by_step = Panel("training loss against step", [r["step"] for r in records], [r["loss"] for r in records],
                    "step", "loss")
    by_time = Panel("training loss against wall time", [r["time_s"] / div for r in records],
                    [r["loss"] for r in records], f"wall time ({unit})", "loss")
    for i, log in enumerate(logs.values()):
        colour = PALETTE[i % len(PALETTE)]
        by_step.line([r["step"] for r in log], [r["loss"] for r in log], colour)
        by_time.line([r["time_s"] / div for r in log], [r["loss"] for r in log], colour)
        if len(log) == 1:
            by_step.marker(log[0]["step"], log[0]["loss"], colour)
            by_time.marker(log[0]["time_s"] / div, log[0]["loss"], colour)
    for panel in (by_step, by_time):
        panel.legend([(name, PALETTE[i % len(PALETTE)], "o") for i, name in enumerate(logs)])
    return [by_step, by_time]


def fig2_panel(toy_rows, cfg_scale):
    """FID (cls) against training time: a curve per run and guide through its checkpoints (unguided, and guided
    at w = cfg_scale), coloured by method; marker by guide."""
    rows = [r for r in toy_rows if r.get("train_time_s") is not None and r.get("cfg_scale") in (None, cfg_scale)]
    if not rows:
        raise UserError("no toy row has a training time: score checkpoints that record time_s (trained by this "
                        "train.py) or whose run folder holds log.jsonl")
    div, unit = time_unit(max(r["train_time_s"] for r in rows))
    panel = Panel(f"FID (cls) against training time (w = {cfg_scale:g})", [r["train_time_s"] / div for r in rows],
                  [r["fid"] for r in rows], f"training time ({unit})", "FID (cls)")
    curves, legend = {}, {}
    for r in rows:
        curves.setdefault((r["ckpt"].split("/")[0], r["method"], r["guidance"]), []).append(r)
    shape = dict(none="s", null="o", superclass="*")
    for (_, method, guidance), group in curves.items():
        colour = PALETTE[METHODS.index(method) if method in METHODS else -1]
        group.sort(key=lambda r: r["train_time_s"])
        panel.line([r["train_time_s"] / div for r in group], [r["fid"] for r in group], colour)
        for r in group:
            panel.marker(r["train_time_s"] / div, r["fid"], colour, shape.get(guidance, "o"), 6)
        legend[f"{method} {guidance}"] = (colour, shape.get(guidance, "o"))
    panel.legend([(label, colour, s) for label, (colour, s) in legend.items()])
    return panel, [dict(panel="fid_vs_time", run=r["ckpt"], method=r["method"], guidance=r["guidance"],
                        cfg_scale=r.get("cfg_scale"), step=r.get("step"), time_s=r["train_time_s"], fid=r["fid"])
                   for r in rows]


def cmd_curves(args):
    figure_path(args.out)
    logs = {}
    for run in args.runs:
        name = os.path.basename(os.path.normpath(run if os.path.isdir(run) else os.path.dirname(os.path.abspath(run))))
        logs[name if name not in logs else run] = read_log(run)
    if not all(logs.values()):
        raise UserError(f"an empty training log among {', '.join(args.runs)}")
    panels = loss_panels(logs)
    rows = [dict(panel="loss", run=name, step=r["step"], time_s=r["time_s"], loss=r["loss"])
            for name, log in logs.items() for r in log]
    if args.toy_json:
        toy_rows = []
        for path in args.toy_json:
            try:
                with open(path) as f:
                    toy_rows += json.load(f)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read the toy table {path}: {e}") from None
        panel, fig2_rows = fig2_panel(toy_rows, args.cfg_scale)
        panels.append(panel)
        rows += fig2_rows
    save_figure(args.out, tile([p.image for p in panels], len(panels)), rows)


# -------------------------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------------------------

def add_image_args(p):
    p.add_argument("--data", choices=data.DATASETS, help="real images: a dataset (data.py)")
    p.add_argument("--data-path", help="dataset root; default: data/<--data>")
    p.add_argument("--split", help="dataset split; default: val")
    p.add_argument("--hierarchy-csv", help="class,superclass rows for a flat folder dataset")
    p.add_argument("--hierarchy", help="'inat21' or a JSON hierarchy, for images labelled by class only")
    p.add_argument("--image-size", type=positive_int, help="centre-crop and resize to this (ADM preprocessing); "
                   "default: datasets 256 (toy 32), generated images as they are")
    p.add_argument("--inception", help=f"{FID_WEIGHTS} (default: as named, under pretrained/, in $TORCH_HOME)")
    p.add_argument("--batch-size", type=positive_int, default=50)
    p.add_argument("--workers", type=nonnegative_int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")


def add_fid_args(p):
    p.add_argument("--overall-only", action="store_true", help="skip the per-superclass rows")
    p.add_argument("--lpips-alex", help=f"{ALEXNET_WEIGHTS} (default: as named, under pretrained/, in $TORCH_HOME)")
    p.add_argument("--lpips-lin", help=f"LPIPS v0.1 {LPIPS_LIN_WEIGHTS} (default: as named, under pretrained/)")
    p.add_argument("--pairs", type=nonnegative_int, default=1000,
                   help="random same-class pairs for LPIPS (0: no LPIPS)")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of the LPIPS pairs (generate: and of the noise)")
    p.add_argument("--out-csv", type=out_file)
    p.add_argument("--out-json", type=out_file)


def add_figure_commands(sub):
    p = sub.add_parser("embeddings", help="paper Fig. 7: t-SNE of each checkpoint's label table, and how often a "
                                          "subclass's nearest subclasses share its superclass")
    p.add_argument("--ckpt", nargs="+", required=True, help="checkpoints or run folders: one panel each")
    p.add_argument("--out", type=out_file, required=True, help="PNG to write; OUT.csv and OUT.json beside it")
    p.add_argument("--max-points", type=int, default=2000, help="subclass rows to embed, drawn at random (0: all; "
                   "exact t-SNE costs N^2 memory and time: all 10,000 iNat21 rows want a GPU, --device cuda)")
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--neighbours", type=int, default=10, help="k of the nearest-neighbour number")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=cmd_embeddings)

    p = sub.add_parser("grid", help="paper Fig. 5: rows = checkpoints (methods), columns = classes, one seed")
    p.add_argument("--ckpt", nargs="+", required=True, help="checkpoints or run folders: one row each")
    p.add_argument("--class-ids", nargs="+", type=int, required=True)
    p.add_argument("--out", type=out_file, required=True, help="PNG to write; OUT.csv beside it")
    p.add_argument("--guidance", choices=["auto", "superclass", "null", "none"], default="auto",
                   help="auto: superclass rows (eq. 1) where the table has them, else the null row (standard CFG)")
    add_sampler_args(p)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--vae", help="SD VAE for latent models; default: the checkpoint's, else sd-vae-ft-ema")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", choices=data.DATASETS, help="a first row of real images of each class, from this dataset")
    p.add_argument("--data-path", help="dataset root; default: data/<--data>")
    p.add_argument("--split", help="dataset split of the real images; default: val")
    p.add_argument("--hierarchy-csv", help="class,superclass rows for a flat folder dataset")
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("curves", help="training loss against step and wall time; with toy tables, paper Fig. 2: "
                                      "FID (cls) against training time")
    p.add_argument("--runs", nargs="+", required=True, help="run folders (or their log.jsonl)")
    p.add_argument("--out", type=out_file, required=True, help="PNG to write; OUT.csv beside it")
    p.add_argument("--toy-json", nargs="+", help="`evaluate.py toy --out-json` tables of checkpoints of these runs")
    p.add_argument("--cfg-scale", type=float, default=CFG_SCALE, help="the guided rows of the toy tables to show")
    p.set_defaults(func=cmd_curves)


def main(argv=None):
    parser = ArgumentParser(description="FID (overall, per superclass) and LPIPS diversity for FineDiffusion "
                                        "(paper §4.3, Table 1), generation at scale, the toy tables.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stats", help="reference Inception statistics (per superclass) of real or generated images")
    p.add_argument("--images", help="a generate folder, an .npz (arr_0 [N,H,W,3] uint8) or a folder of images")
    p.add_argument("--out", type=out_file, required=True, help="statistics .npz to write")
    add_image_args(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("fid", help="FID and LPIPS of generated images against reference statistics (Table 1)")
    p.add_argument("--real", required=True, help="statistics .npz from `stats` (or images)")
    p.add_argument("--fake", required=True, help="generated images: a generate folder or an .npz")
    add_image_args(p)
    add_fid_args(p)
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("generate", help="samples for FID, spread over the classes; torchrun for several GPUs")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--base", help="base checkpoint of a delta checkpoint, if it moved")
    p.add_argument("--vae", help="SD VAE for latent models; default: the checkpoint's, else sd-vae-ft-ema")
    p.add_argument("--out", type=folder, required=True, help="folder: OUT/<class>/<index>.png and OUT/samples.json")
    p.add_argument("--overwrite", action="store_true", help="start over when OUT holds samples of other settings")
    p.add_argument("--num-samples", type=positive_int, help="in all, spread evenly over the classes")
    p.add_argument("--per-class", type=positive_int, help="or this many of every class")
    p.add_argument("--guidance", choices=["superclass", "null", "none"], default="superclass")
    add_sampler_args(p)
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--npz", type=out_file, help="also pack every image into this .npz (arr_0, labels, hierarchy)")
    p.add_argument("--fid", help="reference statistics .npz: compute FID and LPIPS when done")
    add_image_args(p)
    add_fid_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("toy", help="offline paper Tables 1-2 in miniature: accuracy, FID, diversity on the toy data")
    p.add_argument("--ckpt", nargs="+", required=True, help="toy checkpoints or run folders (e.g. one per method)")
    p.add_argument("--guidance", nargs="+", choices=["none", "null", "superclass"], default=["none", "null", "superclass"])
    p.add_argument("--per-class", type=positive_int, default=16, help="samples of each class")
    add_sampler_args(p, steps=50)
    p.add_argument("--cfg-scales", nargs="+", type=finite_float, help="a guidance sweep: every guide at each of "
                   "these scales (e.g. 1 1.5 2 3 4 6), instead of --cfg-scale alone")
    p.add_argument("--pairs", type=positive_int, default=500, help="same-class pairs for the diversity")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of the real reference images (and default noise seed)")
    p.add_argument("--seeds", type=nonnegative_int, nargs="+", help="noise seeds, one row each in the JSON, "
                   "mean±half the range in the table (default: --seed)")
    p.add_argument("--cache-dir", type=folder, default="results", help="where the toy classifier is cached")
    p.add_argument("--classifier-epochs", type=positive_int, default=4,
                   help="training of the toy classifier, on first use")
    p.add_argument("--out-json", type=out_file)
    p.add_argument("--out-csv", type=out_file)
    p.add_argument("--plot", type=out_file, help="PNG: FID (cls) against subclass accuracy, a curve per checkpoint and guide over the "
                                  "scales (and PLOT.csv beside it)")
    p.set_defaults(func=cmd_toy)
    add_figure_commands(sub)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))

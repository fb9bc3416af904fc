"""
Evaluation for FineDiffusion: FID (overall and per superclass) and LPIPS diversity (paper §4.3-4.4).

The paper scores generated images with two numbers (Tables 1, 3, 4):
  - FID (Heusel et al. 2017), lower is better: the Frechet distance between Gaussians fitted to 2048-d
    Inception-v3 pool features of real and of generated images. Table 1 reports it overall and for each of
    the 11 iNaturalist superclasses (real and generated images of that superclass only).
  - LPIPS (Zhang et al. 2018, v0.1, AlexNet), higher is better: the mean perceptual distance between two
    generated images of the same class, i.e. how diverse the samples of one class are.

FID numbers are only comparable when every detail of the feature extractor matches the reference
implementation, so this file carries its own port of the TF 2015-12-05 Inception graph that pytorch-fid
uses (same layers, same TF pooling quirks, same published weights `pt_inception-2015-12-05-6726825d.pth`),
and a Frechet distance computed exactly like pytorch-fid's. Nothing is ever downloaded: weight files are
looked up at the given path, then $TORCH_HOME/hub/checkpoints/, then ./pretrained/.

Usage:
    # reference statistics of the real images (a two-level folder DIR/<superclass>/<class>/*.png, a folder
    # DIR/<class_id>/*.png with --hierarchy FILE, or an ADM-style .npz with arr_0 [N,H,W,3] uint8)
    python evaluate.py stats --images data/inat21/val --out results/inat21_val_ref.npz
    # FID and LPIPS of generated images, laid out like paper Table 1 (rows: superclasses, then Overall)
    python evaluate.py fid --real results/inat21_val_ref.npz --fake samples/finediffusion \
        --out-csv results/table1.csv --out-json results/table1.json

Python API: load_inception, inception_features, feature_stats, frechet_distance, LPIPS, lpips_diversity,
open_images, compute_stats, fid_table.
"""

import argparse
import csv
import io
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
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from torch.utils.data import DataLoader, Dataset
from torchvision.models import alexnet
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE
from tqdm import tqdm

from data import INAT21_SUPERCLASSES, center_crop_arr, inat21_superclass_of
from model import atomic_write

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"
ALEXNET_WEIGHTS_URL = "https://download.pytorch.org/models/" + ALEXNET_WEIGHTS
LPIPS_LIN_WEIGHTS = "alex.pth"
LPIPS_LIN_WEIGHTS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
class EvalError(Exception):
    """A user mistake (missing file, bad layout, mismatched statistics): the CLI prints one line, exits 2."""


# -------------------------------------------------------------------------------------------------------------
# Weight files: found locally, never downloaded
# -------------------------------------------------------------------------------------------------------------

def find_weights(path, filename, url, what):
    """Path of a published weights file: `path` if given, else $TORCH_HOME/hub/checkpoints/ or ./pretrained/."""
    if path is not None:
        path = os.path.join(path, filename) if os.path.isdir(path) else path
        if os.path.isfile(path):
            return path
        # an explicit path that is wrong is a typo to report, not a reason to silently use another file
        raise EvalError(f"{what} weights not found at {path} (the published file is {filename}: {url})")
    torch_home = os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch"))
    candidates = [os.path.join(torch_home, "hub", "checkpoints", filename), os.path.join("pretrained", filename)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise EvalError(f"{what} weights {filename} not found (looked in {', '.join(candidates)}); "
                    f"download it from {url} (this tool never downloads)")


def read_state_dict(path):
    """A plain state dict from an untrusted file: tensors only (weights_only), never arbitrary pickles."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, a pickle that is not plain tensors, ...
        raise EvalError(f"cannot read weights {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise EvalError(f"{path} is not a state dict (got {type(state).__name__})")
    return state


def load_strict(module, state, path):
    """load_state_dict(strict=True), but a mismatch is one clear line naming the first offending key."""
    expected = module.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise EvalError(f"{path} is missing key '{key}'")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise EvalError(f"{path}: key '{key}' has shape {tuple(state[key].shape)}, "
                            f"expected {tuple(tensor.shape)}")
    for key in state:
        if key not in expected:
            raise EvalError(f"{path} has unexpected key '{key}'")
    module.load_state_dict(state, strict=True)


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
    path = find_weights(path, FID_WEIGHTS, FID_WEIGHTS_URL, "FID Inception")
    state = read_state_dict(path)
    model = FIDInceptionV3()
    # BatchNorm's step counter is irrelevant in eval; state dicts from older torch versions lack it.
    for key, buffer in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = buffer
    load_strict(model, state, path)
    return model.eval().requires_grad_(False)


def _as_unit_images(batch):
    """A batch from a loader ((images, labels, ...) or images; uint8 or float in [0, 1]) -> float images."""
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


class _no_tf32:
    """fp32 means fp32: on Ampere+ GPUs cuDNN would otherwise run the convolutions in TF32 and shift FID."""

    def __enter__(self):
        self.saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


@torch.inference_mode()
def inception_features(model, images, device="cpu", batch_size=50, progress=True):
    """Features [N, D] (np.float32) of every image: `images` is a DataLoader, any iterable of batches
    (tensors or (tensor, ...) tuples, uint8 or [0, 1] floats), or one tensor [N, 3, H, W]."""
    if isinstance(images, torch.Tensor):
        images = images.split(batch_size)
    model = model.to(device).eval()
    features = []
    with _no_tf32():
        for batch in tqdm(images, desc="inception features", unit="batch", disable=not progress):
            x = _as_unit_images(batch).to(device, non_blocking=True)  # [B, 3, H, W] in [0, 1]
            features.append(model(x).float().cpu())  # [B, D]
    if not features:
        raise EvalError("no images to extract features from")
    return torch.cat(features).numpy()  # [N, D]


# -------------------------------------------------------------------------------------------------------------
# Frechet distance between two Gaussians (pytorch-fid's computation, float64)
# -------------------------------------------------------------------------------------------------------------

def feature_stats(features):
    """Mean [D] and covariance [D, D] (unbiased, as np.cov) of features [N, D], in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise EvalError(f"need at least 2 feature vectors for a covariance, got shape {features.shape}")
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
        raise EvalError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
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
            raise EvalError(f"sqrt(sigma1 sigma2) has an imaginary component of {np.max(np.abs(covmean.imag)):g}; "
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
        model = cls()
        alexnet_path = find_weights(alexnet_path, ALEXNET_WEIGHTS, ALEXNET_WEIGHTS_URL, "AlexNet")
        state = read_state_dict(alexnet_path)
        # LPIPS uses the convolutional trunk only; the ImageNet classifier in the file is skipped
        features = {}
        for key, value in state.items():
            if key.startswith("features."):
                features[key[len("features."):]] = value
            elif not key.startswith("classifier."):
                raise EvalError(f"{alexnet_path} has unexpected key '{key}'")
        load_strict(model.features, features, alexnet_path)
        lin_path = find_weights(lin_path, LPIPS_LIN_WEIGHTS, LPIPS_LIN_WEIGHTS_URL, "LPIPS linear heads")
        state = read_state_dict(lin_path)
        # published names are lin{i}.model.1.weight (index 1: after a Dropout that is a no-op in eval)
        lins = {}
        for key, value in state.items():
            match = re.fullmatch(r"lin(\d)\.model\.1\.weight", key)
            if match is None:
                raise EvalError(f"{lin_path} has unexpected key '{key}'")
            lins[f"{match.group(1)}.weight"] = value
        try:
            load_strict(model.lins, lins, lin_path)
        except EvalError as e:  # report the key under its published name
            raise EvalError(re.sub(r"'(\d)\.weight'", r"'lin\1.model.1.weight'", str(e))) from None
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


def load_lpips(alexnet_path=None, lin_path=None):
    return LPIPS.from_pretrained(alexnet_path, lin_path)


def sample_pairs(labels, num_pairs, rng):
    """Index pairs (a, b), a != b, of images of the same class. num_pairs=None: every such pair once."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")  # image indices grouped by class
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    keep = (classes >= 0) & (counts >= 2)  # unlabelled images and single-image classes form no pair
    classes, starts, counts = classes[keep], starts[keep], counts[keep]
    if len(classes) == 0:
        raise EvalError("LPIPS diversity needs at least two generated images of one class")
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
        x, y = _as_unit_images(x).to(device), _as_unit_images(y).to(device)  # [B, 3, H, W] each
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
# Image sources: folders or .npz, with their class and superclass labels
# -------------------------------------------------------------------------------------------------------------

def load_hierarchy(path):
    """(superclass_names, superclass_of[class_id]) from a JSON/.npz with those two keys, or an iNaturalist
    json whose "categories" carry "id" and "supercategory"; "inat21": the built-in iNat21 table (Table 1 order)."""
    if path == "inat21":
        return list(INAT21_SUPERCLASSES), np.asarray(inat21_superclass_of(), np.int64)
    if not os.path.isfile(path):
        raise EvalError(f"hierarchy file not found: {path}")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k].tolist() for k in f.files}
        else:
            with open(path) as f:
                data = json.load(f)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise EvalError(f"cannot read hierarchy {path}: {e}") from None
    if isinstance(data, dict) and "superclass_names" in data and "superclass_of" in data:
        names = [str(n) for n in data["superclass_names"]]
        superclass_of = np.asarray(data["superclass_of"], np.int64)
    elif isinstance(data, dict) and isinstance(data.get("categories"), list) and data["categories"]:
        try:  # iNaturalist: rows in the paper's Table 1 order (= the authors' superclass ids) where known
            categories = sorted(data["categories"], key=lambda c: c["id"])
            found = {c["supercategory"] for c in categories}
            names = [n for n in INAT21_SUPERCLASSES if n in found] + sorted(found - set(INAT21_SUPERCLASSES))
            superclass_of = np.full(categories[-1]["id"] + 1, -1, np.int64)
            for c in categories:
                superclass_of[c["id"]] = names.index(c["supercategory"])
        except (KeyError, TypeError) as e:
            raise EvalError(f"{path}: iNaturalist categories need 'id' and 'supercategory' ({e!r})") from None
    else:
        raise EvalError(f"{path} has neither 'superclass_names' + 'superclass_of' nor iNaturalist 'categories'")
    if len(superclass_of) and (superclass_of.min() < -1 or superclass_of.max() >= len(names)):
        raise EvalError(f"{path}: superclass_of refers to superclasses outside superclass_names")
    return names, superclass_of


class ImageSource(Dataset):
    """Images with their labels. item i -> (uint8 tensor [3, H, W], class id or -1).

    Attributes: labels [N] (class id, -1 unknown), superclass_names (list or None), superclass_of
    (class id -> superclass id, or None), superclasses [N] (superclass id per image, -1 unknown).
    """

    def __init__(self, name, labels, superclass_names=None, superclass_of=None):
        self.name, self.labels = name, np.asarray(labels, np.int64)
        self.superclass_names, self.superclass_of = superclass_names, superclass_of
        self.superclasses = np.full(len(self.labels), -1, np.int64)
        if superclass_of is not None and (self.labels >= 0).any():
            if self.labels.max() >= len(superclass_of):
                raise EvalError(f"{name}: class id {self.labels.max()} has no superclass in the hierarchy "
                                f"({len(superclass_of)} classes)")
            known = self.labels >= 0
            self.superclasses[known] = superclass_of[self.labels[known]]

    def __len__(self):
        return len(self.labels)


class FolderImages(ImageSource):
    def __init__(self, root, files, labels, image_size, **hierarchy):
        super().__init__(root, labels, **hierarchy)
        self.files, self.image_size = files, image_size

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as image:
                image = image.convert("RGB")
                arr = np.array(center_crop_arr(image, self.image_size) if self.image_size else image)
        except (OSError, ValueError) as e:
            raise EvalError(f"cannot read image {self.files[i]}: {e}") from None
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1), int(self.labels[i])  # [3, H, W]


class NpzImages(ImageSource):
    def __init__(self, path, images, labels, **hierarchy):
        super().__init__(path, labels, **hierarchy)
        self.images = images  # [N, H, W, 3] uint8

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i]).permute(2, 0, 1), int(self.labels[i])


def _list_dir(path):
    entries = sorted((e for e in os.scandir(path) if not e.name.startswith(".")), key=lambda e: e.name)
    files = [e.path for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    return files, [e for e in entries if e.is_dir()]


def _class_ids(names):
    # class folders named by id ("17", or iNat's "00017_Animalia_...") keep that id; others: sorted index
    if all(re.match(r"\d+", n) for n in names):
        return [int(re.match(r"\d+", n).group()) for n in names]
    return list(range(len(names)))


def open_folder(root, image_size=256, hierarchy=None):
    """DIR/*.png (unlabelled), DIR/<class>/*.png (with an optional hierarchy) or DIR/<superclass>/<class>/*.png."""
    top_files, dirs = _list_dir(root)
    if top_files:
        return FolderImages(root, top_files, [-1] * len(top_files), image_size)
    level1 = [(d, *_list_dir(d.path)) for d in dirs]
    files, labels = [], []
    if level1 and all(fs for _, fs, _ in level1):  # DIR/<class>/*.png
        for (d, fs, _), class_id in zip(level1, _class_ids([d.name for d, _, _ in level1])):
            files += fs
            labels += [class_id] * len(fs)
        names, superclass_of = hierarchy if hierarchy is not None else (None, None)
        return FolderImages(root, files, labels, image_size, superclass_names=names, superclass_of=superclass_of)
    if level1 and all(subdirs and not fs for _, fs, subdirs in level1):  # DIR/<superclass>/<class>/*.png
        superclass_of = []
        for s, (d, _, subdirs) in enumerate(level1):
            for class_dir in subdirs:
                fs, _ = _list_dir(class_dir.path)
                files += fs
                labels += [len(superclass_of)] * len(fs)
                superclass_of.append(s)
        if files:
            return FolderImages(root, files, labels, image_size, superclass_names=[d.name for d, _, _ in level1],
                                superclass_of=np.array(superclass_of, np.int64))
    if not any(fs for _, fs, _ in level1) and not any(subdirs for _, _, subdirs in level1):
        raise EvalError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    raise EvalError(f"{root}: expected DIR/*.png, DIR/<class>/*.png or DIR/<superclass>/<class>/*.png")


def read_npz(path):
    """All arrays of an .npz (no pickles), or a clear error."""
    if not os.path.isfile(path):
        raise EvalError(f"file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise EvalError(f"{path} is not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise EvalError(f"cannot read {path}: {e}") from None


def open_npz(path, data, hierarchy=None):
    images = data["arr_0"]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise EvalError(f"{path}: arr_0 must be [N, H, W, 3] uint8, got {list(images.shape)} {images.dtype}")
    labels = data["labels"].astype(np.int64) if "labels" in data else np.full(len(images), -1, np.int64)
    if len(labels) != len(images):
        raise EvalError(f"{path}: {len(labels)} labels for {len(images)} images")
    names, superclass_of = None, None
    if "superclass_of" in data and "superclass_names" in data:
        names, superclass_of = [str(n) for n in data["superclass_names"]], data["superclass_of"].astype(np.int64)
    if hierarchy is not None:  # an explicit --hierarchy wins
        names, superclass_of = hierarchy
    return NpzImages(path, images, labels, superclass_names=names, superclass_of=superclass_of)


def open_images(path, image_size=256, hierarchy=None):
    """A folder or an .npz of images as an ImageSource. hierarchy: (superclass_names, superclass_of) or None."""
    if os.path.isdir(path):
        return open_folder(path, image_size, hierarchy)
    data = read_npz(path)
    if "arr_0" not in data:
        raise EvalError(f"{path} has no images (no 'arr_0' array)")
    return open_npz(path, data, hierarchy)


def _collate(batch):
    images, labels = zip(*batch)
    if len({tuple(x.shape) for x in images}) > 1:
        raise EvalError("images differ in size; pass --image-size to centre-crop and resize them")
    return torch.stack(images), torch.tensor(labels)


# -------------------------------------------------------------------------------------------------------------
# Statistics files and the Table 1 layout
# -------------------------------------------------------------------------------------------------------------
# A statistics .npz holds mu, sigma, count for all images and, when the images carry superclasses,
# mu_<s>, sigma_<s>, count_<s> for each index s into superclass_names.

def stats_from_features(features, superclasses=None, superclass_names=None):
    mu, sigma = feature_stats(features)
    stats = {"mu": mu, "sigma": sigma, "count": np.int64(len(features))}
    if superclass_names is not None and superclasses is not None and (np.asarray(superclasses) >= 0).any():
        stats["superclass_names"] = np.array(superclass_names, dtype=str)
        for s in range(len(superclass_names)):
            group = features[np.asarray(superclasses) == s]
            stats[f"count_{s}"] = np.int64(len(group))
            if len(group) >= 2:  # a covariance needs two images
                stats[f"mu_{s}"], stats[f"sigma_{s}"] = feature_stats(group)
    return stats


def compute_stats(source, model, device="cpu", batch_size=50, workers=0, progress=True):
    """Feature statistics of an ImageSource (overall and per superclass)."""
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
                        pin_memory=torch.device(device).type == "cuda")
    features = inception_features(model, loader, device, progress=progress)  # [N, 2048], dataset order
    return stats_from_features(features, source.superclasses, source.superclass_names)


def save_stats(path, stats):
    atomic_write(path, lambda f: np.savez(f, **stats))


def load_stats(path, data=None):
    data = read_npz(path) if data is None else data
    if "mu" not in data or "sigma" not in data:
        raise EvalError(f"{path} is not a statistics file (no 'mu'/'sigma'); make one with `evaluate.py stats`")
    return data


def superclass_names_of(stats):
    return [str(n) for n in stats["superclass_names"]] if "superclass_names" in stats else None


def fid_table(real, fake, lpips=None, overall_only=False):
    """Rows like paper Table 1: one per superclass of the generated images, then Overall.

    real, fake: statistics dicts. lpips: lpips_diversity's result with per_superclass keyed by the fake
    superclass index, or None. Returns [{"superclass", "fid", "lpips", "count_real", "count_fake"}].
    """
    rows = []
    fake_names = None if overall_only else superclass_names_of(fake)
    if fake_names is not None:
        real_names = superclass_names_of(real)
        if real_names is None:
            raise EvalError("the reference statistics have no per-superclass keys (mu_<s>, sigma_<s>); recompute "
                            "them from labelled images with `evaluate.py stats`, or pass --overall-only")
        present = [s for s in range(len(fake_names)) if int(fake.get(f"count_{s}", 0)) > 0]
        for s in present:
            if fake_names[s] not in real_names:
                raise EvalError(f"superclass '{fake_names[s]}' of the generated images has no reference statistics")
        # rows in the reference's order (the paper's), generated superclasses only
        for r, name in enumerate(real_names):
            if name not in fake_names or fake_names.index(name) not in present:
                continue
            s = fake_names.index(name)
            fid = math.nan
            if f"mu_{r}" in real and f"mu_{s}" in fake:
                fid = frechet_distance(real[f"mu_{r}"], real[f"sigma_{r}"], fake[f"mu_{s}"], fake[f"sigma_{s}"])
            rows.append({"superclass": name, "fid": fid,
                         "lpips": lpips["per_superclass"].get(s, math.nan) if lpips else math.nan,
                         "count_real": int(real.get(f"count_{r}", 0)), "count_fake": int(fake[f"count_{s}"])})
    rows.append({"superclass": "Overall",
                 "fid": frechet_distance(real["mu"], real["sigma"], fake["mu"], fake["sigma"]),
                 "lpips": lpips["overall"] if lpips else math.nan,
                 "count_real": int(real["count"]), "count_fake": int(fake["count"])})
    return rows


def format_table(rows):
    def num(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
    width = max(12, *(len(r["superclass"]) for r in rows))
    lines = [f"{'':<{width}}  {'FID↓':>9}  {'LPIPS↑':>7}  {'n real':>7}  {'n fake':>7}"]
    for r in rows:
        lines.append(f"{r['superclass']:<{width}}  {num(r['fid']):>9}  {num(r['lpips']):>7}  "
                     f"{r['count_real']:>7}  {r['count_fake']:>7}")
    return "\n".join(lines)


def _json_number(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def write_csv(path, rows):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["superclass", "fid", "lpips", "count_real", "count_fake"])
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if _json_number(v) is None else v) for k, v in r.items()})
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def write_json(path, rows, **meta):
    doc = {**meta, "rows": [{k: _json_number(v) for k, v in r.items()} for r in rows]}
    atomic_write(path, lambda f: f.write((json.dumps(doc, indent=2) + "\n").encode()))


# -------------------------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------------------------

def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: CUDA is not available")
    return name


def stats_of(path, args, device, model_cache):
    """Statistics (and the image source, None for a statistics file) for a folder, images .npz or stats .npz."""
    hierarchy = load_hierarchy(args.hierarchy) if args.hierarchy else None
    if not os.path.isdir(path):
        data = read_npz(path)
        if "mu" in data and "sigma" in data:
            return load_stats(path, data), None
        if "arr_0" not in data:
            raise EvalError(f"{path} has neither images ('arr_0') nor statistics ('mu', 'sigma')")
        source = open_npz(path, data, hierarchy)
    else:
        source = open_folder(path, args.image_size, hierarchy)
    if args.hierarchy is None and source.superclass_of is None and (source.labels >= 0).any():
        print(f"note: {path} has class labels but no hierarchy (--hierarchy FILE): overall statistics only",
              file=sys.stderr)
    if "model" not in model_cache:
        model_cache["model"] = load_inception(args.inception)
    print(f"{path}: {len(source)} images", file=sys.stderr)
    stats = compute_stats(source, model_cache["model"], device, args.batch_size, args.workers)
    return stats, source


def cmd_stats(args):
    device = pick_device(args.device)
    hierarchy = load_hierarchy(args.hierarchy) if args.hierarchy else None
    source = open_images(args.images, args.image_size, hierarchy)
    model = load_inception(args.inception)
    print(f"{args.images}: {len(source)} images", file=sys.stderr)
    stats = compute_stats(source, model, device, args.batch_size, args.workers)
    save_stats(args.out, stats)
    names = superclass_names_of(stats)
    detail = f", {len(names)} superclasses" if names else " (no superclass labels: overall only)"
    print(f"wrote {args.out}: {int(stats['count'])} images{detail}")


def lpips_for(source, args, device):
    """LPIPS diversity of the generated images, or None (with a note) when it cannot or should not be run."""
    if args.pairs <= 0:
        return None
    if source is None:
        print("note: LPIPS skipped: --fake is a statistics file, LPIPS needs the images", file=sys.stderr)
        return None
    if not (source.labels >= 0).any():
        print("note: LPIPS skipped: the generated images carry no class labels", file=sys.stderr)
        return None
    try:
        model = LPIPS.from_pretrained(args.lpips_alex, args.lpips_lin)
    except EvalError as e:
        if args.lpips_alex or args.lpips_lin:
            raise  # asked for explicitly: a missing file is an error
        print(f"note: LPIPS skipped: {e}", file=sys.stderr)
        return None
    superclass_of = source.superclass_of if source.superclass_names is not None else None
    return lpips_diversity(model, source, source.labels, args.pairs, args.seed, superclass_of,
                           args.batch_size, device, args.workers, progress=True)


def cmd_fid(args):
    device = pick_device(args.device)
    model_cache = {}
    real, _ = stats_of(args.real, args, device, model_cache)
    fake, fake_source = stats_of(args.fake, args, device, model_cache)
    lpips = lpips_for(fake_source, args, device)
    rows = fid_table(real, fake, lpips, args.overall_only)
    print(format_table(rows))
    meta = {"real": args.real, "fake": args.fake, "lpips_pairs": lpips["pairs"] if lpips else 0,
            "seed": args.seed}
    if args.out_csv:
        write_csv(args.out_csv, rows)
    if args.out_json:
        write_json(args.out_json, rows, **meta)


# -------------------------------------------------------------------------------------------------------------
# generate: samples for FID, spread over classes, over any number of processes (torchrun), resumable
# -------------------------------------------------------------------------------------------------------------
# Work is cut into fixed batches of (class, index) jobs; batch j is drawn by rank j % world with seed
# `seed + j`, so the images do not depend on the number of GPUs and an interrupted run resumes batch-wise.
# Images land as DIR/<superclass>/<class id>/<index>.png, the layout `stats` and `fid` read with labels.

def generation_jobs(num_classes, num_samples=None, per_class=None):
    """[(class id, index within class)]: `per_class` each, or `num_samples` spread evenly (round-robin)."""
    if per_class is not None:
        return [(c, i) for c in range(num_classes) for i in range(per_class)]
    return [(n % num_classes, n // num_classes) for n in range(num_samples)]


def job_path(out_dir, hierarchy, class_id, index):
    names = (hierarchy or {}).get("superclass_names")
    group = re.sub(r"[^\w.-]+", "_", names[hierarchy["superclass_of"][class_id]]) if names else "all"
    return os.path.join(out_dir, group, f"{class_id:05d}", f"{index:06d}.png")


def distributed_world():
    """(rank, world, device): joins the torchrun process group when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if world > 1 and not torch.distributed.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def cmd_generate(args):
    from model import CheckpointError, load_model
    from sample import UsageError, guide_labels, load_vae, sample_images
    rank, world, device = distributed_world()
    device = device if args.device == "auto" else pick_device(args.device)
    args.workers = 0 if world > 1 else args.workers
    try:
        model, info = load_model(args.ckpt, base=args.base)
        vae = load_vae(args.vae or (info["args"] or {}).get("vae")) if model.in_channels == 4 else None
        if args.guidance != "none":
            guide_labels(model, torch.zeros(1, dtype=torch.long), args.guidance)   # this table has the guide rows?
    except (CheckpointError, UsageError) as e:
        raise EvalError(str(e)) from None
    hierarchy, K = info["hierarchy"], model.y_embedder.num_classes
    if (args.num_samples is None) == (args.per_class is None):
        raise EvalError("give exactly one of --num-samples and --per-class")
    jobs = generation_jobs(K, args.num_samples, args.per_class)
    batches = [jobs[i:i + args.batch_size] for i in range(0, len(jobs), args.batch_size)]
    mine = [j for j in range(rank, len(batches), world)
            if not all(os.path.isfile(job_path(args.out, hierarchy, c, i)) for c, i in batches[j])]
    if rank == 0:
        print(f"{len(jobs)} images in {len(batches)} batches over {world} process(es); rank 0 has {len(mine)} to do",
              file=sys.stderr)
    for j in tqdm(mine, desc=f"generate (rank {rank})", disable=rank != 0):  # --batch-size: images per batch
        classes = [c for c, _ in batches[j]]
        images = sample_images(model, classes, args.guidance, args.cfg_scale, args.sampler, args.steps, vae,
                               args.seed + j, device, args.precision, progress=False)   # (B, H, W, 3) uint8
        for (c, i), image in zip(batches[j], images.numpy()):
            atomic_write(job_path(args.out, hierarchy, c, i), lambda f: Image.fromarray(image).save(f, format="PNG"))
    if world > 1:
        torch.distributed.barrier()
    if rank == 0 and args.npz:
        source = open_folder(args.out, image_size=0)
        arrays = np.stack([source[i][0].permute(1, 2, 0).numpy() for i in range(len(source))])
        labels = np.array([int(os.path.basename(os.path.dirname(f))) for f in source.files])
        extra = {}
        if hierarchy:
            extra = dict(superclass_names=np.array(hierarchy["superclass_names"]),
                         superclass_of=np.asarray(hierarchy["superclass_of"], np.int64))
        atomic_write(args.npz, lambda f: np.savez(f, arr_0=arrays, labels=labels, **extra))
        print(f"wrote {args.npz}: {len(arrays)} images", file=sys.stderr)
    if rank == 0 and args.fid:
        args.real, args.fake, args.hierarchy, args.image_size = args.fid, args.out, None, 0
        cmd_fid(args)


# -------------------------------------------------------------------------------------------------------------
# toy: paper Tables 1-2 in miniature, offline, on the built-in toy data
# -------------------------------------------------------------------------------------------------------------
# A small CNN classifier trained on real toy images (cached) stands in for the Inception network: it
# says whether a sample shows the requested subclass and superclass, gives features for a Frechet distance,
# and (unit-normalised feature maps, LPIPS-style) a distance between two samples of the same class.

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


def toy_classifier(image_size, cache_dir="results", epochs=4, seed=0):
    """The classifier for toy images of `image_size`, trained once (a few CPU seconds) and cached."""
    from data import ToyDataset
    path = os.path.join(cache_dir, f"toy_classifier_{image_size}px.pt")
    train_set = ToyDataset(image_size=image_size, split="train", seed=seed)
    net = ToyClassifier(train_set.num_classes)
    if os.path.isfile(path):
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval()
    torch.manual_seed(seed)
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


def cmd_toy(args):
    from data import ToyDataset
    from model import CheckpointError, load_model
    from sample import UsageError, sample_images
    rows = []
    for path in args.ckpt:
        try:
            model, info = load_model(path)
        except CheckpointError as e:
            raise EvalError(str(e)) from None
        size = info["config"]["image_size"]
        real = ToyDataset(image_size=size, split="val", seed=args.seed, flip=False)   # the FID reference
        if not info["config"].get("pixel_space") or info["hierarchy"] != real.hierarchy():
            raise EvalError(f"{path} is not a fine-grained toy checkpoint (train one with --data toy)")
        net = toy_classifier(size, args.cache_dir, args.classifier_epochs)
        with torch.no_grad():
            real_features = net(toy_images(real)[0])[1].numpy()
        if not rows:   # held-out real images: the best a sampler could score
            held_out = ToyDataset(image_size=size, split="test", seed=args.seed, flip=False, images_per_class=args.per_class)
            rows.append(dict(ckpt="real toy images (test)", method="-", guidance="-",
                             **toy_metrics(net, *toy_images(held_out), real.superclass_of, real_features, args.pairs, args.seed)))
        y = torch.arange(real.num_classes).repeat_interleave(args.per_class)
        method = info["config"].get("method", "?")
        for guidance in args.guidance:
            try:
                images = sample_images(model, y, guidance, args.cfg_scale, args.sampler, args.steps, seed=args.seed,
                                       progress=False)
            except UsageError:
                continue                                   # this table has no row for that guide
            x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0   # (N, 3, H, W) in [-1, 1]
            rows.append(dict(ckpt=checkpoint_label(path), method=method, guidance=guidance,
                             **toy_metrics(net, x, y, real.superclass_of, real_features, args.pairs, args.seed)))
    header = f"{'checkpoint':<28}{'method':<15}{'guidance':<12}{'sub acc↑':>9}{'super acc↑':>11}{'FID(cls)↓':>10}{'diversity↑':>11}"
    print(header)
    for r in rows:
        print(f"{r['ckpt'][:27]:<28}{r['method']:<15}{r['guidance']:<12}{r['sub_acc']:>9.3f}{r['super_acc']:>11.3f}"
              f"{r['fid']:>10.2f}{r['diversity']:>11.3f}")
    if args.out_json:
        atomic_write(args.out_json, lambda f: f.write(json.dumps(rows, indent=1).encode()))


def _add_extraction_args(p):
    p.add_argument("--inception", default=None, help=f"path of {FID_WEIGHTS} (default: $TORCH_HOME/hub/"
                                                     "checkpoints/, then ./pretrained/)")
    p.add_argument("--hierarchy", default=None,
                   help="JSON/.npz with superclass_names and superclass_of[class_id], an iNaturalist json, or "
                        "'inat21' (the built-in table), for images labelled by class only")
    p.add_argument("--image-size", type=int, default=256,
                   help="folder images are centre-cropped and resized to this (ADM/DiT preprocessing); 0: as is")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def _add_fid_args(p):
    p.add_argument("--overall-only", action="store_true", help="skip the per-superclass rows")
    p.add_argument("--lpips-alex", default=None, help=f"path of {ALEXNET_WEIGHTS} ({ALEXNET_WEIGHTS_URL})")
    p.add_argument("--lpips-lin", default=None,
                   help=f"path of LPIPS v0.1 {LPIPS_LIN_WEIGHTS} ({LPIPS_LIN_WEIGHTS_URL})")
    p.add_argument("--pairs", type=int, default=1000, help="random same-class pairs for LPIPS (0: no LPIPS)")
    p.add_argument("--seed", type=int, default=0, help="seed of the LPIPS pairs (generate: and of the noise)")
    p.add_argument("--out-csv", default=None)
    p.add_argument("--out-json", default=None)


def main(argv=None):
    parser = argparse.ArgumentParser(description="FID (overall, per superclass) and LPIPS diversity for FineDiffusion "
                                                 "(paper §4.3, Tables 1, 3, 4).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stats", help="reference Inception statistics (mu, sigma, count; per superclass) of images")
    p.add_argument("--images", required=True, help="folder (DIR/<superclass>/<class>/*.png, DIR/<class>/*.png, "
                                                   "DIR/*.png) or .npz with arr_0 [N,H,W,3] uint8")
    p.add_argument("--out", required=True, help="statistics .npz to write")
    _add_extraction_args(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("fid", help="FID and LPIPS of generated images against reference statistics (Table 1)")
    p.add_argument("--real", required=True, help="statistics .npz from `stats` (or images, computed on the fly)")
    p.add_argument("--fake", required=True, help="generated images: folder or .npz (or a statistics .npz)")
    _add_extraction_args(p)
    _add_fid_args(p)
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("generate", help="samples for FID, spread over classes; torchrun for several GPUs; resumable")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--base", default=None, help="base checkpoint of a delta checkpoint")
    p.add_argument("--vae", default=None, help="SD VAE folder or file, for latent models")
    p.add_argument("--out", required=True, help="folder: OUT/<superclass>/<class>/<index>.png")
    p.add_argument("--num-samples", type=int, default=None, help="in all, spread evenly over the classes")
    p.add_argument("--per-class", type=int, default=None, help="or this many of every class")
    p.add_argument("--guidance", choices=["superclass", "null", "none"], default="superclass")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--npz", default=None, help="also pack all images into this .npz (arr_0, labels, hierarchy)")
    p.add_argument("--fid", default=None, help="reference statistics .npz: compute FID / LPIPS when done")
    _add_extraction_args(p)
    _add_fid_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("toy", help="offline paper Tables 1-2 in miniature: accuracy, FID, diversity on the toy data")
    p.add_argument("--ckpt", nargs="+", required=True, help="toy checkpoints (e.g. one per tuning method)")
    p.add_argument("--guidance", nargs="+", choices=["none", "null", "superclass"], default=["none", "null", "superclass"])
    p.add_argument("--per-class", type=int, default=16, help="samples of each class")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--pairs", type=int, default=500, help="same-class pairs for the diversity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="results", help="where the toy classifier is cached")
    p.add_argument("--classifier-epochs", type=int, default=4, help="training of the toy classifier, on first use")
    p.add_argument("--out-json", default=None)
    p.set_defaults(func=cmd_toy)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except EvalError as e:
        # An error raised in a DataLoader worker comes back wrapped with the worker's traceback text:
        # keep only its last line, the message itself.
        message = str(e).strip().splitlines()[-1]
        message = re.sub(r"^\S*EvalError: ", "", message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""What pytorch-fid is: the FID Inception-v3, a port of the TF 2015-12-05 graph behind every published FID, and the
Frechet distance of Gaussians fitted to its features (pytorch-fid's computation, float64); and the other metrics the
field computes from the same network's one pass: sFID, KID, Inception Score, precision and recall.

`load_inception(path)` loads the published pt_inception-2015-12-05-6726825d.pth as it is (torchvision Inception3 key
names, a 1008-way fc) and maps images in [0, 1] (N, 3, H, W), any size, to 2048-d pool features: a bilinear resize to
299, scaled to [-1, 1]; `forward_all` gives the fc's logits and sFID's spatial features from the same pass. FID numbers
are only comparable when every detail of the feature extractor matches the reference, so the TF graph's quirks are
reproduced here; its values equal pytorch-fid's for the same weights and images, and KID, IS and precision/recall
equal torch-fidelity's, sFID ADM's evaluator's, for the same features (test_all.py pins them). A published network,
kept apart from evaluate.py as the SD VAE is from model.py.
"""
import math
import re
import warnings

import numpy as np
import scipy
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE
from scipy import linalg
from tqdm import tqdm

from hardening import UserError, file_sha256, find_weights, load_strict, read_checkpoint

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"

# The TF graph differs from torchvision's Inception3 in its pool branches: TF's 'SAME' average pooling divides by the
# number of real pixels under the window (count_include_pad=False), and the last block max-pools; FID moves measurably
# without them. Convolutions, their BatchNorm (eps 0.001) and the parameter names are torchvision's: we build on them.

def tf_avg_pool(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    """Mixed_5b/5c/5d: 1x1 | 5x5 | double 3x3 | TF avg pool + 1x1."""

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(tf_avg_pool(x))], dim=1)


class FIDInceptionC(InceptionC):
    """Mixed_6b-6e: 1x1 | factorised 7x7 | double factorised 7x7 | TF avg pool + 1x1."""

    def forward(self, x):
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl)),
                          self.branch_pool(tf_avg_pool(x))], dim=1)


class FIDInceptionE(InceptionE):
    """Mixed_7b (TF avg pool), Mixed_7c (max pool, a TF quirk): 1x1 | split 3x3 | split double 3x3 | pool + 1x1."""

    def __init__(self, in_channels, pool):
        super().__init__(in_channels)
        self.pool = pool                                    # "avg" or "max"

    def forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3),
                          self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl),
                          self.branch_pool(pooled)], dim=1)


class FIDInceptionV3(nn.Module):
    """Images in [0, 1], (N, 3, H, W) of any size -> 2048-d pool_3 features ((N, 2048)); `forward_all`: with the
    logits and the spatial features of the same pass."""

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
        # The graph's 1008-way classifier: the Inception Score reads its logits.
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):  # x: (N, 3, H, W) in [0, 1]
        return self.forward_all(x)[0]  # (N, 2048)

    def forward_all(self, x):  # x: (N, 3, H, W) in [0, 1]
        """-> pool features (N, 2048), logits (N, 1008) and spatial features (N, 2023), from one pass."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape [N, 3, H, W], got {list(x.shape)}")
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # (N, 3, 299, 299)
        x = 2 * x - 1  # the TF graph expects [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 32, 149, 149) -> (N, 64, 147, 147)
        x = self.Conv2d_3b_1x1(F.max_pool2d(x, kernel_size=3, stride=2))  # (N, 64, 73, 73) -> (N, 80, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(x), kernel_size=3, stride=2)  # (N, 192, 71, 71) -> (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 256, 35, 35) -> (N, 288, 35, 35) twice
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x))))  # (N, 768, 17, 17) each
        spatial = spatial_features(x)  # (N, 2023)
        x = self.Mixed_6e(x)  # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 1280, 8, 8) -> (N, 2048, 8, 8) twice
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 2048)
        # IS reads the logits without the fc's bias, over all 1008 classes: torch-fidelity's "logits_unbiased", and
        # ADM's evaluator multiplies by the weights alone too.
        return pool, pool @ self.fc.weight.T, spatial  # (N, 2048), (N, 1008), (N, 2023)


def spatial_features(mixed_6d):
    """sFID's features (Nash et al. 2021, as ADM's evaluator takes them): the first 7 channels of the TF graph's
    tensor `mixed_6/conv:0` (17x17), flattened in TF's (H, W, C) order: Mixed_6d's output (N, C, 17, 17) -> (N, 2023).

    The correspondence, and its evidence. The graph names its blocks mixed, mixed_1, ..., mixed_10 in order (Mixed_5b
    ... Mixed_7c), so mixed_6 is Mixed_6d; in a block, `conv` is the 1x1 branch: torch-fidelity's map of the graph's
    weights to these names (utils/util_convert_inception_weights.py) sends mixed_6/conv/conv2d_params and
    mixed_6/conv/batchnorm to Mixed_6d.branch1x1.conv and .bn. A layer's ops in the graph are <name>/Conv2D,
    <name>/batchnorm, <name>/CheckNumerics, <name>/control_dependency and <name>, no Relu op besides: the op named
    after the layer is its ReLU, so the tensor is branch1x1's output (the op's type is inferred from that list: we did
    not run the TF graph). Mixed_6d concatenates branch1x1 first, so the block's first 7 channels are its first 7.
    The Frechet distance does not depend on the order of the dimensions; TF's is kept all the same."""
    return mixed_6d[:, :7].permute(0, 2, 3, 1).flatten(1)  # (N, 7, 17, 17) -> (N, 17, 17, 7) -> (N, 2023)


def load_inception(path=None):
    """The FID Inception with the published weights `pt_inception-2015-12-05-6726825d.pth`, in eval mode."""
    path = find_weights(path, FID_WEIGHTS)
    state = read_checkpoint(path)
    model = FIDInceptionV3()
    # BatchNorm's step counter is irrelevant in eval; state dicts from older torch versions lack it: take the model's.
    counters = {k: b for k, b in model.state_dict().items() if k.endswith("num_batches_tracked")}
    load_strict(model, {**counters, **state}, path)
    model.weights_sha256 = file_sha256(path)      # what statistics record of the network that described them
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
def inception_features(model, images, device="cpu", batch_size=50, progress=True, count=None):
    """What one Inception pass gives of every image: {"pool": (N, 2048), "logits": (N, 1008), "spatial": (N, 2023)}
    (np.float32). `images` is one tensor (N, 3, H, W), or an iterable of batches (a DataLoader of (images, labels)) and
    `count`, the most images they hold; uint8 or floats in [0, 1]. The arrays are made once, at `count` rows, and
    filled: 20 KB an image, whatever the images' size."""
    if isinstance(images, torch.Tensor):
        images, count = images.split(batch_size), len(images)
    model = model.to(device).eval()
    out, n = None, 0
    with _no_tf32():
        for batch in tqdm(images, desc="inception features", unit="batch", disable=not progress):
            x = unit_images(batch[0] if isinstance(batch, (tuple, list)) else batch)   # (B, 3, H, W) in [0, 1]
            got = [o.float().cpu().numpy() for o in model.forward_all(x.to(device, non_blocking=True))]
            if out is None:
                out = [np.empty((count, o.shape[1]), np.float32) for o in got]
            for array, o in zip(out, got):
                array[n:n + len(o)] = o
            n += len(x)
    if not n:
        raise UserError("no images to extract features from")
    return {name: array[:n] for name, array in zip(("pool", "logits", "spatial"), out)}


# The Frechet distance of two Gaussians fitted to features: pytorch-fid's computation, in float64

def feature_stats(features, rows=4096):
    """Mean (D,) and covariance (D, D) (unbiased, as np.cov) of features (N, D), in float64, `rows` at a time: a
    float64 copy of all N would cost 16 KB an image at D = 2048."""
    if np.ndim(features) != 2 or len(features) < 2:
        raise UserError(f"need at least 2 feature vectors for a covariance, got shape {np.shape(features)}")
    n = len(features)
    blocks = lambda: (np.asarray(features[i:i + rows], np.float64) for i in range(0, n, rows))  # (rows, D) each
    mu = sum(b.sum(axis=0) for b in blocks()) / n
    return mu, sum((b - mu).T @ (b - mu) for b in blocks()) / (n - 1)


_SCIPY_VERSION = tuple(int(v) for v in re.findall(r"\d+", scipy.__version__)[:2])


def _sqrtm(a):
    # pytorch-fid calls sqrtm(disp=False); SciPy 1.16 deprecates `disp` (removed in 1.18) without changing
    # the square root itself, so pass it only where it exists and means "stay quiet".
    return linalg.sqrtm(a, disp=False)[0] if _SCIPY_VERSION < (1, 16) else linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), as pytorch-fid computes it."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise UserError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                        f"sigma {sigma1.shape} vs {sigma2.shape}")
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
    return float((mu1 - mu2).dot(mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# KID, IS, precision and recall: torch-fidelity's definitions and defaults (its rng_seed 2020 draws the same subsets)

KID_SUBSETS, KID_SUBSET_SIZE, IS_SPLITS, PR_NEIGHBOURS, SEED = 100, 1000, 10, 3, 2020


def kernel_inception_distance(fake, real, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=SEED):
    """KID (Binkowski et al. 2018): the unbiased estimate of MMD^2 between fake and real features (N, D) under the
    kernel k(x, y) = (x.y / D + 1)^3, its mean and std over `subsets` pairs of random subsets, drawn as torch-fidelity
    draws them (fake, then real, without replacement). A side with fewer than `subset_size` images gives subsets of all
    of them. Float64 throughout (torch-fidelity computes in its features' float32). -> (mean, std, subset size used)."""
    fake, real = np.asarray(fake), np.asarray(real)   # (N, D), (M, D): not copied, but indexable by subsets
    m = min(subset_size, len(fake), len(real))
    if m < 2:                                   # the unbiased estimate needs two of each
        return math.nan, math.nan, m
    rng = np.random.RandomState(seed)
    subset = lambda x: np.asarray(x[rng.choice(len(x), m, replace=False)], np.float64)  # (m, D)
    mmd = [mmd2_unbiased(subset(fake), subset(real)) for _ in range(subsets)]
    return float(np.mean(mmd)), float(np.std(mmd)), m


def mmd2_unbiased(x, y):
    """MMD^2 of two samples (m, D) each, unbiased: the within-sample kernel sums leave out k(x_i, x_i)."""
    m, d = x.shape
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))   # (m, m) each
    return (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.sum() / m ** 2


def inception_score(logits, splits=IS_SPLITS, seed=SEED):
    """Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), p(y) the mean over the images of one of
    `splits` parts, its mean and std over the parts, as torch-fidelity computes it (images shuffled first, float64).
    logits: (N, C), forward_all's. -> (mean, std); NaN with fewer images than parts."""
    if len(logits) < splits:
        return math.nan, math.nan
    logits, n, order = np.asarray(logits), len(logits), np.random.RandomState(seed).permutation(len(logits))
    scores = []
    for i in range(splits):                # a part at a time in float64: all N at once would cost 24 KB an image
        part = torch.as_tensor(logits[order[i * n // splits:(i + 1) * n // splits]], dtype=torch.float64)
        p = part.softmax(1)  # (n / splits, C)
        kl = (p * (part.log_softmax(1) - p.mean(0, keepdim=True).log())).sum(1)  # (n / splits,)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


@torch.inference_mode()
def precision_recall(real, fake, k=PR_NEIGHBOURS, device="cpu", max_distances=2 ** 25):
    """Improved precision and recall (Kynkaanniemi et al. 2019) of features (N, D): precision, the share of fake ones
    within the k-NN ball of some real one; recall, the share of real ones within the ball of some fake one; a ball's
    radius is the distance to the k-th nearest other feature of its own set. Every feature, as torch-fidelity's prc
    (k = 3; no subsampling), in the features' own dtype; on the Inception pool features as ADM's evaluator
    (torch-fidelity's default network for prc is VGG-16, the paper's). Distances are made for as many rows at once as
    keep `max_distances` of them (128 MB in float32), where torch-fidelity takes 10,000 rows (4 GB against 100,000
    features). -> (precision, recall)."""
    real, fake = torch.as_tensor(real, device=device), torch.as_tensor(fake, device=device)
    if min(len(real), len(fake)) <= k:
        return math.nan, math.nan
    with _no_tf32():
        return (inside_balls(fake, real, knn_radii(real, k, max_distances), max_distances),
                inside_balls(real, fake, knn_radii(fake, k, max_distances), max_distances))


def knn_radii(x, k, max_distances):
    """The distance of each of x (N, D) to its k-th nearest neighbour in x, itself (distance 0) not counted: (N,)."""
    rows = x.split(max(1, max_distances // len(x)))   # (B, D) each, B x N distances at a time
    return torch.cat([torch.cdist(r, x).kthvalue(k + 1, dim=1).values for r in rows])


def inside_balls(x, centres, radii, max_distances):
    """The share of x (N, D) within radii[j] of some centres[j] (M, D)."""
    rows = x.split(max(1, max_distances // len(centres)))
    inside = [(torch.cdist(r, centres) <= radii).any(dim=1) for r in rows]  # (B,) each
    return torch.cat(inside).double().mean().item()

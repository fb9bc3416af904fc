"""The FineDiffusion model: a Diffusion Transformer (DiT) with a TieredEmbedder, the four tuning methods of
paper Table 2, checkpoints, and the Stable Diffusion VAE that DiT works in.

    python model.py          # prints paper Table 2 (parameter counts) for DiT-XL/2, 256 px, iNat21

Read it in this order:
  §3.1    DiT (Peebles & Xie, 2023): patchify -> N adaLN-Zero blocks -> final layer -> unpatchify.
  §3.2.1  TieredEmbedder: one label table with subclass rows [0, K), superclass rows [K, K+S) and, for the
          standard-CFG baselines, one null row K+S. While training, a label is replaced by its superclass
          row with probability SUPERCLASS_PROB, which trains eps(x_t | c_p), the guide of eq. 1.
  §3.2.2  DiT.forward_with_cfg: fine-grained classifier-free guidance, eq. 1.
  Table 2 is_trainable / set_trainable: which tensors `full`, `bitfit`, `difffit` and `finediffusion` train.
Then, in bounded sections: checkpoints (one schema, one writer, one loader), files and user errors, and
the SD VAE (AutoencoderKL) with its .safetensors reader.

State-dict keys and shapes are those of the official DiT release, so `DiT-XL-2-256x256.pt` and the
authors' `FineDiffusion-iNat.pt` load as they are.
"""
import argparse
import errno
import glob
import hashlib
import io
import json
import math
import os
import re
import struct
import sys
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Label substitution while training (§3.2.1). The paper gives no number: 0.1 is the authors' code's
# `class_dropout_prob`, which there swaps a label for its superclass row.
SUPERCLASS_PROB = 0.1
# Standard CFG's label dropout to the null row: the official DiT's `class_dropout_prob`.
NULL_PROB = 0.1
# SD-VAE latents times 0.18215 have unit variance (LDM, Rombach et al. 2022); DiT trains on the scaled latents.
LATENT_SCALE = 0.18215
# The SD VAE's latents have 4 channels: a latent DiT's input (a pixel-space DiT's is 3, RGB).
LATENT_CHANNELS = 4


# ----------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------

def modulate(x, shift, scale):
    # adaLN: per-sample scale and shift of a token sequence. x: (N, T, D), shift/scale: (N, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Diffusion step t -> sinusoidal features (256) -> 2-layer MLP -> (N, D)."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]                              # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)          # (N, 2*half)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))  # (N, D)


class TieredEmbedder(nn.Module):
    """Paper §3.2.1: one table of K subclass rows, S superclass rows and (optionally) one null row.

    Row layout: [0, K) subclasses, [K, K+S) superclasses, K+S null. With S = 0 and a null row this is the
    official DiT LabelEmbedder (key `embedding_table`, K+1 rows), which the baselines use.
    In training, each subclass label is replaced by its superclass row with probability `superclass_prob`
    (so the network also learns eps(x_t | c_p), the guide of eq. 1) and by the null row with `null_prob`
    (standard CFG's eps(x_t | ∅)). In eval mode labels pass through untouched.
    """

    def __init__(self, num_classes, hidden_size, num_superclasses=0, superclass_of=None, null_class=True,
                 superclass_prob=0.0, null_prob=0.0):
        super().__init__()
        self.num_classes, self.num_superclasses, self.null_class = num_classes, num_superclasses, null_class
        self.superclass_prob, self.null_prob = superclass_prob, null_prob
        rows = num_classes + num_superclasses + int(null_class)
        self.embedding_table = nn.Embedding(rows, hidden_size)
        # superclass_of[c] in [0, S): a buffer so it moves with the model; not saved (the hierarchy is data).
        sc = torch.as_tensor(superclass_of if superclass_of is not None else [0] * num_classes, dtype=torch.long)
        self.register_buffer("superclass_of", sc, persistent=False)

    @property
    def null_id(self):
        return self.num_classes + self.num_superclasses

    def superclass_ids(self, y):
        """Table rows of the superclasses of subclass labels y (the c_p of eq. 1)."""
        return self.num_classes + self.superclass_of[y]

    def substitute(self, y):
        """Training-time label substitution: y -> superclass row (p = superclass_prob), -> null (p = null_prob)."""
        is_sub = y < self.num_classes                            # labels that are already rows stay as they are
        if self.num_superclasses and self.superclass_prob > 0:
            to_super = (torch.rand(y.shape[0], device=y.device) < self.superclass_prob) & is_sub
            y = torch.where(to_super, self.superclass_ids(y.clamp(max=self.num_classes - 1)), y)
        if self.null_class and self.null_prob > 0:
            to_null = torch.rand(y.shape[0], device=y.device) < self.null_prob
            y = torch.where(to_null, torch.full_like(y, self.null_id), y)
        return y

    def forward(self, y, train):
        if train:
            y = self.substitute(y)
        return self.embedding_table(y)                           # (N, D)


# ----------------------------------------------------------------------------------------------------------
# Transformer blocks (the official DiT layout, with optional LayerNorm affine and DiffFit gates)
# ----------------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with T = (H/p)*(W/p): a p x p conv with stride p."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)          # (N, T, D)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                  # each (N, heads, T, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)              # (N, heads, T, D/heads)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def layer_norm(hidden_size, affine):
    # The official DiT has no LayerNorm affine (adaLN provides scale/shift); FineDiffusion and DiffFit add
    # one (weight 1, bias 0 = identity) so that the "normalization terms" of §3.2.1 exist to be tuned.
    return nn.LayerNorm(hidden_size, elementwise_affine=affine, eps=1e-6)


class DiTBlock(nn.Module):
    """adaLN-Zero block. `difffit_gates` adds DiffFit's learnable scalar gamma per branch (init 1)."""

    def __init__(self, hidden_size, num_heads, norm_affine=False, difffit_gates=False):
        super().__init__()
        self.norm1 = layer_norm(hidden_size, norm_affine)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = layer_norm(hidden_size, norm_affine)
        self.mlp = Mlp(hidden_size, 4 * hidden_size)            # mlp_ratio 4 in every official configuration
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        if difffit_gates:
            self.gamma1 = nn.Parameter(torch.ones(1))
            self.gamma2 = nn.Parameter(torch.ones(1))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        attn = gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if hasattr(self, "gamma1"):
            attn = self.gamma1 * attn
        x = x + attn
        mlp = gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if hasattr(self, "gamma2"):
            mlp = self.gamma2 * mlp
        return x + mlp                                           # (N, T, D)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels, norm_affine=False):
        super().__init__()
        self.norm_final = layer_norm(hidden_size, norm_affine)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))   # (N, T, p*p*C_out)


# ----------------------------------------------------------------------------------------------------------
# DiT
# ----------------------------------------------------------------------------------------------------------

class DiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 num_classes=1000, num_superclasses=0, superclass_of=None, null_class=True, superclass_prob=None,
                 null_prob=None, learn_sigma=True, norm_affine=False, difffit_gates=False):
        super().__init__()
        # Substitution defaults follow from which rows exist (a table with both trains both guides).
        if superclass_prob is None:
            superclass_prob = SUPERCLASS_PROB if num_superclasses else 0.0
        if null_prob is None:
            null_prob = NULL_PROB if null_class else 0.0
        self.in_channels, self.patch_size, self.num_heads = in_channels, patch_size, num_heads
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.grad_checkpointing = False                          # train.py --grad-checkpointing: less memory

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = TieredEmbedder(num_classes, hidden_size, num_superclasses, superclass_of, null_class,
                                         superclass_prob, null_prob)
        num_patches = (input_size // patch_size) ** 2
        # Fixed sin-cos positions: a Parameter (for the official key `pos_embed`) that is never trained.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, norm_affine, difffit_gates)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm_affine)
        self.initialize_weights()

    @property
    def input_size(self):
        return int(self.pos_embed.shape[1] ** 0.5) * self.patch_size   # latent (or pixel) side length

    def initialize_weights(self):
        # As the official DiT: xavier linears, zero biases, adaLN-Zero (every block starts as the identity).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0)
        if self.pos_embed.is_meta:
            return
        grid = int(self.pos_embed.shape[1] ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                       self.final_layer.linear]:
            nn.init.constant_(layer.weight, 0)
            nn.init.constant_(layer.bias, 0)

    def unpatchify(self, x):
        # (N, T, p*p*C) -> (N, C, H, W)
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        """x: (N, C, H, W) noisy input x_t, t: (N,) steps, y: (N,) label-table rows -> (N, C_out, H, W)."""
        x = self.x_embedder(x) + self.pos_embed                   # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)                                  # (N, T, D)
        x = self.final_layer(x, c)                               # (N, T, p*p*C_out)
        return self.unpatchify(x)                                # (N, C_out, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=3):
        """Classifier-free guidance on a batch [conditional half; guide half].

        The guide half's labels choose the guidance: null rows give standard CFG,
        eps = eps(x_t|∅) + w (eps(x_t|c) - eps(x_t|∅)); superclass rows give fine-grained CFG, paper eq. 1,
        eps = eps(x_t|c_p) + w (eps(x_t|c) - eps(x_t|c_p)). Both halves share the same x_t (the first half).
        As the official DiT release, guidance touches only the first `guide_channels` = 3 output channels by
        default (its published FIDs depend on it); `guide_channels=None` guides all eps channels.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)  # (2n, C_out, H, W)
        g = self.in_channels if guide_channels is None else guide_channels
        eps, rest = out[:, :g], out[:, g:]
        cond_eps, guide_eps = eps.chunk(2, dim=0)
        half_eps = guide_eps + cfg_scale * (cond_eps - guide_eps)  # eq. 1
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim) fixed positions: half the channels encode the row, half the column."""
    coords = np.arange(grid_size, dtype=np.float32)
    col, row = np.meshgrid(coords, coords)                       # each (gs, gs), token order row-major
    # The official release puts the column code first (its `emb_h` is built from meshgrid(w, h)[0]).
    return np.concatenate([get_1d_sincos_pos_embed(embed_dim // 2, col.reshape(-1)),
                           get_1d_sincos_pos_embed(embed_dim // 2, row.reshape(-1))], axis=1)


def get_1d_sincos_pos_embed(embed_dim, pos):
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))  # (D/2,)
    out = np.outer(pos, omega)                                    # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)     # (M, D)


# (depth, width, heads) of the four official sizes, each with patch 2, 4 and 8, plus a tiny T for CPU demos
# and tests: 15 configurations.
_CONFIGS = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "T": (4, 128, 4)}


def _dit_config(size, patch):
    depth, hidden, heads = _CONFIGS[size]
    return lambda **kw: DiT(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **kw)


DiT_models = {f"DiT-{s}/{p}": _dit_config(s, p) for s in ["XL", "L", "B", "S", "T"] for p in [2, 4, 8]}


# ----------------------------------------------------------------------------------------------------------
# Tuning methods (paper Table 2)
# ----------------------------------------------------------------------------------------------------------

METHODS = ("full", "bitfit", "difffit", "finediffusion")
TABLE = "y_embedder.embedding_table.weight"


def build_model(name, image_size, num_classes, num_superclasses=0, method="finediffusion", superclass_of=None,
                pixel_space=False, **kw):
    """A fresh DiT laid out for a tuning method.

    `finediffusion`: K+S label rows (no null row, as the authors' checkpoints) and LayerNorm affine.
    `full`, `bitfit`: the standard K+1 table with null dropout 0.1. `difffit`: that, plus LayerNorm affine
    and one scalar gate per branch. `image_size` is in pixels: the DiT sees 8x smaller VAE latents, or the
    pixels themselves (3 channels) with `pixel_space=True` (the built-in toy data).
    """
    if name not in DiT_models:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(DiT_models)}")
    if method not in METHODS:
        raise UserError(f"unknown tuning method {method!r}: choose one of {', '.join(METHODS)}")
    tiered = method == "finediffusion"
    kw.setdefault("null_class", not tiered)
    kw.setdefault("norm_affine", method in ("difffit", "finediffusion"))
    kw.setdefault("difffit_gates", method == "difffit")
    input_size, in_channels = (image_size, 3) if pixel_space else (image_size // 8, LATENT_CHANNELS)
    return DiT_models[name](input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                            num_superclasses=num_superclasses if tiered else 0,
                            superclass_of=superclass_of if tiered else None, **kw)


def check_image_size(name, image_size, pixel_space):
    """A DiT cuts its input (the pixels, or VAE latents 8x smaller) into patch x patch tokens: the image side must
    be a positive multiple of the patch (times 8 in latent space), else training fails at step 1 on shapes."""
    unit = int(name.rsplit("/", 1)[1]) * (1 if pixel_space else 8)
    if image_size < 1 or image_size % unit:
        space = "pixels" if pixel_space else "VAE latents 8x smaller than the image"
        raise UserError(f"--image-size {image_size}: {name} on {space} needs a positive multiple of {unit}")


def is_trainable(name, method):
    """Does `method` train the tensor called `name`? (pos_embed is fixed sin-cos and never trained.)"""
    if name == "pos_embed":
        return False
    if method == "full":
        return True
    table = name == TABLE
    bias = name.endswith(".bias")
    norm = ".norm" in name                                   # norm1, norm2, norm_final: LayerNorm affine
    gate = name.endswith(("gamma1", "gamma2"))
    if method == "bitfit":
        return table or bias
    if method == "difffit":
        return table or bias or norm or gate
    if method == "finediffusion":
        return table or bias or norm
    raise UserError(f"unknown tuning method {method!r}: choose one of {', '.join(METHODS)}")


def set_trainable(model, method):
    """Freeze everything `method` does not train. Returns (trainable, total) parameter counts."""
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name, method))
        if name != "pos_embed":
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def count_table2(name="DiT-XL/2", image_size=256, num_classes=10000, num_superclasses=11):
    """Rows of paper Table 2: (method, trainable, total), counted on the meta device (no allocation)."""
    rows = []
    with torch.device("meta"):
        for method in METHODS:
            model = build_model(name, image_size, num_classes, num_superclasses, method)
            rows.append((method, *set_trainable(model, method)))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Precision (train.py and sample.py)
# ----------------------------------------------------------------------------------------------------------

def precision_context(precision, device_type):
    """The autocast context of --precision: fp16 or bf16 activations (fp32 weights); none for fp32 / tf32.
    fp16 is the V100s' precision; on a CPU it runs where this torch supports it, so that path is testable."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    if dtype is None:
        return nullcontext()
    with warnings.catch_warnings(record=True) as refused:   # an unsupported dtype: torch warns, then disables
        warnings.simplefilter("always")
        context = torch.autocast(device_type, dtype=dtype)
    if refused:
        raise UserError(f"--precision {precision}: torch {torch.__version__} has no {precision} autocast on "
                        f"{device_type}; use fp32" + (" or bf16" if precision == "fp16" else ""))
    return context


# ----------------------------------------------------------------------------------------------------------
# Files and user errors (every script uses these)
# ----------------------------------------------------------------------------------------------------------

class UserError(Exception):
    """A mistake the user can fix: a bad argument, a missing or mismatched file. Every script prints it as one
    line `error: ...` and exits with `exit_code`, never with a traceback (see run_cli)."""
    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is a UserError (one line) instead of a usage block."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def _typed(kind, holds, allowed):
    """An argparse `type`: the flag's text as `kind`, refused at parse time unless holds(value), with one line
    naming what is allowed ("argument --lr: '-1' is not a positive finite number")."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not holds(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}")
        return value
    return parse


def int_in(low, high=None):
    """An integer in [low, high] (no upper bound when high is None)."""
    return _typed(int, lambda v: low <= v and (high is None or v <= high),
                  f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")


positive_int, nonnegative_int = int_in(1), int_in(0)
finite_float = _typed(float, math.isfinite, "a finite number")
positive_float = _typed(float, lambda v: 0 < v < math.inf, "a positive finite number")
probability = _typed(float, lambda v: 0 <= v <= 1, "a probability in [0, 1]")
decay = _typed(float, lambda v: 0 <= v < 1, "a decay rate in [0, 1)")
folder = _typed(str, lambda v: not os.path.exists(v) or os.path.isdir(v), "a folder (it is a file)")
device = _typed(str, lambda v: v == "cpu" or re.fullmatch(r"cuda(:\d+)?", v) and torch.cuda.is_available(),
                "a device here: cpu, or cuda / cuda:N where a CUDA GPU is visible")

# errno values of a write that found no room: a full disk, a quota, a file-size limit (ulimit -f).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def run_cli(main):
    """Run a script's main(): a UserError becomes one `error:` line on stderr and its exit code. So does an
    OSError, with exit code 1: the machine failed, not the user (a full disk), and what was written stays.
    Under torchrun every rank fails alike, so rank 0 alone prints it."""
    try:
        main()
    except UserError as e:
        # raised in a DataLoader worker, the message arrives after the worker's traceback: keep the last line
        message = str(e).strip().splitlines()[-1]
        return _fail(message.split("UserError: ", 1)[-1], e.exit_code)
    except OSError as e:
        if e.errno in DISK_FULL:
            return _fail(f"disk full writing {e.filename} ({e.strerror})", 1)
        return _fail(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", 1)
    return 0


def _fail(message, exit_code):
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr)
    return exit_code


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


def atomic_write(path, write):
    """Call write(file) on a temp file beside `path` (`.<name>.tmp<pid>`), then rename it over `path`: a crash or
    a full disk never leaves a half-written checkpoint, image or table behind. A failed write is an OSError
    naming `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
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


def write_json(path, obj, indent=1):
    """`obj` as a JSON file, atomically (indent=None: one compact line, for large manifests)."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=indent) + "\n").encode()))


# atomic_write's temp files `.<name>.tmp<pid>`, and those of older latent caches, `<name>.tmp<pid>.npy`
_TEMP_FILE = re.compile(r"\.tmp(\d+)(\.npy)?$")


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


def load_strict(module, state, source):
    """module.load_state_dict(state, strict=True), but a mismatch is one line naming the first odd tensor."""
    own = module.state_dict()
    for key, tensor in own.items():
        if key not in state:
            raise UserError(f"{source}: missing tensor '{key}'")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(f"{source}: tensor '{key}' has shape {list(state[key].shape)}, expected {list(tensor.shape)}")
    for key in state:
        if key not in own:
            raise UserError(f"{source}: unexpected tensor '{key}'")
    module.load_state_dict(state, strict=True)


def file_sha256(path):
    """Hex sha256 of a file's bytes: the identity of a base checkpoint or a VAE under any name or path."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: official DiT, the authors' FineDiffusion, ours (all tensors, or only the tuned ones: a "delta")
# ----------------------------------------------------------------------------------------------------------

def save_checkpoint(path, **fields):
    """Write one of our checkpoints, atomically. The one schema, read back by `load_model` (and, for the
    "train" part, by train.py's resume); plain tensors, dicts, lists, str, numbers and None only, so that
    torch.load(weights_only=True) reads it:

      model, ema  the trained and the EMA tensors, official key names. With a `base`, only the tuned tensors
                  (a "delta": 1.8% of DiT-XL/2 under FineDiffusion, paper §3.2.1); without, every tensor.
      base        None, or {"path", "sha256"} of the checkpoint the delta goes onto (a delta must never meet
                  another base: the images would be silently wrong).
      config      build_model's keyword arguments: name, image_size, num_classes, num_superclasses, method,
                  pixel_space (and learn_sigma when False).
      hierarchy   {"class_names", "superclass_names", "superclass_of"} of the training data (data.py).
      vae         None for a pixel-space DiT, else the identity of the VAE it was trained with:
                  {"sha256" of the weights file, "config"}.
      step, args  the training step and train.py's arguments (a dict).
      time_s      the wall time of the training loop up to `step`, summed over resumes (seconds; absent from
                  checkpoints written before it was recorded).
      train       only in training checkpoints (absent from --export files): what --resume needs to continue
                  bit for bit: {"opt", "scaler", "rng" (one entry per rank), "world_size", "epoch", "position"}.
    The official {"model", "ema"} layout is a subset, so an exported checkpoint also loads in DiT's own code.
    """
    atomic_write(path, lambda f: torch.save(fields, f))


def read_checkpoint(path):
    """torch.load with weights_only=True (checkpoints are untrusted: a pickle is code); argparse.Namespace is
    allowed because the official and the authors' training checkpoints store their args as one."""
    path = find_file(path)
    try:
        # torch's warnings (e.g. on a plain pickle) would add lines to the one below, and its hints suggest
        # weights_only=False: exactly what must not be done with an untrusted file
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refusals are UnpicklingErrors naming "GLOBAL module.Class"
        msg = str(e)
        if "GLOBAL " in msg:
            name = msg.split("GLOBAL ", 1)[1].split()[0]
            raise UserError(f"refusing to load {path}: it pickles {name!r}, not only tensors "
                            "(checkpoints are untrusted input)") from None
        first = msg.strip().splitlines()[0] if msg.strip() and "weights only" not in msg.lower() else type(e).__name__
        raise UserError(f"cannot read {path}: not a readable torch checkpoint ({first})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a checkpoint: it holds a {type(ckpt).__name__}, not a dict of tensors")
    return ckpt


def checkpoint_tensors(ckpt, weights="ema"):
    """The state dict in a checkpoint: its "ema" (what one samples with, as the official sampler) or "model"
    entry, or the checkpoint itself when it is a bare state dict (DiT-XL-2-256x256.pt)."""
    if "model" in ckpt or "ema" in ckpt:
        state = ckpt.get(weights, ckpt.get("model"))
    else:
        state = ckpt
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError("the checkpoint holds no state dict of tensors")
    return state


def latest_checkpoint(folder):
    """The newest training checkpoint (`.../checkpoints/*.pt`) under a run folder or results/, or None."""
    found = glob.glob(os.path.join(folder, "**", "checkpoints", "*.pt"), recursive=True)
    return max(found, key=os.path.getmtime) if found else None


def dit_config_from_state(state):
    """The DiT configuration from tensor shapes alone (all that the official files carry)."""
    try:
        w = state["x_embedder.proj.weight"]                       # (D, C_in, p, p)
        hidden, in_channels, patch = w.shape[0], w.shape[1], w.shape[2]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        num_patches = state["pos_embed"].shape[1]
        out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
        rows = state[TABLE].shape[0]
    except (KeyError, ValueError, IndexError, AttributeError) as e:
        raise UserError(f"not a DiT state dict (missing or odd tensor {e})") from None
    size = next((s for s, (d, h, _) in _CONFIGS.items() if (d, h) == (depth, hidden)), None)
    if size is None:
        raise UserError(f"no DiT configuration has depth {depth} and width {hidden}")
    return dict(name=f"DiT-{size}/{patch}", input_size=int(round(num_patches ** 0.5)) * patch,
                in_channels=in_channels, learn_sigma=out_channels == 2 * in_channels, rows=rows,
                norm_affine="blocks.0.norm1.weight" in state, difffit_gates="blocks.0.gamma1" in state)


def load_pretrained(model, path_or_state):
    """Load official DiT, authors' FineDiffusion or our (full) checkpoints into `model`, from a file or a loaded
    checkpoint or state dict ({"model"|"ema": ...} wrappers too, EMA preferred); returns a report dict.

    A label table of another size is re-initialised (new classes: N(0, 0.02) as DiT's init); LayerNorm
    affine or DiffFit gates absent from the checkpoint start at the identity. Anything else that does not
    fit is a UserError naming the tensor and both shapes.
    """
    ckpt = read_checkpoint(path_or_state) if isinstance(path_or_state, (str, os.PathLike)) else path_or_state
    state = checkpoint_tensors(ckpt)
    own = model.state_dict()
    report = dict(loaded=[], reinitialised=[], identity=[])
    new_state = {}
    for k, v in state.items():
        if k not in own:
            hint = " (a LayerNorm affine: this checkpoint is FineDiffusion/DiffFit-tuned)" if ".norm" in k else ""
            raise UserError(f"checkpoint tensor {k} {tuple(v.shape)} has no place in this model{hint}")
        if v.shape == own[k].shape:
            new_state[k] = v
        elif k == TABLE:
            report["reinitialised"].append(f"{k}: {tuple(v.shape)} -> {tuple(own[k].shape)}")
            nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
        else:
            raise UserError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}")
    for k in own.keys() - state.keys():
        if ".norm" in k or k.endswith(("gamma1", "gamma2")):
            report["identity"].append(k)                     # already 1 / 0 from construction
        else:
            raise UserError(f"checkpoint lacks tensor {k} {tuple(own[k].shape)}")
    model.load_state_dict(new_state, strict=False)
    report["loaded"] = sorted(new_state)
    return report


def base_tensors(ckpt, base=None, base_flag="--base"):
    """The tensors a delta checkpoint goes onto: its base file (`base`, if it moved, else the recorded path),
    refused unless its sha256 is the one recorded at training time. base_flag: the flag of this script that
    says where the base moved to (None: there is none)."""
    try:
        path = find_file(base or ckpt["base"]["path"])
    except UserError as e:
        where = f"if it moved, pass its new place with {base_flag}" if base_flag else "put it back there"
        raise UserError(f"{e}; it is the base of this delta checkpoint: {where}") from None
    if file_sha256(path) != ckpt["base"]["sha256"]:
        raise UserError(f"base checkpoint {path} is not the one this delta was trained on (sha256 differs)")
    return checkpoint_tensors(read_checkpoint(path))


# Foreign checkpoints carry no hierarchy: known label-table layouts (rows, LayerNorm affine) -> (K, S, null).
KNOWN_TABLES = {(1001, False): (1000, 0, True),     # official DiT, ImageNet-1k + null
                (10011, True): (10000, 11, False)}  # authors' FineDiffusion, iNat21: 10,000 + 11 superclasses


def load_model(path, base=None, weights="ema", base_flag="--base"):
    """The DiT a checkpoint describes, with its `weights` ("ema" to sample, "model" to resume) loaded, in
    eval mode. Returns (model, info): info has config, hierarchy (None for foreign files), args, step, time_s, vae.
    base, base_flag: where a delta's base moved to, and the flag that says so (see base_tensors).

    Ours carry `config` and the hierarchy (see save_checkpoint); the official DiT and the authors'
    FineDiffusion files carry only tensors, so their configuration comes from the tensor shapes.
    """
    ckpt = read_checkpoint(path)
    if "config" in ckpt:
        config, hierarchy = _config_of(ckpt, path), ckpt.get("hierarchy")
        model = build_model(**config, superclass_of=hierarchy["superclass_of"] if hierarchy else None)
        tensors = checkpoint_tensors(ckpt, weights)
        if ckpt.get("base"):
            load_pretrained(model, base_tensors(ckpt, base, base_flag))
            model.load_state_dict(tensors, strict=False)         # the tuned tensors, over the base's
        else:
            load_pretrained(model, tensors)
        info = dict(config=config, hierarchy=hierarchy, args=ckpt.get("args") or {}, step=ckpt.get("step"),
                    time_s=ckpt.get("time_s"), vae=ckpt.get("vae"))
        return model.eval(), info
    state = checkpoint_tensors(ckpt, weights)
    cfg = dit_config_from_state(state)
    K, S, null = KNOWN_TABLES.get((cfg["rows"], cfg["norm_affine"]), (cfg["rows"] - 1, 0, True))
    model = DiT_models[cfg["name"]](input_size=cfg["input_size"], in_channels=cfg["in_channels"], num_classes=K,
                                    num_superclasses=S, null_class=null, learn_sigma=cfg["learn_sigma"],
                                    norm_affine=cfg["norm_affine"], difffit_gates=cfg["difffit_gates"])
    load_pretrained(model, state)
    pixel = cfg["in_channels"] == 3
    config = dict(name=cfg["name"], image_size=cfg["input_size"] * (1 if pixel else 8), num_classes=K,
                  num_superclasses=S, pixel_space=pixel)
    return model.eval(), dict(config=config, hierarchy=None, args={}, step=None, time_s=None, vae=None)


def _config_of(ckpt, path):
    """The `config` of one of our checkpoints (save_checkpoint's schema), checked to be one."""
    config, needed = ckpt["config"], ("name", "image_size", "num_classes", "num_superclasses", "method")
    if not isinstance(config, dict) or not all(k in config for k in needed):
        raise UserError(f"{path}: its 'config' is not a DiT configuration (a dict of {', '.join(needed)})")
    return dict(config)


# ----------------------------------------------------------------------------------------------------------
# .safetensors, read with the standard library: u64 header length, JSON header, raw little-endian bytes
# ----------------------------------------------------------------------------------------------------------

# safetensors dtype tag -> (numpy little-endian dtype, torch dtype). BF16 has no numpy type: its bytes are
# read as int16 and reinterpreted, which is exact (same 16 bits).
_ST_DTYPES = {
    "F64": ("<f8", torch.float64), "F32": ("<f4", torch.float32), "F16": ("<f2", torch.float16),
    "BF16": ("<i2", torch.bfloat16), "I64": ("<i8", torch.int64), "I32": ("<i4", torch.int32),
    "I16": ("<i2", torch.int16), "I8": ("i1", torch.int8), "U8": ("u1", torch.uint8), "BOOL": ("?", torch.bool),
}


def load_safetensors(path):
    """Read a .safetensors file -> {name: tensor}."""
    with open(path, "rb") as f:
        buf = f.read()
    try:
        (n,) = struct.unpack("<Q", buf[:8])
        header = json.loads(buf[8:8 + n])
    except Exception as e:
        raise UserError(f"{path}: not a valid .safetensors file ({e})") from None
    base, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise UserError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        np_dt, t_dt = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape, count = info["shape"], math.prod(info["shape"])
        if end - begin != count * np.dtype(np_dt).itemsize or base + end > len(buf):
            raise UserError(f"{path}: tensor '{name}' has data_offsets that do not fit its shape {shape}")
        arr = np.frombuffer(buf, dtype=np_dt, count=count, offset=base + begin)
        arr = arr.astype(arr.dtype.newbyteorder("="))     # an aligned, writable copy in native byte order
        out[name] = torch.from_numpy(arr).view(t_dt).reshape(shape)  # view: int16 bits -> bfloat16
    return out


# ----------------------------------------------------------------------------------------------------------
# The Stable Diffusion VAE (AutoencoderKL), key for key the diffusers layout of sd-vae-ft-ema / -mse
# ----------------------------------------------------------------------------------------------------------
# Module and attribute names follow diffusers exactly, so published state dicts load without renaming.

class VAEResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice, plus a residual (1x1 conv when the width changes). No time embedding."""
    def __init__(self, cin, cout, groups=32, eps=1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps, affine=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):                                  # B x cin x H x W
        h = self.conv1(F.silu(self.norm1(x)))              # B x cout x H x W
        h = self.conv2(F.silu(self.norm2(h)))              # (dropout is 0 in the SD VAE)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h                                       # output_scale_factor 1


class VAEAttention(nn.Module):
    """Single-head self-attention over the H*W positions, with linear q/k/v/out projections over channels."""
    def __init__(self, c, groups=32, eps=1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=eps, affine=True)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])    # a list so that the key is 'to_out.0' as in diffusers

    def forward(self, x):                                  # B x C x H x W
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)          # B x HW x C
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)                # B x HW x C each
        h = F.scaled_dot_product_attention(q, k, v)                       # softmax(q k^T / sqrt(C)) v
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)         # B x C x H x W
        return x + h                                                      # residual, rescale factor 1


class VAEMidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""
    def __init__(self, c, groups):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnetBlock(c, c, groups), VAEResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([VAEAttention(c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class VAEDownsample(nn.Module):
    """Asymmetric zero pad (right and bottom only) then a stride-2 3x3 conv: H x W -> H/2 x W/2 exactly."""
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class VAEUpsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VAEDownBlock(nn.Module):
    """diffusers' DownEncoderBlock2D: `n` resnets, then (except in the last block) a downsampler."""
    def __init__(self, cin, cout, n, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        if downsample:  # the last block has no 'downsamplers' keys at all
            self.downsamplers = nn.ModuleList([VAEDownsample(cout)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if hasattr(self, "downsamplers") else x


class VAEUpBlock(nn.Module):
    """diffusers' UpDecoderBlock2D: `n` resnets, then (except in the last block) an upsampler."""
    def __init__(self, cin, cout, n, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        if upsample:
            self.upsamplers = nn.ModuleList([VAEUpsample(cout)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if hasattr(self, "upsamplers") else x


class VAEEncoder(nn.Module):
    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        chs = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            VAEDownBlock(chs[max(i - 1, 0)], c, layers_per_block, groups, downsample=i < len(chs) - 1)
            for i, c in enumerate(chs)])
        self.mid_block = VAEMidBlock(chs[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], out_channels, 3, padding=1)

    def forward(self, x):                                  # B x 3 x H x W
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)                                       # halves H, W in all blocks but the last
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # B x 2*latent x H/f x W/f


class VAEDecoder(nn.Module):
    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        rev = list(reversed(block_out_channels))           # the decoder walks the widths back up: 512, 512, 256, 128
        self.conv_in = nn.Conv2d(in_channels, rev[0], 3, padding=1)
        self.mid_block = VAEMidBlock(rev[0], groups)
        self.up_blocks = nn.ModuleList([
            VAEUpBlock(rev[max(i - 1, 0)], c, layers_per_block + 1, groups, upsample=i < len(rev) - 1)
            for i, c in enumerate(rev)])
        self.conv_norm_out = nn.GroupNorm(groups, rev[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rev[-1], out_channels, 3, padding=1)

    def forward(self, z):                                  # B x latent x h x w
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)                                       # doubles H, W in all blocks but the last
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # B x 3 x H x W


# Old diffusers uploads (e.g. the .bin files) name the mid-block attention with its deprecated names.
_VAE_OLD_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_VAE_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_VAE_HELP = f"the SD VAE is published at {PUBLISHED['sd-vae-ft-ema']}"


def convert_vae_state_dict(sd):
    """Map deprecated attention names (query/key/value/proj_attn) to to_q/to_k/to_v/to_out.0, squeeze
    1x1-conv-shaped [C, C, 1, 1] projection weights to Linear [C, C], and cast floating tensors to float32."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if ".attentions." in k and len(parts) >= 2 and parts[-2] in _VAE_OLD_ATTN_NAMES:
            k = ".".join(parts[:-2] + [_VAE_OLD_ATTN_NAMES[parts[-2]], parts[-1]])
        if ".attentions." in k and k.endswith(".weight") and v.dim() == 4 and v.shape[2:] == (1, 1) \
                and any(f".{n}." in k for n in ("to_q", "to_k", "to_v", "to_out.0")):
            v = v[:, :, 0, 0]                              # conv1x1 weight == Linear weight
        out[k] = v.float() if v.is_floating_point() else v
    return out


def vae_weights_file(path):
    """The weights file of a VAE given as a file, a diffusers folder, or a pipeline folder with vae/."""
    path = find_file(path, published="sd-vae-ft-ema")
    if os.path.isfile(path):
        return path
    for folder in (path, os.path.join(path, "vae")):
        for name in _VAE_FILES:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    raise UserError(f"no {' or '.join(_VAE_FILES)} in {path}; {_VAE_HELP}")


class AutoencoderKL(nn.Module):
    """The Stable Diffusion VAE: 3 x H x W images in [-1, 1] <-> latent x H/8 x W/8 diagonal Gaussians.

    Latent scaling is the caller's job, as in Stable Diffusion and DiT:
        z = scaled_latent(*vae.encode(x))          # 0.18215 * (mean + sigma * eps)
        x = vae.decode(z / LATENT_SCALE)
    """
    def __init__(self, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                 layers_per_block=2, norm_num_groups=32):
        super().__init__()
        self.config = dict(in_channels=in_channels, out_channels=out_channels, latent_channels=latent_channels,
                           block_out_channels=list(block_out_channels), layers_per_block=layers_per_block,
                           norm_num_groups=norm_num_groups)
        self.weights_file = None                           # set by from_pretrained: the VAE's identity
        # the encoder predicts mean and log-variance, hence 2 * latent channels
        self.encoder = VAEEncoder(in_channels, 2 * latent_channels, block_out_channels, layers_per_block,
                                  norm_num_groups)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = VAEDecoder(latent_channels, out_channels, block_out_channels, layers_per_block,
                                  norm_num_groups)

    @classmethod
    def from_config(cls, config):
        """Build from a diffusers config.json dict; keys other than the constructor's are ignored."""
        keys = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
                "norm_num_groups")
        kw = {k: config[k] for k in keys if config.get(k) is not None}
        if "block_out_channels" in kw:
            kw["block_out_channels"] = tuple(kw["block_out_channels"])
        if kw.get("norm_num_groups", 32) < 1 or any(c % kw.get("norm_num_groups", 32) for c in
                                                    kw.get("block_out_channels", (128,))):
            raise UserError(f"VAE config: norm_num_groups {kw.get('norm_num_groups', 32)} does not divide "
                            f"block_out_channels {list(kw.get('block_out_channels', []))}")
        return cls(**kw)

    def encode(self, x):                                   # B x 3 x H x W, in [-1, 1]
        moments = self.quant_conv(self.encoder(x))         # B x 2*latent x H/8 x W/8
        mean, logvar = moments.chunk(2, dim=1)             # B x latent x H/8 x W/8 each
        return mean, logvar.clamp(-30.0, 20.0)             # clamp as diffusers/LDM, so exp() stays finite

    def decode(self, z):                                   # B x latent x h x w (already divided by 0.18215)
        return self.decoder(self.post_quant_conv(z))       # B x 3 x 8h x 8w, roughly in [-1, 1]

    def check_fits(self, in_channels, image_size):
        """Refuse a VAE whose latents are not a latent DiT's before any step: the DiT takes `in_channels`
        latents 8x smaller than its `image_size` px images (else: images of the wrong size, or a failure at
        decode after all the sampling steps)."""
        factor = 2 ** (len(self.config["block_out_channels"]) - 1)
        channels = self.config["latent_channels"]
        if channels != in_channels or factor != 8 or image_size % factor:
            raise UserError(f"the VAE {self.weights_file or ''} does not fit this DiT: it makes {channels}-channel "
                            f"latents {factor}x smaller than the image; the DiT takes {in_channels}-channel latents "
                            f"8x smaller than its {image_size} px images")

    def identity(self):
        """What checkpoints and latent caches record of the VAE: its config and the sha256 of its weights."""
        return dict(sha256=file_sha256(self.weights_file) if self.weights_file else None, config=self.config)

    def load_vae_state_dict(self, sd, source="checkpoint"):
        """Strict load (old attention names accepted) with one-line errors naming the tensor."""
        sd = convert_vae_state_dict(sd)
        if any(k.startswith(("first_stage_model.", "encoder.down.", "decoder.up.")) for k in sd):
            raise UserError(f"{source}: this is an original CompVis/LDM-layout VAE, not the diffusers layout; "
                            + _VAE_HELP)
        try:
            load_strict(self, sd, source)
        except UserError as e:
            raise UserError(f"{e} - is this an SD VAE in the diffusers layout, with its config.json?") from None
        return self

    @classmethod
    def from_pretrained(cls, path="sd-vae-ft-ema"):
        """The one VAE loader. `path`: a diffusers folder (config.json + diffusion_pytorch_model.safetensors or
        .bin; a pipeline folder's vae/ works too) or a weights file (a diffusers config.json beside it is used;
        none: the SD defaults), looked up as given, then under pretrained/. Never downloads."""
        file = vae_weights_file(path)
        config, cfg_path = {}, os.path.join(os.path.dirname(file), "config.json")
        if os.path.isfile(cfg_path):
            try:
                with open(cfg_path) as f:
                    cfg = json.load(f)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read {cfg_path}: {e}") from None
            # beside a bare file, only take a config that is a VAE's (not, say, a training run's)
            if os.path.basename(file) in _VAE_FILES or cfg.get("_class_name") == "AutoencoderKL" \
                    or "latent_channels" in cfg:
                config = cfg
        sd = load_safetensors(file) if file.endswith(".safetensors") else _torch_load_tensors(file)
        vae = cls.from_config(config).load_vae_state_dict(sd, source=file).eval()
        vae.weights_file = file
        return vae


def _torch_load_tensors(path):
    """A flat {name: tensor} state dict from a .bin / .pt file (read as untrusted input)."""
    obj = read_checkpoint(path)
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # Lightning-style wrapper
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a flat {{name: tensor}} state dict")
    return obj


def scaled_latent(mean, logvar):
    """z = 0.18215 * (mean + exp(logvar / 2) * eps): one draw from the VAE posterior, scaled as DiT trains on it."""
    return LATENT_SCALE * (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))


if __name__ == "__main__":
    full_total = None
    print("Paper Table 2 — DiT-XL/2, 256x256, iNat21-mini (10,000 classes, 11 superclasses)")
    print(f"{'method':<15}{'trainable':>12}{'share':>9}   paper")
    paper = dict(full="685.2M (100%)", bitfit="12.01M (1.75%)", difffit="12.14M (1.77%)",
                 finediffusion="12.15M (1.77%)")
    for method, trainable, total in count_table2():
        full_total = full_total or total
        print(f"{method:<15}{trainable / 1e6:>11.2f}M{100 * trainable / full_total:>8.2f}%   {paper[method]}")

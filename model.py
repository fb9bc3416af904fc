"""The FineDiffusion model: a Diffusion Transformer (DiT) with a TieredEmbedder, the four tuning methods of
paper Table 2, checkpoint loading, and the Stable Diffusion VAE.

    python model.py          # prints paper Table 2 (parameter counts) for DiT-XL/2, 256 px, iNat21

Paper sections:
  §3.1    DiT (Peebles & Xie, 2023): patchify -> N adaLN-Zero blocks -> final layer -> unpatchify.
  §3.2.1  TieredEmbedder: one label table with subclass rows [0, K), superclass rows [K, K+S) and, for the
          standard-CFG baselines, one null row K+S. While training, a label is replaced by its superclass
          row with probability `superclass_prob` (0.1), which trains eps(x_t | c_p) for eq. 1.
  §3.2.2  forward_with_cfg: fine-grained classifier-free guidance, eq. 1.
  Table 2 set_trainable: which tensors `full`, `bitfit`, `difffit` and `finediffusion` train.

State-dict keys and shapes are those of the official DiT release, so `DiT-XL-2-256x256.pt` and the
authors' `FineDiffusion-iNat.pt` load as they are.
"""
import argparse
import glob
import json
import math
import os
import struct

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file or tensor and what to do."""


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
        if not self.null_class:
            raise ValueError("this label table has no null row: use superclass guidance (--guidance superclass)")
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

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, norm_affine=False, difffit_gates=False):
        super().__init__()
        self.norm1 = layer_norm(hidden_size, norm_affine)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = layer_norm(hidden_size, norm_affine)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
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
                 mlp_ratio=4.0, num_classes=1000, num_superclasses=0, superclass_of=None, null_class=True,
                 superclass_prob=None, null_prob=None, learn_sigma=True, norm_affine=False, difffit_gates=False,
                 grad_checkpointing=False):
        super().__init__()
        # Label-substitution defaults follow from which rows exist: superclass rows are trained with the
        # paper's 0.1, a null row with the official DiT's 0.1 (a table with both trains both guides).
        if superclass_prob is None:
            superclass_prob = 0.1 if num_superclasses else 0.0
        if null_prob is None:
            null_prob = 0.1 if null_class else 0.0
        self.in_channels, self.patch_size, self.num_heads = in_channels, patch_size, num_heads
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma, self.grad_checkpointing = learn_sigma, grad_checkpointing

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = TieredEmbedder(num_classes, hidden_size, num_superclasses, superclass_of, null_class,
                                         superclass_prob, null_prob)
        num_patches = (input_size // patch_size) ** 2
        # Fixed sin-cos positions: a Parameter (for the official key `pos_embed`) that is never trained.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, norm_affine, difffit_gates)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm_affine)
        self.initialize_weights()

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


# The twelve official configurations, plus two tiny ones (T) for CPU demos and tests.
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
    """A DiT laid out for a tuning method.

    `finediffusion`: K+S label rows (no null row, as the authors' checkpoints) and LayerNorm affine.
    `full`, `bitfit`: the standard K+1 table with null dropout 0.1. `difffit`: that, plus LayerNorm affine
    and one scalar gate per branch. `image_size` is in pixels: the DiT sees 8x smaller VAE latents, or the
    pixels themselves (3 channels) with `pixel_space=True` (the built-in toy data).
    """
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(DiT_models)}")
    if method not in METHODS:
        raise ValueError(f"unknown tuning method {method!r}: choose one of {', '.join(METHODS)}")
    tiered = method == "finediffusion"
    kw.setdefault("null_class", not tiered)
    kw.setdefault("norm_affine", method in ("difffit", "finediffusion"))
    kw.setdefault("difffit_gates", method == "difffit")
    input_size = image_size if pixel_space else image_size // 8
    return DiT_models[name](input_size=input_size, in_channels=3 if pixel_space else 4, num_classes=num_classes,
                            num_superclasses=num_superclasses if tiered else 0,
                            superclass_of=superclass_of if tiered else None, **kw)


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
    raise ValueError(f"unknown tuning method {method!r}: choose one of {', '.join(METHODS)}")


def set_trainable(model, method):
    """Freeze everything `method` does not train. Returns (trainable, total) parameter counts."""
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name, method))
        if name != "pos_embed":
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: official DiT, the authors' FineDiffusion, ours (full or trainable-only "delta")
# ----------------------------------------------------------------------------------------------------------

PUBLISHED = {
    "DiT-XL-2-256x256.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
    "DiT-XL-2-512x512.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt",
    "FineDiffusion-iNat.pt": "the authors' release, linked from https://finediffusion.github.io/",
}


def atomic_write(path, write):
    """Call write(file) on a temp file beside `path`, then rename it over `path`: a crash or a full disk
    never leaves a half-written checkpoint, image or table behind."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint(path):
    """torch.load with weights_only=True (checkpoints are untrusted: a pickle is code); argparse.Namespace is
    allowed because the official and the authors' training checkpoints store their args as one."""
    path = str(path)
    if not os.path.isfile(path):
        where = PUBLISHED.get(os.path.basename(path))
        hint = f"; it is published at {where}" if where else ""
        raise CheckpointError(f"checkpoint not found: {path}{hint}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refusals are UnpicklingErrors naming "GLOBAL module.Class"
        msg = str(e)
        if "GLOBAL " in msg:
            name = msg.split("GLOBAL ", 1)[1].split()[0]
            raise CheckpointError(f"refusing to load {path}: it pickles {name!r}, not only tensors "
                                  "(checkpoints are untrusted input)") from None
        first = msg.strip().splitlines()[0] if msg.strip() and "weights only" not in msg.lower() else type(e).__name__
        raise CheckpointError(f"cannot read {path}: not a readable torch checkpoint ({first})") from None


def latest_checkpoint(folder):
    """The newest training checkpoint (`.../checkpoints/*.pt`) under a run folder or results/, or None."""
    found = glob.glob(os.path.join(folder, "**", "checkpoints", "*.pt"), recursive=True)
    return max(found, key=os.path.getmtime) if found else None


def unwrap_state(ckpt):
    """The tensors to sample with: a bare state dict, or the "ema" (preferred, as the official sampler)
    or "model" entry of a training checkpoint."""
    if isinstance(ckpt, dict) and ("ema" in ckpt or "model" in ckpt):
        return ckpt["ema"] if "ema" in ckpt else ckpt["model"]
    return ckpt


def dit_config_from_state(state):
    """Recover the DiT configuration from tensor shapes alone (all the official files carry)."""
    try:
        w = state["x_embedder.proj.weight"]                       # (D, C_in, p, p)
        hidden, in_channels, patch = w.shape[0], w.shape[1], w.shape[2]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        num_patches = state["pos_embed"].shape[1]
        out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
        rows = state[TABLE].shape[0]
    except (KeyError, ValueError, IndexError, AttributeError) as e:
        raise CheckpointError(f"not a DiT state dict (missing or odd tensor {e})") from None
    size = next((s for s, (d, h, _) in _CONFIGS.items() if (d, h) == (depth, hidden)), None)
    if size is None:
        raise CheckpointError(f"no DiT configuration has depth {depth} and width {hidden}")
    return dict(name=f"DiT-{size}/{patch}", input_size=int(round(num_patches ** 0.5)) * patch,
                in_channels=in_channels, learn_sigma=out_channels == 2 * in_channels, rows=rows,
                norm_affine="blocks.0.norm1.weight" in state, difffit_gates="blocks.0.gamma1" in state)


def load_pretrained(model, path_or_state):
    """Load official DiT, authors' FineDiffusion or our checkpoints into `model`; returns a report dict.

    A label table of another size is re-initialised (new classes: N(0, 0.02) as DiT's init); LayerNorm
    affine or DiffFit gates absent from the checkpoint start at the identity. Anything else that does not
    fit raises CheckpointError naming the tensor and both shapes.
    """
    ckpt = read_checkpoint(path_or_state) if isinstance(path_or_state, (str, os.PathLike)) else path_or_state
    state = unwrap_state(ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("checkpoint holds no state dict of tensors")
    own = model.state_dict()
    report = dict(loaded=[], reinitialised=[], identity=[])
    new_state = {}
    for k, v in state.items():
        if k not in own:
            hint = " (a LayerNorm affine: this checkpoint is FineDiffusion/DiffFit-tuned)" if ".norm" in k else ""
            raise CheckpointError(f"checkpoint tensor {k} {tuple(v.shape)} has no place in this model{hint}")
        if v.shape == own[k].shape:
            new_state[k] = v
        elif k == TABLE:
            report["reinitialised"].append(f"{k}: {tuple(v.shape)} -> {tuple(own[k].shape)}")
            nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
        else:
            raise CheckpointError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}")
    for k in own.keys() - state.keys():
        if ".norm" in k or k.endswith(("gamma1", "gamma2")):
            report["identity"].append(k)                     # already 1 / 0 from construction
        else:
            raise CheckpointError(f"checkpoint lacks tensor {k} {tuple(own[k].shape)}")
    model.load_state_dict(new_state, strict=False)
    report["loaded"] = sorted(new_state)
    return report


def file_sha256(path, chunk=1 << 24):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def apply_delta(model, state):
    """Overlay a trainable-only ("delta") state on a model that already holds its base weights."""
    own = model.state_dict()
    for k, v in state.items():
        if k not in own or own[k].shape != v.shape:
            where = f"model {tuple(own[k].shape)}" if k in own else "no such tensor in the model"
            raise CheckpointError(f"delta tensor {k} {tuple(v.shape)} does not fit: {where}")
    model.load_state_dict(state, strict=False)


def load_base_for_delta(ckpt, base=None):
    """The base checkpoint a delta was trained from: `base` if given, else the recorded path; its sha256
    must match the one recorded at training time (a delta on another base gives silently wrong images)."""
    path = base or ckpt["base"]["path"]
    if not os.path.isfile(path):
        where = PUBLISHED.get(os.path.basename(path))
        raise CheckpointError(f"this checkpoint stores only the tuned tensors; its base {path} is missing"
                              + (f" (published at {where})" if where else "") + ": pass it with --base PATH")
    if ckpt["base"].get("sha256") and file_sha256(path) != ckpt["base"]["sha256"]:
        raise CheckpointError(f"base checkpoint {path} is not the one this delta was trained on (sha256 differs)")
    return read_checkpoint(path)


# Foreign checkpoints carry no hierarchy: known label-table layouts (rows, LayerNorm affine) -> (K, S, null).
KNOWN_TABLES = {(1001, False): (1000, 0, True),     # official DiT, ImageNet-1k + null
                (10011, True): (10000, 11, False)}  # authors' FineDiffusion, iNat21: 10,000 + 11 superclasses


def load_model(path, base=None):
    """Build the DiT a checkpoint describes and load it. Returns (model in eval mode, info dict).

    Ours carry `config` (the build_model arguments) and the hierarchy; official DiT and the authors'
    FineDiffusion files carry only tensors, so the configuration comes from their shapes.
    """
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and "config" in ckpt:
        config, hierarchy = dict(ckpt["config"]), ckpt.get("hierarchy")
        superclass_of = hierarchy["superclass_of"] if hierarchy else None
        model = build_model(**config, superclass_of=superclass_of)
        if ckpt.get("delta"):
            load_pretrained(model, load_base_for_delta(ckpt, base))
            apply_delta(model, unwrap_state(ckpt))
        else:
            load_pretrained(model, ckpt)
        info = dict(config=config, hierarchy=hierarchy, args=ckpt.get("args"), step=ckpt.get("step"))
        return model.eval(), info
    state = unwrap_state(ckpt)
    cfg = dit_config_from_state(state)
    K, S, null = KNOWN_TABLES.get((cfg["rows"], cfg["norm_affine"]), (cfg["rows"] - 1, 0, True))
    hierarchy = None
    if S == 11 and K == 10000:
        from data import INAT21_SUPERCLASSES, inat21_superclass_of
        hierarchy = dict(class_names=None, superclass_names=INAT21_SUPERCLASSES, superclass_of=inat21_superclass_of())
    model = DiT_models[cfg["name"]](input_size=cfg["input_size"], in_channels=cfg["in_channels"], num_classes=K,
                                    num_superclasses=S, superclass_of=hierarchy and hierarchy["superclass_of"],
                                    null_class=null, learn_sigma=cfg["learn_sigma"], norm_affine=cfg["norm_affine"],
                                    difffit_gates=cfg["difffit_gates"])
    load_pretrained(model, state)
    pixel = cfg["in_channels"] == 3
    config = dict(name=cfg["name"], image_size=cfg["input_size"] * (1 if pixel else 8), num_classes=K,
                  num_superclasses=S, pixel_space=pixel)
    return model.eval(), dict(config=config, hierarchy=hierarchy, args=None, step=None)


# ----------------------------------------------------------------------------------------------------------
# .safetensors, read and written with the standard library: u64 header length, JSON header, raw bytes
# ----------------------------------------------------------------------------------------------------------

# safetensors dtype tag -> (numpy little-endian dtype, torch dtype). BF16 has no numpy type: its bytes are
# read as int16 and reinterpreted, which is exact (same 16 bits).
_ST_DTYPES = {
    "F64": ("<f8", torch.float64), "F32": ("<f4", torch.float32), "F16": ("<f2", torch.float16),
    "BF16": ("<i2", torch.bfloat16), "I64": ("<i8", torch.int64), "I32": ("<i4", torch.int32),
    "I16": ("<i2", torch.int16), "I8": ("i1", torch.int8), "U8": ("u1", torch.uint8), "BOOL": ("?", torch.bool),
}
_ST_TAGS = {tdt: tag for tag, (_, tdt) in _ST_DTYPES.items()}


def load_safetensors(path):
    """Read a .safetensors file -> {name: tensor}: u64 header length, JSON header, raw little-endian bytes."""
    with open(path, "rb") as f:
        buf = f.read()
    try:
        (n,) = struct.unpack("<Q", buf[:8])
        header = json.loads(buf[8:8 + n])
    except Exception as e:
        raise CheckpointError(f"{path}: not a valid .safetensors file ({e})") from None
    base, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        np_dt, t_dt = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape, count = info["shape"], math.prod(info["shape"])
        if end - begin != count * np.dtype(np_dt).itemsize or base + end > len(buf):
            raise CheckpointError(f"{path}: tensor '{name}' has data_offsets that do not fit its shape {shape}")
        arr = np.frombuffer(buf, dtype=np_dt, count=count, offset=base + begin)
        arr = arr.astype(arr.dtype.newbyteorder("="))     # an aligned, writable copy in native byte order
        out[name] = torch.from_numpy(arr).view(t_dt).reshape(shape)  # view: int16 bits -> bfloat16
    return out


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as .safetensors (readable by the safetensors package too); atomic."""
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in _ST_TAGS:
            raise ValueError(f"save_safetensors: tensor '{name}' has unsupported dtype {t.dtype}")
        np_dt = _ST_DTYPES[_ST_TAGS[t.dtype]][0]
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().astype(np_dt).tobytes()
        header[name] = {"dtype": _ST_TAGS[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header with spaces to an 8-byte boundary
    atomic_write(path, lambda f: f.write(b"".join([struct.pack("<Q", len(head)), head, *chunks])))


def _torch_load_tensors(path):
    """A flat {name: tensor} state dict from a .bin / .pt file (read as untrusted input)."""
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # Lightning-style wrapper
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a flat {{name: tensor}} state dict")
    return obj


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
LATENT_SCALE = 0.18215   # SD-VAE latents are scaled to unit variance for the DiT (LDM, DiT)
VAE_URL = "https://huggingface.co/stabilityai/sd-vae-ft-ema"
_VAE_HELP = (f"The published files are at {VAE_URL} (or sd-vae-ft-mse): "
             "download config.json and diffusion_pytorch_model.safetensors into a folder and pass it with --vae.")


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


class AutoencoderKL(nn.Module):
    """The Stable Diffusion VAE: 3 x H x W images in [-1, 1] <-> latent x H/8 x W/8 diagonal Gaussians.

    Latent scaling is the caller's job, as in Stable Diffusion and DiT:
        mean, logvar = vae.encode(x);  z = scaling_factor * sample_latent(mean, logvar)   # 0.18215
        x = vae.decode(z / scaling_factor)
    """
    def __init__(self, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                 layers_per_block=2, norm_num_groups=32, scaling_factor=LATENT_SCALE):
        super().__init__()
        self.config = dict(in_channels=in_channels, out_channels=out_channels, latent_channels=latent_channels,
                           block_out_channels=list(block_out_channels), layers_per_block=layers_per_block,
                           norm_num_groups=norm_num_groups, scaling_factor=scaling_factor)
        self.scaling_factor = scaling_factor
        self.downscale = 2 ** (len(block_out_channels) - 1)  # 8 for SD
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
                "norm_num_groups", "scaling_factor")
        kw = {k: config[k] for k in keys if config.get(k) is not None}
        if "block_out_channels" in kw:
            kw["block_out_channels"] = tuple(kw["block_out_channels"])
        return cls(**kw)

    def encode(self, x):                                   # B x 3 x H x W, in [-1, 1]
        moments = self.quant_conv(self.encoder(x))         # B x 2*latent x H/8 x W/8
        mean, logvar = moments.chunk(2, dim=1)             # B x latent x H/8 x W/8 each
        return mean, logvar.clamp(-30.0, 20.0)             # clamp as diffusers/LDM, so exp() stays finite

    def decode(self, z):                                   # B x latent x h x w (already divided by scaling_factor)
        return self.decoder(self.post_quant_conv(z))       # B x 3 x 8h x 8w, roughly in [-1, 1]

    def forward(self, x, sample=False, generator=None):
        mean, logvar = self.encode(x)
        return self.decode(sample_latent(mean, logvar, generator) if sample else mean)

    def load_vae_state_dict(self, sd, source="checkpoint"):
        """Strict load with one-line errors naming the tensor (and both shapes)."""
        sd, own = convert_vae_state_dict(sd), self.state_dict()
        if any(k.startswith(("first_stage_model.", "encoder.down.", "decoder.up.")) for k in sd):
            raise CheckpointError(f"{source}: this is an original CompVis/LDM-layout VAE, not the diffusers layout; "
                                  + _VAE_HELP)
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        if missing:
            raise CheckpointError(f"{source}: missing tensor '{missing[0]}'" +
                                  (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                                  " - is this an SD VAE in the diffusers layout, with its config.json?")
        if unexpected:
            raise CheckpointError(f"{source}: unexpected tensor '{unexpected[0]}'" +
                                  (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "") +
                                  " - does config.json match the weights?")
        for k, v in own.items():
            if sd[k].shape != v.shape:
                raise CheckpointError(f"{source}: tensor '{k}' has shape {list(sd[k].shape)} in the checkpoint "
                                      f"but {list(v.shape)} in the model - does config.json match the weights?")
        self.load_state_dict(sd, strict=True)
        return self

    @classmethod
    def from_pretrained(cls, path, config=None):
        """Load a diffusers-layout VAE. `path`: a folder with config.json (optional: SD defaults) and
        diffusion_pytorch_model.safetensors or .bin (a pipeline folder's vae/ subfolder also works), or a
        .safetensors / .bin / .pt file (a diffusers config.json beside it is used). Never downloads."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise CheckpointError(f"VAE not found: '{path}' does not exist. " + _VAE_HELP)
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
            if not any(os.path.isfile(os.path.join(path, n)) for n in names) and os.path.isdir(os.path.join(path, "vae")):
                folder = path = os.path.join(path, "vae")  # a whole Stable Diffusion pipeline folder
            files = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
            if not files:
                raise CheckpointError(f"no diffusion_pytorch_model.safetensors or .bin in '{path}'. " + _VAE_HELP)
            file = files[0]
        else:
            file = path
        if config is None:
            config = {}
            cfg_path = os.path.join(folder, "config.json")
            if os.path.isfile(cfg_path):
                try:
                    with open(cfg_path) as f:
                        cfg = json.load(f)
                except (OSError, ValueError) as e:
                    raise CheckpointError(f"cannot read {cfg_path}: {e}") from None
                # beside a bare file, only take a config that is a VAE's (not, say, a training run's)
                if os.path.isdir(path) or cfg.get("_class_name") == "AutoencoderKL" or "latent_channels" in cfg:
                    config = cfg
        sd = load_safetensors(file) if file.endswith(".safetensors") else _torch_load_tensors(file)
        return cls.from_config(config).load_vae_state_dict(sd, source=file).eval()


def sample_latent(mean, logvar, generator=None):
    """One draw from the diagonal Gaussian N(mean, exp(logvar)); the caller then scales by 0.18215."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps


def count_table2(name="DiT-XL/2", image_size=256, num_classes=10000, num_superclasses=11):
    """Rows of paper Table 2: (method, trainable, total), counted on the meta device (no allocation)."""
    rows = []
    with torch.device("meta"):
        for method in METHODS:
            model = build_model(name, image_size, num_classes, num_superclasses, method)
            rows.append((method, *set_trainable(model, method)))
    return rows


if __name__ == "__main__":
    full_total = None
    print("Paper Table 2 — DiT-XL/2, 256x256, iNat21-mini (10,000 classes, 11 superclasses)")
    print(f"{'method':<15}{'trainable':>12}{'share':>9}   paper")
    paper = dict(full="685.2M (100%)", bitfit="12.01M (1.75%)", difffit="12.14M (1.77%)",
                 finediffusion="12.15M (1.77%)")
    for method, trainable, total in count_table2():
        full_total = full_total or total
        print(f"{method:<15}{trainable / 1e6:>11.2f}M{100 * trainable / full_total:>8.2f}%   {paper[method]}")

"""The FineDiffusion model: a Diffusion Transformer (DiT) with a TieredEmbedder, the four tuning methods of
paper Table 2, and its checkpoints.

    python model.py          # prints paper Table 2 (parameter counts) for DiT-XL/2, 256 px, iNat21

Read it in this order:
  §3.1    DiT (Peebles & Xie, 2023): patchify -> N adaLN-Zero blocks -> final layer -> unpatchify.
  §3.2.1  TieredEmbedder: one label table with subclass rows [0, K), superclass rows [K, K+S) and, for the
          standard-CFG baselines, one null row K+S. While training, a label is replaced by its superclass
          row with probability SUPERCLASS_PROB, which trains eps(x_t | c_p), the guide of eq. 1.
  §3.2.2  DiT.forward_with_cfg: fine-grained classifier-free guidance, eq. 1.
  Table 2 is_trainable / set_trainable: which tensors `full`, `bitfit`, `difffit` and `finediffusion` train.
Then the checkpoints: one schema, one writer, one loader (which puts the hierarchy inside the DiT it builds). The SD
VAE is in vae.py; reading files and refusing what does not fit, in hardening.py.

State-dict keys and shapes are those of the official DiT release, so `DiT-XL-2-256x256.pt` and the
authors' `FineDiffusion-iNat.pt` load as they are.
"""
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hardening import (UserError, atomic_write, check_config, check_hierarchy, checkpoint_tensors, delta_base, dit_shapes,
                       load_strict, read_checkpoint, resolve_checkpoint)

# Label substitution while training (§3.2.1). The paper gives no number: 0.1 is the authors' code's
# `class_dropout_prob`, which there swaps a label for its superclass row.
SUPERCLASS_PROB = 0.1
# Standard CFG's label dropout to the null row: the official DiT's `class_dropout_prob`.
NULL_PROB = 0.1
# The SD VAE's latents have 4 channels: a latent DiT's input (a pixel-space DiT's is 3, RGB).
LATENT_CHANNELS = 4


# ----------------------------------------------------------------------------------------------------------
# DiT blocks (the official DiT layout, with optional LayerNorm affine and DiffFit gates)
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
# The label hierarchy: subclasses and their superclasses (paper §3.2)
# ----------------------------------------------------------------------------------------------------------

def make_hierarchy(class_names, superclass_names, superclass_of, ranks=()):
    """The hierarchy: a plain, JSON-able dict that datasets, latent caches, checkpoints, the TieredEmbedder, FID
    statistics and generated samples carry unchanged. Names are data, never recovered from file names (iNat21 has
    "Ray-finned Fishes"). `ranks`: the ranks between the class and its superclass, finest first, each
    {"rank": "genus", "names": [node names], "of": [node of each class]}; kept only where there are some, so a
    hierarchy of two levels is the same dict as before ranks existed."""
    hierarchy = dict(class_names=[str(n) for n in class_names], superclass_names=[str(n) for n in superclass_names],
                     superclass_of=[int(s) for s in superclass_of])
    if ranks:
        hierarchy["ranks"] = [dict(rank=str(r["rank"]), names=[str(n) for n in r["names"]], of=[int(i) for i in r["of"]])
                              for r in ranks]
    return hierarchy


def ranks_between(names, lineages):
    """make_hierarchy's `ranks` from each class's lineage (its node at each rank of `names`, finest first, then its
    superclass). A node is its name and all above it, so two genera of one name in two families stay two."""
    ranks = []
    for i, rank in enumerate(names):
        index = {}                                                   # node -> id, in order of first appearance
        of = [index.setdefault(tuple(lineage[i:]), len(index)) for lineage in lineages]
        ranks.append(dict(rank=rank, names=[node[0] for node in index], of=of))
    return ranks


def rank_names(hierarchy):
    """The ranks above the class, finest first: those between (e.g. genus, family), then the superclass."""
    return [r["rank"] for r in hierarchy.get("ranks", [])] + ["superclass"]


def nodes_at(hierarchy, rank):
    """(node names, node of each class) at one rank of the hierarchy."""
    if rank == "superclass":
        return hierarchy["superclass_names"], hierarchy["superclass_of"]
    return next((r["names"], r["of"]) for r in hierarchy.get("ranks", []) if r["rank"] == rank)


def two_levels(hierarchy):
    """The classes and their superclasses alone: what must agree between a run and its data or statistics (files made
    before ranks existed have no more); None for None."""
    return hierarchy and make_hierarchy(hierarchy["class_names"], hierarchy["superclass_names"],
                                        hierarchy["superclass_of"])


# Superclass ids are the row order of the authors' FineDiffusion-iNat.pt label table: do not reorder.
INAT21_SUPERCLASSES = ["Plants", "Insects", "Birds", "Fungi", "Reptiles", "Mammals", "Ray-finned Fishes",
                       "Amphibians", "Mollusks", "Arachnids", "Animalia"]

# iNat21 sorts its 10,000 species by taxonomy, so each supercategory is a contiguous id range (inclusive).
# Ids outside every range belong to the json's catch-all supercategory "Animalia" (worms, crustaceans, ...).
INAT21_ID_RANGES = [
    (4, 156, "Arachnids"),
    (175, 2700, "Insects"),
    (2756, 2938, "Ray-finned Fishes"),
    (2939, 3108, "Amphibians"),
    (3111, 4596, "Birds"),
    (4613, 4858, "Mammals"),
    (4859, 5171, "Reptiles"),
    (5219, 5387, "Mollusks"),
    (5388, 5728, "Fungi"),
    (5729, 9999, "Plants"),
]


def inat21_superclass_of(num_classes=10000):
    """superclass_of for iNat21 class ids 0..num_classes-1 from the built-in id-range table (no json needed)."""
    superclass_of = [INAT21_SUPERCLASSES.index("Animalia")] * num_classes
    for first, last, name in INAT21_ID_RANGES:
        for k in range(first, min(last, num_classes - 1) + 1):
            superclass_of[k] = INAT21_SUPERCLASSES.index(name)
    return superclass_of


def inat21_hierarchy():
    """iNat21's hierarchy without its json (e.g. to sample the authors' checkpoint): classes named by their
    5-digit id, as the dataset's folders begin (04021 is 04021_Animalia_...)."""
    return make_hierarchy([f"{k:05d}" for k in range(10000)], INAT21_SUPERCLASSES, inat21_superclass_of())


def vegfru_hierarchy(class_names, superclass_of):
    """VegFru's hierarchy from its split lists (hardening.read_vegfru_lists: subclasses named by their image folders,
    each under its images' superclass). The lists number the 25 superclasses without naming them: "sup-class 0" ..."""
    return make_hierarchy(class_names, [f"sup-class {s}" for s in range(max(superclass_of) + 1)], superclass_of)


class HierarchyView:
    """What a dataset tells of its hierarchy (self.hierarchy_, make_hierarchy's dict); targets[i]: item i's class."""

    def hierarchy(self):
        return self.hierarchy_

    class_names = property(lambda self: self.hierarchy_["class_names"])
    superclass_names = property(lambda self: self.hierarchy_["superclass_names"])
    superclass_of = property(lambda self: self.hierarchy_["superclass_of"])
    num_classes = property(lambda self: len(self.hierarchy_["class_names"]))
    num_superclasses = property(lambda self: len(self.hierarchy_["superclass_names"]))


# ----------------------------------------------------------------------------------------------------------
# TieredEmbedder (paper §3.2.1): subclass and superclass rows in one label table
# ----------------------------------------------------------------------------------------------------------

class TieredEmbedder(nn.Module):
    """Paper §3.2.1: one table of K subclass rows, a block of rows for each tier of the hierarchy (the paper's: the
    S superclasses) and (optionally) one null row.

    Row layout: [0, K) subclasses, then each tier's nodes in the order of `tier_sizes` ({rank: rows}; the paper's
    {"superclass": S} gives [K, K+S)), then the null row. With no tiers and a null row this is the official DiT
    LabelEmbedder (key `embedding_table`, K+1 rows), which the baselines use.
    In training, each subclass label is replaced by its node at one tier with probability `superclass_prob` (so the
    network also learns eps(x_t | c_p), the guide of eq. 1; the tier drawn by `tier_probs`, uniform by default) and
    by the null row with `null_prob` (standard CFG's eps(x_t | ∅)). In eval mode labels pass through untouched.
    """

    def __init__(self, num_classes, hidden_size, tier_sizes=None, hierarchy=None, null_class=True,
                 superclass_prob=0.0, null_prob=0.0, tier_probs=None):
        super().__init__()
        self.num_classes, self.null_class = num_classes, null_class
        self.tier_sizes = dict(tier_sizes or {})
        starts = np.cumsum([num_classes, *self.tier_sizes.values()])
        self.tier_start = {rank: int(start) for rank, start in zip(self.tier_sizes, starts)}   # first row of a tier
        self.num_superclasses = self.tier_sizes.get("superclass", 0)
        self.superclass_prob, self.null_prob, self.tier_probs = superclass_prob, null_prob, tier_probs
        self.embedding_table = nn.Embedding(int(starts[-1]) + int(null_class), hidden_size)
        # The hierarchy lives here and nowhere else in a built DiT: the node_of buffer that picks the guide rows of
        # eq. 1 is what `hierarchy` reports, so a run can only name the nodes it guides with. A buffer, so it moves
        # with the model; not in the state dict (published checkpoints carry no hierarchy).
        self.class_names = self.ranks = self.node_names = None
        self.register_buffer("node_of", torch.zeros(1, num_classes, dtype=torch.long), persistent=False)  # (R, K)
        if hierarchy is not None:
            self._set_hierarchy(hierarchy)

    def _set_hierarchy(self, hierarchy):
        names, ranks = hierarchy["class_names"], rank_names(hierarchy)
        sizes = {rank: len(nodes_at(hierarchy, rank)[0]) for rank in ranks}
        if len(names) != self.num_classes or any(sizes.get(r) != n for r, n in self.tier_sizes.items()):
            rows = ", ".join(f"{n} {rank}" for rank, n in self.tier_sizes.items()) or "0 superclass"
            raise UserError(f"a hierarchy of {len(names)} classes in {sizes['superclass']} superclasses does not fit a "
                            f"label table of {self.num_classes} subclass and {rows} rows")
        self.class_names, self.ranks = list(names), ranks
        self.node_names = {rank: list(nodes_at(hierarchy, rank)[0]) for rank in ranks}
        self.node_of = torch.as_tensor([nodes_at(hierarchy, rank)[1] for rank in ranks],
                                       device=self.node_of.device)                                   # (R, K)

    @property
    def hierarchy(self):
        """The hierarchy this table is used with, every node read back from the buffer that chooses the guide rows;
        None when none is known (the official DiT's ImageNet classes)."""
        if self.class_names is None:
            return None
        of = dict(zip(self.ranks, self.node_of.tolist()))
        between = [dict(rank=rank, names=self.node_names[rank], of=of[rank]) for rank in self.ranks[:-1]]
        return make_hierarchy(self.class_names, self.node_names["superclass"], of["superclass"], between)

    @property
    def null_id(self):
        return self.num_classes + sum(self.tier_sizes.values())

    def tier_ids(self, y, rank="superclass"):
        """Table rows of the nodes at tier `rank` of subclass labels y (the superclass's: the c_p of eq. 1)."""
        if self.class_names is None:       # rows K + 0 for every class: silently the wrong guide
            raise UserError(f"this DiT's label table has {self.num_superclasses} superclass rows but no hierarchy "
                            "says which subclass belongs to which")
        return self.tier_start[rank] + self.node_of[self.ranks.index(rank)][y]

    def substitute(self, y):
        """Training-time label substitution: y -> its node at a tier (p = superclass_prob), -> null (p = null_prob)."""
        is_sub = y < self.num_classes                            # labels that are already rows stay as they are
        if self.tier_sizes and self.superclass_prob > 0:
            to_tier = (torch.rand(y.shape[0], device=y.device) < self.superclass_prob) & is_sub
            up = torch.stack([self.tier_ids(y.clamp(max=self.num_classes - 1), r) for r in self.tier_sizes])  # (T, N)
            if len(up) > 1:                # which tier: one draw more (none for the paper's one tier: its stream kept)
                probs = torch.tensor(self.tier_probs or [1.0] * len(up), device=y.device)
                up = up.gather(0, torch.multinomial(probs, y.shape[0], replacement=True)[None])         # (1, N)
            y = torch.where(to_tier, up[0], y)
        if self.null_class and self.null_prob > 0:
            to_null = torch.rand(y.shape[0], device=y.device) < self.null_prob
            y = torch.where(to_null, torch.full_like(y, self.null_id), y)
        return y

    def forward(self, y, train):
        if train:
            y = self.substitute(y)
        return self.embedding_table(y)                           # (N, D)


# ----------------------------------------------------------------------------------------------------------
# DiT
# ----------------------------------------------------------------------------------------------------------

class DiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 num_classes=1000, num_superclasses=0, hierarchy=None, null_class=True, superclass_prob=None,
                 null_prob=None, learn_sigma=True, norm_affine=False, difffit_gates=False, tier_sizes=None,
                 tier_probs=None):
        super().__init__()
        if tier_sizes is None:                                   # the paper's table: the superclass rows alone
            tier_sizes = {"superclass": num_superclasses} if num_superclasses else {}
        # Substitution defaults follow from which rows exist (a table with both trains both guides).
        if superclass_prob is None:
            superclass_prob = SUPERCLASS_PROB if tier_sizes else 0.0
        if null_prob is None:
            null_prob = NULL_PROB if null_class else 0.0
        self.in_channels, self.patch_size, self.num_heads = in_channels, patch_size, num_heads
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.grad_checkpointing = False                          # train.py --grad-checkpointing: less memory

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = TieredEmbedder(num_classes, hidden_size, tier_sizes, hierarchy, null_class, superclass_prob,
                                         null_prob, tier_probs)
        num_patches = (input_size // patch_size) ** 2
        # Fixed sin-cos positions: a Parameter (for the official key `pos_embed`) that is never trained.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, norm_affine, difffit_gates)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm_affine)
        self.initialize_weights()

    @property
    def hierarchy(self):
        return self.y_embedder.hierarchy

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
LABEL_TABLE = "y_embedder.embedding_table.weight"


def build_model(name, image_size, num_classes, num_superclasses=0, method="finediffusion", hierarchy=None,
                pixel_space=False, table=None, tiers=None, tier_sizes=None, **kw):
    """A fresh DiT laid out for a tuning method.

    `finediffusion`: K+S label rows (no null row, as the authors' checkpoints) and LayerNorm affine.
    `full`, `bitfit`: the standard K+1 table with null dropout 0.1. `difffit`: that, plus LayerNorm affine
    and one scalar gate per branch. `table` overrides the method's label table: "tiered" (K+S rows, the guide of
    eq. 1) or "null" (K+1 rows, standard CFG's guide), so that what is tuned and how it is guided can be told apart.
    `tiers`: the ranks of the hierarchy a tiered table has rows for (default the paper's ["superclass"]; e.g.
    ["genus", "superclass"]), or their `tier_sizes` ({rank: rows}) where there is no hierarchy (Table 2's counts).
    `image_size` is in pixels: the DiT sees 8x smaller VAE latents, or the pixels themselves (3 channels) with
    `pixel_space=True` (the built-in toy data). `hierarchy` names the classes; a null table keeps it too.
    """
    tiered = (table or default_table(method)) == "tiered"
    if tier_sizes is None:
        tier_sizes = {r: num_superclasses if r == "superclass" else len(nodes_at(hierarchy, r)[0])
                      for r in tiers or ["superclass"]}
    kw.setdefault("null_class", not tiered)
    kw.setdefault("norm_affine", method in ("difffit", "finediffusion"))
    kw.setdefault("difffit_gates", method == "difffit")
    input_size, in_channels = (image_size, 3) if pixel_space else (image_size // 8, LATENT_CHANNELS)
    return DiT_models[name](input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                            tier_sizes={r: n for r, n in tier_sizes.items() if n and tiered}, hierarchy=hierarchy,
                            **kw)


TABLES = ("tiered", "null")


def default_table(method):
    """The label table a method comes with: FineDiffusion's tiered one, the baselines' null row."""
    return "tiered" if method == "finediffusion" else "null"


def is_trainable(name, method):
    """Does `method` train the tensor called `name`? (pos_embed is fixed sin-cos and never trained.)"""
    if name == "pos_embed":
        return False
    if method == "full":
        return True
    table = name == LABEL_TABLE
    bias = name.endswith(".bias")
    norm = ".norm" in name                                   # norm1, norm2, norm_final: LayerNorm affine
    gate = name.endswith(("gamma1", "gamma2"))
    return {"bitfit": table or bias, "difffit": table or bias or norm or gate, "finediffusion": table or bias or norm}[method]


def set_trainable(model, method):
    """Freeze everything `method` does not train. Returns (trainable, total) parameter counts."""
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name, method))
        if name != "pos_embed":
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def count_table2(name="DiT-XL/2", image_size=256, num_classes=10000, tier_sizes=None):
    """Rows of paper Table 2: (method, trainable, total), counted on the meta device (no allocation). tier_sizes: the
    tiered table's rows per rank (default iNat21's 11 superclasses, the paper's)."""
    rows = []
    with torch.device("meta"):
        for method in METHODS:
            model = build_model(name, image_size, num_classes, method=method, tier_sizes=tier_sizes or {"superclass": 11})
            rows.append((method, *set_trainable(model, method)))
    return rows


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
      config      build_model's keyword arguments: name, image_size, num_classes, num_superclasses, method, table,
                  pixel_space (and learn_sigma when False).
      hierarchy   {"class_names", "superclass_names", "superclass_of"} of the training data (data.py).
      vae         None for a pixel-space DiT, else the identity of the VAE it was trained with:
                  {"sha256" of the weights file, "config"}.
      step, args  the training step and train.py's arguments (a dict).
      time_s      the wall time of the training loop up to `step`, summed over resumes (seconds).
      train       only in training checkpoints (absent from --export files): what --resume needs to continue
                  bit for bit: {"opt", "scaler", "rng" (one entry per rank), "world_size", "epoch", "position"}.
    The official {"model", "ema"} layout is a subset, so an exported checkpoint also loads in DiT's own code.
    """
    atomic_write(path, lambda f: torch.save(fields, f))


def checkpoint_label(path):
    """How tables name a checkpoint: `run/0001500` for results/run/checkpoints/0001500.pt, else the file name."""
    folder, name = os.path.split(os.path.abspath(path))
    if os.path.basename(folder) == "checkpoints":
        return f"{os.path.basename(os.path.dirname(folder))}/{os.path.splitext(name)[0]}"
    return name


def dit_config_from_state(state):
    """The DiT configuration from tensor shapes alone (all that the official files carry)."""
    shape = dit_shapes(state, LABEL_TABLE, {size: (d, h) for size, (d, h, _) in _CONFIGS.items()})
    patch, in_channels = shape["patch"], shape["in_channels"]
    return dict(name=f"DiT-{shape['size']}/{patch}", input_size=int(round(shape["num_patches"] ** 0.5)) * patch,
                in_channels=in_channels, learn_sigma=shape["out_channels"] == 2 * in_channels, rows=shape["rows"],
                norm_affine="blocks.0.norm1.weight" in state, difffit_gates="blocks.0.gamma1" in state)


def load_pretrained(model, path_or_state, source="the base checkpoint"):
    """Load official DiT, authors' FineDiffusion or our (full) checkpoints into `model`, from a file or a loaded
    checkpoint or state dict ({"model"|"ema": ...} wrappers too, EMA preferred) -> a report. A label table of another
    size is re-initialised (N(0, 0.02), as DiT's init); LayerNorm affine and DiffFit gates the file lacks start at the
    identity; anything else that does not fit is one line naming the tensor (hardening.load_strict)."""
    ckpt = read_checkpoint(resolve_checkpoint(path_or_state)) if isinstance(path_or_state, (str, os.PathLike)) \
        else path_or_state
    state, own = dict(checkpoint_tensors(ckpt)), model.state_dict()
    report = dict(reinitialised=[], identity=[k for k in own.keys() - state.keys()
                                             if ".norm" in k or k.endswith(("gamma1", "gamma2"))])
    if LABEL_TABLE in state and state[LABEL_TABLE].shape != own[LABEL_TABLE].shape:     # new classes, new rows
        report["reinitialised"].append(f"{LABEL_TABLE}: {tuple(state.pop(LABEL_TABLE).shape)} -> "
                                       f"{tuple(own[LABEL_TABLE].shape)}")
        nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    skipped = set(report["identity"]) | ({LABEL_TABLE} if report["reinitialised"] else set())
    load_strict(model, state, source, expected={k: v for k, v in own.items() if k not in skipped})
    return report


def base_tensors(ckpt, base=None, base_flag="--base"):
    """The tensors a delta checkpoint goes onto: its base file (`base`, if it moved, else the recorded path), the one
    whose sha256 was recorded at training time (hardening.delta_base). base_flag: the flag that moves it."""
    return checkpoint_tensors(read_checkpoint(delta_base(ckpt, base, base_flag)))


# Published checkpoints carry tensors only. Their label-table layout (rows, LayerNorm affine) says whose they are:
# -> (K subclass rows, S superclass rows, null row, the hierarchy that goes with the rows, or None). The authors' files
# have K + S rows, no null row, and LayerNorm affine; the rows alone cannot tell VegFru's hierarchy (load_model's).
PUBLISHED_TABLES = {
    (1001, False): (1000, 0, True, None),                    # official DiT: ImageNet-1k + null row
    (10011, True): (10000, 11, False, inat21_hierarchy()),   # FineDiffusion-iNat.pt, -iNat-512.pt: iNat21's rows
    (317, True): (292, 25, False, None),                     # FineDiffusion-VegFru.pt: VegFru's 292 + 25 rows
}


def published_layout(state):
    """The DiT a published checkpoint (official DiT, the authors' FineDiffusion) holds, from its tensors alone
    -> (DiT_models keyword arguments, config as save_checkpoint's, hierarchy or None)."""
    cfg = dit_config_from_state(state)
    K, S, null, hierarchy = PUBLISHED_TABLES.get((cfg["rows"], cfg["norm_affine"]), (cfg["rows"] - 1, 0, True, None))
    kwargs = dict(input_size=cfg["input_size"], in_channels=cfg["in_channels"], num_classes=K, num_superclasses=S,
                  null_class=null, learn_sigma=cfg["learn_sigma"], norm_affine=cfg["norm_affine"],
                  difffit_gates=cfg["difffit_gates"])
    pixel = cfg["in_channels"] == 3
    config = dict(name=cfg["name"], image_size=cfg["input_size"] * (1 if pixel else 8), num_classes=K,
                  num_superclasses=S, pixel_space=pixel, **({} if cfg["learn_sigma"] else dict(learn_sigma=False)))
    return kwargs, config, hierarchy


def load_model(path, base=None, weights="ema", base_flag="--base", hierarchy_of_file=None):
    """The DiT a checkpoint describes, with its `weights` ("ema" to sample, "model" to resume) loaded, in eval
    mode, and its hierarchy inside (model.hierarchy: the one the guide rows are read from). `path` goes through
    resolve_checkpoint. Returns (model, info): info has path (the file read), config, args, step, time_s, vae and
    published (a file of tensors alone). base, base_flag: where a delta's base moved to, and the flag that says so (see
    base_tensors). hierarchy_of_file(): the hierarchy of a published file whose rows do not tell it
    (FineDiffusion-VegFru.pt's), called for such a file alone.

    Ours carry `config` and the hierarchy (see save_checkpoint); the official DiT and the authors'
    FineDiffusion files carry only tensors, so their configuration and hierarchy come from the tensor shapes.
    """
    path = resolve_checkpoint(path)
    ckpt = read_checkpoint(path)
    tensors = checkpoint_tensors(ckpt, weights)
    if "config" not in ckpt:
        kwargs, config, known = published_layout(tensors)
        if known is None and kwargs["num_superclasses"] and hierarchy_of_file is not None:   # VegFru's file
            known = hierarchy_of_file()
        model = DiT_models[config["name"]](**kwargs, hierarchy=known)
        load_strict(model, tensors, path)
        return model.eval(), dict(path=path, config=config, args={}, step=None, time_s=None, vae=None, published=True)
    config = check_config(ckpt["config"], path)
    hierarchy = None if ckpt.get("hierarchy") is None else check_hierarchy(ckpt["hierarchy"], path)
    model = build_model(**config, hierarchy=hierarchy)
    if ckpt.get("base"):                                         # the tuned tensors, over the base's
        load_pretrained(model, base_tensors(ckpt, base, base_flag))
        tuned = {k: v for k, v in model.state_dict().items() if is_trainable(k, config["method"])}
        load_strict(model, tensors, path, expected=tuned)
    else:
        load_strict(model, tensors, path)
    info = dict(path=path, config=config, args=ckpt.get("args") or {}, step=ckpt.get("step"),
                time_s=ckpt.get("time_s"), vae=ckpt.get("vae"), published=False)
    return model.eval(), info


if __name__ == "__main__":
    full_total = None
    print("Paper Table 2 — DiT-XL/2, 256x256, iNat21-mini (10,000 classes, 11 superclasses)")
    print(f"{'method':<15}{'trainable':>12}{'share':>9}   paper")
    paper = dict(full="685.2M (100%)", bitfit="12.01M (1.75%)", difffit="12.14M (1.77%)",
                 finediffusion="12.15M (1.77%)")
    for method, trainable, total in count_table2():
        full_total = full_total or total
        print(f"{method:<15}{trainable / 1e6:>11.2f}M{100 * trainable / full_total:>8.2f}%   {paper[method]}")
    genera = 4884      # iNat21's genera (Van Horn et al. 2021); `python data.py info --data inat21` counts its json's
    trainable = dict((m, n) for m, n, _ in count_table2(tier_sizes=dict(genus=genera, superclass=11)))["finediffusion"]
    print(f"finediffusion with train.py --tiers genus,superclass ({genera:,} genus rows more): "
          f"{trainable / 1e6:.2f}M ({100 * trainable / full_total:.2f}%)")

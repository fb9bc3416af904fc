"""The paper's figures, drawn with Pillow: the guidance sweep (FID (cls) against subclass accuracy), Fig. 7 (a t-SNE of
each checkpoint's label table), Fig. 5 (one seed across methods) and Fig. 2 with the training curves (FID against
training time). Commands of evaluate.py (RUNS: run folders, e.g. results/toy-finediffusion-s0 results/toy-full-s0):

    python evaluate.py toy --ckpt results/toy-* --cfg-scales 1 1.5 2 3 4 6 --plot sweep.png
    python evaluate.py embeddings --ckpt RUNS --out fig7.png
    python evaluate.py grid --ckpt RUNS --class-ids 8 9 10 11 --data toy --out fig5.png
    python evaluate.py curves --runs RUNS --toy-json toy.json --out curves.png

Pillow rather than matplotlib: a few scatter and line plots need no new dependency, and the tests check every figure
wherever the suite runs. Every figure command writes FIGURE.png and, beside it, the numbers it shows: FIGURE.csv (and
FIGURE.json where they do not fit one table).
"""
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import data
from hardening import (UserError, atomic_write, check_hierarchy, checkpoint_tensors, nonnegative_int, out_file,
                       read_checkpoint, read_json, resolve_checkpoint, resolve_class, write_csv, write_json)
from model import LABEL_TABLE, METHODS, build_model, nodes_at, published_layout, rank_names, two_levels
from sample import CFG_SCALE, add_sampler_args, guide_labels, load_for_sampling, sample_images, sampler_of

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
    pad = 0.06 * (max(values) - min(values)) or 0.1 * abs(min(values)) or 1.0
    return min(values) - pad, max(values) + pad


class Panel:
    """One plot: data coordinates -> pixels inside `margin` (left, top, right, bottom), axes with ticks (or a bare
    frame: t-SNE axes mean nothing), markers (see glyph), lines, and a legend in the right margin."""

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
        self.glyph(self.xy(x, y), colour, shape, r)

    def line(self, xs, ys, colour, width=2):
        points = [self.xy(x, y) for x, y in zip(xs, ys)]
        if len(points) > 1:
            self.draw.line(points, fill=colour, width=width)

    def legend(self, entries):
        """entries: [(label, colour, shape)], right of the frame, where they hide no data."""
        x, y = self.box[2] + 8, self.box[1] + 6
        for i, (label, colour, shape) in enumerate(entries):
            self.glyph((x + 8, y + 16 * i + 6), colour, shape, 4 if shape == "o" else 6)
            put_text(self.draw, (x + 20, y + 16 * i + 6), label, 11, "lm")

    def glyph(self, centre, colour, shape, r):
        """A marker: o (disc), s (square), + (superclass row), * (star: subclass mean)."""
        x, y = centre
        if shape == "o":
            self.draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        elif shape == "s":
            self.draw.rectangle([x - r, y - r, x + r, y + r], fill=colour, outline=BLACK)
        elif shape == "+":
            self.draw.line([(x - r, y), (x + r, y)], fill=colour, width=3)
            self.draw.line([(x, y - r), (x, y + r)], fill=colour, width=3)
        elif shape == "*":                                     # ten corners, at r and 0.45 r in turn
            self.draw.polygon([(x + radius * math.sin(k * math.pi / 5), y - radius * math.cos(k * math.pi / 5))
                               for k, radius in enumerate([r, 0.45 * r] * 5)], fill=colour, outline=BLACK)
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
    """FIGURE.png (a path figure_path took) and beside it FIGURE.csv of `rows` and, with `extra`, FIGURE.json."""
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
                px, py = panel.xy(r["sub_acc"], r["fid"])
                put_text(panel.draw, (px + 6, py - 2), f"{r['cfg_scale']:g}", 11, "lb", colours[ckpt])
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
    bisection so that each row's perplexity exp(H(P_i)) (H in nats) is `perplexity`."""
    off = ~torch.eye(len(sq_dist), dtype=torch.bool, device=sq_dist.device)
    d = sq_dist - sq_dist.masked_fill(~off, math.inf).min(1, keepdim=True).values  # p is shift-free; exp() safe
    beta = torch.ones_like(d[:, :1])                           # [N, 1]
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
    """(dKL(P || Q) / dY, Q) for the map Y [N, 2]: q_ij = (1 + |y_i - y_j|^2)^-1 / sum_{k != l} (1 + |y_k - y_l|^2)^-1,
    and the gradient (paper eq. 5) dC/dy_i = 4 sum_j (p_ij - q_ij)(y_i - y_j)(1 + |y_i - y_j|^2)^-1."""
    num = 1 / (1 + squared_distances(y))
    num.fill_diagonal_(0)
    q = (num / num.sum()).clamp_min(1e-12)
    pq = (p - q) * num
    return 4 * (pq.sum(1, keepdim=True) * y - pq @ y), q


def tsne(x, perplexity=30.0, iters=1000, seed=0, progress=False):
    """2-D t-SNE of rows x [N, D] -> (Y [N, 2], KL(P || Q) at the end)."""
    n = len(x)
    p = tsne_affinities(squared_distances(x), min(perplexity, (n - 1) / 3)).clamp_min(1e-12)
    y = (1e-2 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)).to(x.device)
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
    for start in range(0, len(x), chunk):                       # (N, N) distances a chunk of rows at a time
        d = torch.cdist(x[start:start + chunk].double(), x.double())
        d[torch.arange(len(d)), torch.arange(start, start + len(d))] = math.inf
        nearest = d.topk(k, largest=False).indices               # (chunk, k)
        hits += (superclass[nearest] == superclass[start:start + chunk, None]).double().sum().item()
    return hits / (len(x) * k)


def label_table(path):
    """(subclass rows [K, D], superclass rows [S, D] of the EMA table, hierarchy, method) of a checkpoint, read from
    the file alone: only the table is needed, so no DiT is built and no base file or VAE is needed (the authors' XL
    file is 2.7 GB)."""
    ckpt = read_checkpoint(path)
    state = checkpoint_tensors(ckpt)                            # ours (a delta too: every method tunes the table)
    if LABEL_TABLE not in state:
        raise UserError(f"{path} holds no label table ({LABEL_TABLE})")
    if "config" in ckpt:
        method = ckpt["config"].get("method", "?")
        hierarchy = None if ckpt.get("hierarchy") is None else check_hierarchy(ckpt["hierarchy"], path)
        with torch.device("meta"):                              # which rows the method's table has, at no cost
            embedder = build_model(**ckpt["config"], hierarchy=hierarchy).y_embedder
        K, S, start = embedder.num_classes, embedder.num_superclasses, embedder.tier_start.get("superclass")
    else:                                                       # official DiT / the authors': as load_model reads them
        _, config, hierarchy = published_layout(state)
        K, S, start = config["num_classes"], config["num_superclasses"], config["num_classes"]
        method = "finediffusion" if S else "?"
    if hierarchy is None:
        raise UserError(f"{path} carries no class hierarchy: its subclasses cannot be coloured by superclass")
    table = state[LABEL_TABLE].float()
    return table[:K], table[start:start + S] if S else table[:0], hierarchy, method


def embed_label_table(table, supers, hierarchy, args):
    """Fig. 7's picture and numbers for one table: t-SNE of (at most --max-points subclass rows, the superclass
    rows, each superclass's mean subclass row) and the share of each subclass's nearest subclasses that share its
    node at each rank (the superclass; genus ... where the hierarchy has them), in 2-D and in the table's own space,
    on the same subclasses."""
    K, S = len(table), len(supers)
    sup, keep = torch.as_tensor(hierarchy["superclass_of"]), torch.arange(K)
    if 0 < args.max_points < K:                                 # a random subset, the same for every checkpoint
        keep = torch.randperm(K, generator=torch.Generator().manual_seed(args.seed))[:args.max_points].sort().values
    present = sup.unique()
    means = torch.stack([table[sup == s].mean(0) for s in present])    # of every subclass, not only those kept
    if len(keep) < 2:
        raise UserError(f"a label table of {len(keep)} subclass rows has no neighbours to count")
    y, kl = tsne(torch.cat([table[keep], supers, means]).to(args.device), args.perplexity, args.iters,
                 args.seed, progress=True)
    y, n = y.cpu(), len(keep)
    k = min(args.neighbours, n - 1)
    shares = {}
    for rank in rank_names(hierarchy):                          # the superclass last: its keys as before ranks
        node = torch.as_tensor(nodes_at(hierarchy, rank)[1])[keep]
        counts = torch.bincount(node).double()
        shares.update({f"same_{rank}_2d": same_superclass_neighbours(y[:n], node, k),
                       f"same_{rank}_original": same_superclass_neighbours(table[keep], node, k),
                       **({} if rank == "superclass" else {f"chance_{rank}": float((counts * (counts - 1)).sum() /
                                                                                    (n * (n - 1)))})})
    return dict(points=n, neighbours=k, **shares, chance=float((counts * (counts - 1)).sum() / (n * (n - 1))),
                best=float(((counts[sup[keep]] - 1).clamp(max=k) / k).mean()), kl=kl,
                subclass=[[*xy, int(c), int(sup[c])] for xy, c in zip(y[:n].tolist(), keep)],
                superclass=[[*xy, s] for s, xy in enumerate(y[n:n + S].tolist())],
                mean=[[*xy, int(s)] for xy, s in zip(y[n + S:].tolist(), present)])


def embedding_panel(result, title):
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
    legend = [(name[:24], colour(s), "o") for s, name in enumerate(result["superclass_names"])][:20]
    panel.legend(legend + [("superclass row", BLACK, "+"), ("mean of subclasses", BLACK, "*")])
    put_text(panel.draw, (panel.box[0] + 6, panel.box[3] - 6), f"same-superclass {result['neighbours']}-NN: 2-D "
             f"{result['same_superclass_2d']:.2f}, table {result['same_superclass_original']:.2f} "
             f"(chance {result['chance']:.2f})", 12, "lb")
    return panel


def cmd_embeddings(args):
    figure_path(args.out)
    if args.iters < 1 or args.neighbours < 1 or args.perplexity <= 1:
        raise UserError("--iters and --neighbours must be positive and --perplexity above 1")
    rows, results = [], []
    for path in map(resolve_checkpoint, args.ckpt):
        table, supers, hierarchy, method = label_table(path)
        K, S = len(table), len(supers)
        result = embed_label_table(table, supers, hierarchy, args)
        points = {k: result.pop(k) for k in ("subclass", "superclass", "mean")}       # in the JSON, not the CSV
        rows.append(dict(ckpt=checkpoint_label(path), method=method, classes=K, superclasses=S, **result))
        results.append(dict(rows[-1], superclass_names=hierarchy["superclass_names"], **points))
    print(f"{'checkpoint':<36}{'method':<15}{'points':>7}   same-superclass share of the k nearest subclasses")
    print(f"{'':<58}{'k':>3}{'2-D':>7}{'table':>7}{'chance':>8}{'best':>6}")
    for r in rows:
        print(f"{r['ckpt'][:35]:<36}{r['method']:<15}{r['points']:>7}{r['neighbours']:>3}"
              f"{r['same_superclass_2d']:>7.3f}{r['same_superclass_original']:>7.3f}{r['chance']:>8.3f}"
              f"{r['best']:>6.3f}")
        for rank in [key[5:-3] for key in r if key.startswith("same_") and key.endswith("_2d")][:-1]:  # genus, ...
            print(f"{'':<36}{'same ' + rank:<28}{r[f'same_{rank}_2d']:>7.3f}{r[f'same_{rank}_original']:>7.3f}"
                  f"{r[f'chance_{rank}']:>8.3f}")
    panels = [embedding_panel(r, f"{r['ckpt']} ({r['method']})").image for r in results]
    settings = dict(max_points=args.max_points, perplexity=args.perplexity, iters=args.iters, seed=args.seed)
    save_figure(args.out, tile(panels, min(len(panels), 4)), rows, dict(settings=settings, checkpoints=results))


# ---- paper Fig. 5: the same classes and seed across methods ------------------------------------------------------

GRID_LABEL_WIDTH, GRID_HEADER, GRID_PAD, GRID_MIN_CELL = 170, 40, 4, 96


def grid_image(cells, row_labels, column_labels):
    """cells[r][c]: uint8 (H, W, 3) images, shown at max(H, GRID_MIN_CELL) pixels (small toy images enlarged
    pixel by pixel) in steps of cell + GRID_PAD; labels: a list of lines per row and per column."""
    cell = max(cells[0][0].shape[0], GRID_MIN_CELL)
    step = cell + GRID_PAD
    sheet = Image.new("RGB", (GRID_LABEL_WIDTH + len(column_labels) * step, GRID_HEADER + len(cells) * step), "white")
    draw = ImageDraw.Draw(sheet)
    fit = lambda text, width: next(text[:n] for n in range(len(text), -1, -1)      # cut to the width
                                   if draw.textlength(text[:n], font=font(11)) <= width)
    for c, label in enumerate(column_labels):
        for i, line in enumerate(label):
            put_text(draw, (GRID_LABEL_WIDTH + c * step + cell / 2, 6 + 15 * i), fit(line, cell), 11, "mt")
    for r, (row, label) in enumerate(zip(cells, row_labels)):
        top = GRID_HEADER + r * step
        for i, line in enumerate(label):
            put_text(draw, (6, top + 8 + 15 * i), fit(line, GRID_LABEL_WIDTH - 10), 11, "lt")
        for c, image in enumerate(row):
            sheet.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (GRID_LABEL_WIDTH + c * step, top))
    return sheet


def real_row(args, num_classes, image_size):
    """One real image of each --class-ids class (the first readable one of its class in --split) from --data."""
    split = args.split or "val"
    dataset = data.build_dataset(args.data, args.data_path, image_size, split, flip=False,
                                 hierarchy_csv=args.hierarchy_csv)
    if dataset.num_classes != num_classes:
        raise UserError(f"--data {args.data} has {dataset.num_classes} classes, the checkpoints {num_classes}")
    targets, images = np.asarray(dataset.targets), []
    for c in args.class_ids:
        x, _ = next(data.readable_items(dataset, np.flatnonzero(targets == c)), (None, None))  # (3, H, W) in [-1, 1]
        if x is None:
            raise UserError(f"--data {args.data} (split {split}) has no readable image of class {c}")
        images.append(((x + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
    return images


def cmd_grid(args):
    figure_path(args.out)
    sampler, y = sampler_of(args), torch.tensor(args.class_ids)
    cells, labels, rows, hierarchy, num_classes = [], [], [], None, None
    root = data.dataset_root(args.data, args.data_path)           # VegFru's lists: FineDiffusion-VegFru.pt's classes
    for ckpt in args.ckpt:
        model, info, vae = load_for_sampling(ckpt, vae=args.vae, data_path=root)
        name, method = checkpoint_label(info["path"]), info["config"].get("method", "?")
        if cells and (two_levels(model.hierarchy), model.y_embedder.num_classes) != (two_levels(hierarchy), num_classes):
            raise UserError(f"{info['path']} has other classes than {args.ckpt[0]}: a grid compares methods on the "
                            "same classes")
        hierarchy, num_classes, size = model.hierarchy, model.y_embedder.num_classes, info["config"]["image_size"]
        names = hierarchy["class_names"] if hierarchy else None
        for c in args.class_ids:
            resolve_class(hierarchy, num_classes, class_id=c, flag="--class-ids")
        auto = "superclass" if model.y_embedder.num_superclasses else "null"     # eq. 1 where the table has the rows
        guidance = auto if args.guidance == "auto" else args.guidance    # each method as it is meant to be sampled
        guide = guide_labels(model, y, guidance, args.cfg_scale)
        cells.append(list(sample_images(model, y, guide, args.cfg_scale, sampler, vae, args.seed, args.device,
                                        progress=False).numpy()))     # every row: the same seed, the same noise
        labels.append([name, method, "unguided" if guide is None else f"{guidance}, w = {args.cfg_scale:g}"])
        rows += [dict(row=len(cells), ckpt=name, method=method, guidance=guidance,
                      guide_row=None if guide is None else int(guide[i]), cfg_scale=args.cfg_scale,
                      **sampler.record(), seed=args.seed, class_id=c, class_name=names[c] if names else None)
                 for i, c in enumerate(args.class_ids)]
        del model, vae
    if args.data:
        cells.insert(0, real_row(args, num_classes, size))
        labels.insert(0, ["real images", f"--data {args.data}"])
        rows = [dict(row=0, ckpt="real", class_id=c, class_name=names[c] if names else None)
                for c in args.class_ids] + rows
    columns = [[f"class {c}", names[c] if names else ""] for c in args.class_ids]
    save_figure(args.out, grid_image(cells, labels, columns), rows)


# ---- training curves and paper Fig. 2: FID against training time --------------------------------------------------

def time_unit(seconds):
    """A readable unit for a time axis that reaches `seconds`: (divisor, name)."""
    return (1, "s") if seconds < 300 else (60, "min") if seconds < 3 * 3600 else (3600, "h")


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
    for (_, method, guidance), group in curves.items():
        colour = PALETTE[METHODS.index(method) if method in METHODS else -1]
        shape = dict(none="s", null="o", superclass="*").get(guidance, "o")
        group.sort(key=lambda r: r["train_time_s"])
        panel.line([r["train_time_s"] / div for r in group], [r["fid"] for r in group], colour)
        for r in group:
            panel.marker(r["train_time_s"] / div, r["fid"], colour, shape, 6)
        legend[f"{method} {guidance}"] = (f"{method} {guidance}", colour, shape)
    panel.legend(list(legend.values()))
    return panel, [dict(panel="fid_vs_time", run=r["ckpt"], method=r["method"], guidance=r["guidance"],
                        cfg_scale=r.get("cfg_scale"), step=r.get("step"), time_s=r["train_time_s"], fid=r["fid"])
                   for r in rows]


def cmd_curves(args):
    """Loss against step and against wall time, a curve per run; with --toy-json, Fig. 2 beside them."""
    figure_path(args.out)
    logs = {}
    for run in args.runs:
        name = os.path.basename(os.path.normpath(run if os.path.isdir(run) else os.path.dirname(os.path.abspath(run))))
        logs[name if name not in logs else run] = read_log(run)
    if not all(logs.values()):
        raise UserError(f"an empty training log among {', '.join(args.runs)}")
    records = [r for log in logs.values() for r in log]
    div, unit = time_unit(max(r["time_s"] for r in records))
    panels = []
    for title, x, xlabel in (("step", lambda r: r["step"], "step"),
                             ("wall time", lambda r: r["time_s"] / div, f"wall time ({unit})")):
        panel = Panel(f"training loss against {title}", [x(r) for r in records], [r["loss"] for r in records],
                      xlabel, "loss")
        for i, log in enumerate(logs.values()):
            panel.line([x(r) for r in log], [r["loss"] for r in log], PALETTE[i % len(PALETTE)])
            if len(log) == 1:
                panel.marker(x(log[0]), log[0]["loss"], PALETTE[i % len(PALETTE)])
        panel.legend([(name, PALETTE[i % len(PALETTE)], "o") for i, name in enumerate(logs)])
        panels.append(panel)
    rows = [dict(panel="loss", run=name, step=r["step"], time_s=r["time_s"], loss=r["loss"])
            for name, log in logs.items() for r in log]
    if args.toy_json:
        panel, fig2_rows = fig2_panel([r for path in args.toy_json for r in read_json(path, "toy table")],
                                      args.cfg_scale)
        panels.append(panel)
        rows += fig2_rows
    save_figure(args.out, tile([p.image for p in panels], len(panels)), rows)


def checkpoint_label(path):
    """`run/0001500` for results/run/checkpoints/0001500.pt, else the file name."""
    folder, name = os.path.split(os.path.abspath(path))
    if os.path.basename(folder) == "checkpoints":
        return f"{os.path.basename(os.path.dirname(folder))}/{os.path.splitext(name)[0]}"
    return name


def read_log(path):
    """The records of a run's log.jsonl (a run folder or the file) in training order. A run resumed from an earlier
    checkpoint logs its steps again: the later records replace the earlier ones."""
    path = os.path.join(path, "log.jsonl") if os.path.isdir(path) else path
    try:
        with open(path, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the training log {path}: {e}") from None
    records = []
    for r in lines:
        while records and records[-1]["step"] >= r["step"]:
            records.pop()
        records.append(r)
    return records


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
    p.add_argument("--guidance", default="auto", help="auto: superclass rows (eq. 1) where the table has them, else "
                   "the null row (standard CFG); or superclass, another tier of the tables (e.g. genus), null, none")
    add_sampler_args(p)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--vae", help="SD VAE for latent models; default: the checkpoint's (the authors' files: "
                                 "sd-vae-ft-mse), else sd-vae-ft-ema")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", choices=data.DATASETS, help="a first row of real images of each class, from this dataset")
    p.add_argument("--data-path", help="dataset root; default: data/<--data> (VegFru's also gives the authors' "
                                       "FineDiffusion-VegFru.pt its superclasses)")
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

"""Generate images of one fine-grained class with fine-grained classifier-free guidance (paper §3.2.2).

    python sample.py --class-id 4021                                   # the newest checkpoint under results/
    python sample.py --ckpt FineDiffusion-iNat.pt --class-id 4021      # the authors' model
    python sample.py --class-name "disc/striped" --guidance null --cfg-scale 4 --sampler ddim --steps 50
    python sample.py --class-id 4021 --sampler dpm++2m-sde --steps 20 --guidance-interval 200 700

Each sampling step runs the DiT on [x_t; x_t] with labels [c; guide] and mixes the two predictions (eq. 1):
    eps = eps(x_t | guide) + w * (eps(x_t | c) - eps(x_t | guide)),
the guide being the class's superclass row (--guidance superclass, the paper's), its node's row at another tier of
the table (e.g. --guidance genus, for a DiT trained with --tiers genus,superclass), the null row (null: standard CFG)
or nothing (none: eps(x_t | c) alone). Defaults are the paper's (§4.2): 250 DDPM steps, w = 4; latents decode through the
SD VAE, in fp32. Faster: DPM-Solver++(2M) (SDE) in 20 steps (diffusion.py; 40 DiT evaluations an image), and
--guidance-interval LO HI (Kynkäänniemi et al. 2024): eq. 1 only at the steps LO <= t <= HI of 0 ... 999, the others on
the conditional half alone (half the cost). Step t has noise level sigma_t = sqrt((1 - abar_t) / abar_t): 0.34 at
t = 100, 0.72 at 200, 1.24 at 300, 2.04 at 400, 3.44 at 500, 6.17 at 600, 12.0 at 700, 25.7 at 800, 157 at 999.
What the console says a run uses (class, guide row, sampler, checkpoint, VAE) is read from what it samples with.
"""
import math
import os
import sys
from functools import partial

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

import hardening as guard
from diffusion import TRAINED_STEPS, create_diffusion
from hardening import (AUTHORS_CHECKPOINT, ArgumentParser, atomic_write, device_name, finite_float, folder_path, int_in,
                       nonnegative_int, out_file, out_of_memory_advice, positive_int, precision_context, run_cli)
from model import load_model, vegfru_hierarchy
from vae import LATENT_SCALE, AutoencoderKL, latent_scale, same_vae

CFG_SCALE = 4.0         # paper §4.2: the guidance scale w of every table
STEPS = 250             # paper §4.2: DDPM sampling steps
SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++2m-sde")
DEFAULT_STEPS = {"ddpm": STEPS, "ddim": 50, "dpm++2m": 20,   # --steps when not given: the paper's 250 DDPM steps, ...
                 "dpm++2m-sde": 20}
AUTHORS_VAE = "sd-vae-ft-mse"   # what the authors' sample.py decodes their FineDiffusion files with (its --vae mse)


# ----------------------------------------------------------------------------------------------------------
# Sampling one class: x_T -> the sampler's steps, each guided by eq. 1 -> VAE decode -> uint8
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_images(model, y, guide=None, cfg_scale=CFG_SCALE, sampler=None, vae=None, seed=0, device="cpu",
                  precision="fp32", guide_all_channels=False, progress=True):
    """Images of classes y (N,) as uint8 (N, H, W, 3), as the official DiT samples them.

    guide: (N,) label-table rows of the guide half (guide_labels), or None to sample unguided.
    sampler: a Sampler (default: the paper's 250 DDPM steps, eq. 1 at every step).
    seed: an int, one stream for the batch as in DiT's sample.py (x_T, then each step's noise: an image depends on
    its batch), or one seed per image (ImageNoise: an image depends on its own seed alone).
    precision: the DiT's; the VAE decodes in fp32 whatever it is (fp16 overflows in its decoder, as diffusers knows).
    A sample that is not finite stops the run (RunFailed) before any image is returned."""
    sampler = sampler or Sampler()
    model = model.to(device).eval()
    y = torch.as_tensor(y, device=device)
    shape = (len(y), model.in_channels, model.input_size, model.input_size)
    if isinstance(seed, int):
        torch.manual_seed(seed)
        z, randn_like = torch.randn(shape, device=device), torch.randn_like   # (N, C, h, w)
    else:
        randn_like = ImageNoise(seed, device)
        z = randn_like(torch.empty(shape, device=device))                    # (N, C, h, w)
    if guide is not None:
        z = torch.cat([z, z], dim=0)                          # (2N, C, h, w): [conditional; guide]
        kwargs = dict(y=torch.cat([y, torch.as_tensor(guide, device=device)]), cfg_scale=cfg_scale,
                      guide_channels=None if guide_all_channels else 3)
        net = model.forward_with_cfg if sampler.interval is None else interval_guidance(model, *sampler.interval)
    else:
        kwargs, net = dict(y=y), model.forward
    low_precision = precision_context(precision, torch.device(device).type)

    def eps_model(x, t, **kw):
        with low_precision:
            return net(x, t, **kw).float()                    # the diffusion math stays in fp32

    x = sampler.loop(model.learn_sigma)(eps_model, z.shape, z, model_kwargs=kwargs, progress=progress, device=device,
                                        randn_like=randn_like)
    x = guard.check_samples(x[: len(y)], y, f"after {sampler}")       # drop the guide half
    if vae is not None:
        x = guard.check_samples(vae.to(device).decode(x / vae.scaling_factor).float(), y, "once decoded by the VAE")
    return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8)  # (N, H, W, 3)


class ImageNoise:
    """randn_like with one stream per image, as edm2 seeds each image: image i's x_T and every step's noise come from
    a generator seeded with seeds[i], so an image is the same in any batch, on any number of GPUs. On the batch
    [x_t; x_t] of guided sampling the guide rows get a copy of the conditional ones: eq. 1 never reads them."""

    def __init__(self, seeds, device):
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]

    def __call__(self, x):
        z = torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device) for g in self.generators])
        return z.repeat(len(x) // len(z), *[1] * (x.ndim - 1))               # (N or 2N, C, h, w)


def guide_labels(model, y, guidance, cfg_scale=CFG_SCALE):
    """Label-table rows (N,) of the guide half for classes y (N,): their nodes' rows at the tier `guidance` (eq. 1 with
    "superclass"; "genus" etc. where the table has those rows) or the null row (standard CFG); None when nothing guides
    (--guidance none, or w = 1, where eq. 1 is eps(x_t | c) alone)."""
    emb = model.y_embedder
    y = torch.as_tensor(y)
    if guidance == "none" or cfg_scale == 1.0:
        return None
    guard.check_guide_rows(list(emb.tier_sizes), emb.null_class, guidance)
    guard.check_hierarchy_known(model.hierarchy, emb.tier_sizes, guidance)
    if guidance == "null":
        return torch.full_like(y, emb.null_id)
    return emb.tier_ids(y.to(emb.node_of.device), guidance).cpu()


def has_guide_rows(model, guidance):
    """Has the DiT's label table the rows of this guide (a tier's rows, or the null row)?"""
    emb = model.y_embedder
    return emb.null_class if guidance == "null" else guidance in emb.tier_sizes


def describe_guide(model, row):
    """'superclass row 10002 (Birds)' for a guide row, named from the hierarchy of the model that uses it."""
    emb = model.y_embedder
    if row == emb.null_id and emb.null_class:
        return f"the null row {row} (standard CFG)"
    rank = next(r for r, start in emb.tier_start.items() if start <= row < start + emb.tier_sizes[r])
    return f"{rank} row {row} ({emb.node_names[rank][row - emb.tier_start[rank]]})"


def interval_guidance(model, lo, hi):
    """forward_with_cfg with guidance only at steps lo <= t <= hi (Kynkäänniemi et al. 2024).

    Outside the interval the guide half is not computed: the DiT runs on the conditional half alone and its
    output stands for both halves, so the sampler's batch [x_t; x_t], and its random draws, keep their layout."""
    def net(x, t, y, cfg_scale, guide_channels=3):
        if lo <= int(t[0]) <= hi:                  # samplers call the network with one t for the whole batch
            return model.forward_with_cfg(x, t, y, cfg_scale, guide_channels)
        n = len(x) // 2
        out = model.forward(x[:n], t[:n], y[:n])   # eps(x_t | c) alone: no guidance at this noise level
        return torch.cat([out, out], dim=0)
    return net


# ----------------------------------------------------------------------------------------------------------
# Samplers: which steps, and where eq. 1 applies
# ----------------------------------------------------------------------------------------------------------

class Sampler:
    """How every command draws images: `kind` (SAMPLERS) with `steps` DiT evaluations at the trained
    timesteps `timesteps` (0 ... 999, in sampling order), and eq. 1 at the steps inside `interval` (lo, hi, both
    included; None: at every step, the paper's). Built before any work, so bad settings fail at once."""

    def __init__(self, kind="ddpm", steps=None, interval=None, guided=True):
        self.kind, self.steps = kind, steps or DEFAULT_STEPS[kind]
        self.interval = None if interval is None else guard.check_interval(interval, TRAINED_STEPS, guided)
        self.timesteps = self._diffusion(learn_sigma=True)[1]

    def _diffusion(self, learn_sigma):
        """(the sampling loop of this kind, its timesteps) for a DiT with or without the learned variance."""
        with guard.refused_as(f"--sampler {self.kind} --steps {self.steps}"):    # steps the schedule cannot take
            if self.kind in ("dpm++2m", "dpm++2m-sde"):
                diffusion = create_diffusion("", learn_sigma=learn_sigma)
                return (partial(diffusion.dpm_solver_sample_loop, steps=self.steps, sde=self.kind == "dpm++2m-sde"),
                        diffusion.dpm_solver_timesteps(self.steps))
            diffusion = create_diffusion(f"ddim{self.steps}" if self.kind == "ddim" else str(self.steps),
                                         learn_sigma=learn_sigma)
        loop = diffusion.ddim_sample_loop if self.kind == "ddim" else diffusion.p_sample_loop
        return loop, diffusion.timestep_map[::-1]

    def loop(self, learn_sigma=True):
        return self._diffusion(learn_sigma)[0]

    @property
    def guided_steps(self):
        """How many of the steps apply eq. 1."""
        if self.interval is None:
            return len(self.timesteps)
        return int(sum(self.interval[0] <= t <= self.interval[1] for t in self.timesteps))

    def record(self):
        """The settings a table or manifest records of this sampler."""
        return dict(sampler=self.kind, steps=len(self.timesteps),
                    guidance_interval=None if self.interval is None else list(self.interval))

    def __str__(self):
        """'dpm++2m, 20 steps, eq. 1 at 11 of them: t in [200, 700], sigma_t 0.72 ... 12' for the log."""
        text = f"{self.kind}, {len(self.timesteps)} steps"
        if self.interval is None:
            return text
        abar = create_diffusion().alphas_cumprod
        sigma = lambda t: math.sqrt((1 - abar[t]) / abar[t])
        lo, hi = self.interval
        return (f"{text}, eq. 1 at {self.guided_steps} of them: t in [{lo}, {hi}], "
                f"sigma_t {sigma(lo):.3g} ... {sigma(hi):.3g}")


def add_sampler_args(p, steps=None):
    """How every command samples: --cfg-scale, --sampler, --steps (default: DEFAULT_STEPS of the sampler, unless the
    command has its own) and --guidance-interval. Call `sampler_of(args)` after parsing."""
    p.add_argument("--cfg-scale", type=finite_float, default=CFG_SCALE, help="w of eq. 1 (the paper's: 4)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                   help="ddpm (the paper's), ddim, dpm++2m (DPM-Solver++(2M)), dpm++2m-sde (its SDE variant)")
    p.add_argument("--steps", type=int_in(2, TRAINED_STEPS), default=steps,
                   help="sampling steps; default: " + (str(steps) if steps else
                                                        "250 DDPM, 50 DDIM, 20 DPM++(2M) and DPM++(2M) SDE"))
    p.add_argument("--guidance-interval", type=int, nargs=2, metavar=("LO", "HI"),
                   help="guide only at timesteps LO <= t <= HI of 0 ... 999 (default: every step, as the paper)")


def add_guidance_arg(p):
    p.add_argument("--guidance", default="superclass", help="the guide of eq. 1: superclass (the paper's), any other "
                   "rank the label table has rows for (train.py --tiers, e.g. genus), null (standard CFG) or none")


def sampler_of(args, guided=True):
    """The Sampler of the sampler flags, checked before any work (`guided`: does the run guide at all?)."""
    return Sampler(args.sampler, args.steps, args.guidance_interval, guided)


# ----------------------------------------------------------------------------------------------------------
# Loading, and the command line
# ----------------------------------------------------------------------------------------------------------

def load_for_sampling(ckpt, base=None, vae=None, data_path=None):
    """The one way to load a model to sample or evaluate: the DiT of a checkpoint (EMA weights, its hierarchy
    inside) and, for a latent DiT, the VAE that decodes it. -> (model, info, vae or None)

    `ckpt` goes through model.resolve_checkpoint (info["path"]: the file read). The VAE: `vae` if given, else
    default_vae's. data_path: VegFru's root, whose lists give the authors' FineDiffusion-VegFru.pt its hierarchy (read
    for that file alone)."""
    lists = (lambda: vegfru_hierarchy(*guard.read_vegfru_lists(data_path)[1:])) if data_path else None
    model, info = load_model(ckpt, base=base, hierarchy_of_file=lists)
    if info["config"]["pixel_space"]:
        return model, info, None
    decoder = AutoencoderKL.from_pretrained(vae or default_vae(model, info))
    decoder.check_fits(model.in_channels, info["config"]["image_size"])
    trained = LATENT_SCALE if info["vae"] is None else latent_scale(info["vae"])   # published DiTs: the SD VAE's
    guard.check_decoder(decoder, trained, info["vae"], info["vae"] is None or same_vae(decoder.identity(), info["vae"]))
    return model, info, decoder


def default_vae(model, info):
    """The VAE a latent DiT decodes with when none is named: its training run's; for the authors' FineDiffusion files (a
    published file with a tiered table) sd-vae-ft-mse, as their sample.py; for the official DiT's, sd-vae-ft-ema."""
    authors = info["published"] and model.y_embedder.tier_sizes
    return info["args"].get("vae") or (AUTHORS_VAE if authors else "sd-vae-ft-ema")


def sample_pairs(labels, num_pairs, rng):
    """Index pairs (a, b), a != b, of images of the same class. num_pairs=None: every such pair once."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")  # image indices grouped by class
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    keep = (classes >= 0) & (counts >= 2)  # unlabelled images and single-image classes form no pair
    classes, starts, counts = classes[keep], starts[keep], counts[keep]
    if num_pairs is None:
        pairs = [(order[s + i], order[s + j])
                 for s, n in zip(starts, counts) for i in range(n) for j in range(i + 1, n)]
        a, b = np.array(pairs).T  # (P,) each
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


# A grid of small images (the toy's 32 px) is enlarged, pixel for pixel, to about this many pixels a side per image.
VIEW_SIZE = 128


def save_png(images, path, nrow=4, enlarge=False):
    """Atomic write of a grid of uint8 (N, H, W, 3) images; `enlarge`: each image shown VIEW_SIZE // H times larger
    (nearest neighbour, so every pixel is the sampled one). Returns that factor."""
    scale = max(1, VIEW_SIZE // images.shape[1]) if enlarge else 1
    x = images.permute(0, 3, 1, 2)                                                     # (N, 3, H, W)
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)              # (N, 3, sH, sW)
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=255)                           # (3, H', W')
    atomic_write(path, lambda f: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, format="PNG"))
    return scale


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--class-id", type=nonnegative_int, help="class to draw (label-table row in [0, K))")
    who.add_argument("--class-name", help="class to draw, by (part of) its name in the checkpoint's hierarchy")
    p.add_argument("--ckpt", help="checkpoint (ours, official DiT or the authors') or a run folder; default: the "
                                  f"newest under results/, else pretrained/{AUTHORS_CHECKPOINT}")
    p.add_argument("--base", help="base checkpoint of a delta checkpoint, if not where training found it")
    p.add_argument("--vae", help="SD VAE folder or file for latent models (as given, then under pretrained/); default: "
                                 "the training run's, for the authors' FineDiffusion files sd-vae-ft-mse (as their "
                                 "sample.py), else sd-vae-ft-ema")
    p.add_argument("--data-path", help="VegFru's root (holding vegfru_list/): which subclass is under which superclass "
                                       "in the authors' FineDiffusion-VegFru.pt, whose file does not say")
    p.add_argument("--num-samples", type=positive_int, default=8,
                   help="images drawn at once, from one noise stream of --seed as in the authors' and DiT's sample.py: "
                        "an image depends on --num-samples (evaluate.py generate draws each from its own)")
    add_guidance_arg(p)
    p.add_argument("--guide-all-channels", action="store_true",
                   help="guide all eps channels (the official release guides the first 3 only)")
    add_sampler_args(p)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--out", type=out_file, default="samples/sample.png", help="PNG grid to write")
    p.add_argument("--per-sample-dir", type=folder_path, help="also write one PNG per sample into this folder")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="fp16: autocast as on V100s (on a CPU too, where torch supports it)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    guided = args.guidance != "none" and args.cfg_scale != 1.0
    sampler = sampler_of(args, guided)                                   # refused before loading
    precision_context(args.precision, torch.device(args.device).type)
    model, info, vae = load_for_sampling(args.ckpt, args.base, args.vae, args.data_path)
    hierarchy = model.hierarchy
    guide_labels(model, torch.zeros(1, dtype=torch.long), args.guidance, args.cfg_scale)   # has the file its guide?
    cls = guard.resolve_class(hierarchy, model.y_embedder.num_classes, args.class_id, args.class_name)
    y = torch.full((args.num_samples,), cls)
    guide = guide_labels(model, y, args.guidance, args.cfg_scale)
    what = f"class {cls}" + (f" ({hierarchy['class_names'][cls]})" if hierarchy else "")
    how = "unguided" if guide is None else f"guided by {describe_guide(model, int(guide[0]))}, w = {args.cfg_scale:g}"
    decoded = f", decoded by {vae.weights_file}" if vae is not None else ""
    if decoded and not args.vae and default_vae(model, info) == AUTHORS_VAE:
        decoded += " (the authors' sample.py decodes with sd-vae-ft-mse)"
    print(f"sampling {args.num_samples} x {what}, {how}; {sampler}; from {info['path']}{decoded}", file=sys.stderr)
    with out_of_memory_advice(f"--num-samples {max(1, args.num_samples // 2)} (sample.py draws them all at once)"):
        images = sample_images(model, y, guide, args.cfg_scale, sampler, vae, args.seed, args.device, args.precision,
                               args.guide_all_channels)
    scale = save_png(images, args.out, enlarge=True)
    if args.per_sample_dir:                                             # each sample as drawn, at its own size
        for i, img in enumerate(images):
            save_png(img[None], os.path.join(args.per_sample_dir, f"{cls:05d}_{i:04d}.png"), nrow=1)
    side = images.shape[1]
    print(f"wrote {args.out}" + (f": {side} px samples shown {scale}x larger (nearest neighbour)" if scale > 1 else ""))


if __name__ == "__main__":
    sys.exit(run_cli(main))

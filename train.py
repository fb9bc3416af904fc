"""Fine-tune a pre-trained DiT for fine-grained classes with FineDiffusion (or a baseline), on one process or many.

    torchrun --nproc_per_node=8 train.py --data inat21 --data-path /data/inat21      # the paper's run (§4.2)
    python train.py --data toy --coarse --max-steps 2000 --global-batch-size 64        # a tiny base, CPU, scratch
    python train.py --data toy --init results/000-DiT-T-4-full/checkpoints/0002000.pt  # fine-tune it: FineDiffusion
    python train.py --resume results/001-DiT-T-4-finediffusion/checkpoints/0001000.pt  # continue, bit for bit
    python train.py --resume CKPT --export model.pt          # a standalone file for sample.py / other DiT code

What one step does (paper §3.1, §3.2.1):
  x (an image batch, or its SD-VAE latent z = 0.18215 * (mean + sigma * eps)) and labels y of subclasses;
  t ~ U{0..999}; the TieredEmbedder swaps y for its superclass row with probability --superclass-prob (0.1),
  which trains eps(x_t | c_p), the guide of fine-grained CFG (eq. 1); loss = IDDPM hybrid (eps-MSE + VB);
  AdamW (lr 1e-4, no weight decay) updates only the tensors --tune trains; the EMA (0.9999) follows them.
--tune (paper Table 2): full | bitfit | difffit | finediffusion (label table + biases + LayerNorm affine, 1.77% of
DiT-XL/2). Frozen tensors have requires_grad=False, so autograd computes no weight gradient for them, DDP does
not all-reduce them, AdamW and the EMA hold no state for them: that is where the 1.56x speed-up comes from.

Defaults are the paper's (§4.2): DiT-XL/2 from DiT-XL-2-256x256.pt, 256 px, FineDiffusion, AdamW lr 1e-4,
global batch 256, 200K steps, EMA 0.9999. `--data toy` instead defaults to a from-scratch DiT-T/4 on 32 px
pixels (`--init none`, `--tune full`) so that the quickstart runs on a CPU.

Checkpoints (results/NNN-<model>-<tune>/checkpoints/NNNNNNN.pt, written atomically) hold only the tuned tensors
("delta") plus the base file's path and sha256; `model.load_model` rebuilds the whole DiT from them. They also
hold the optimizer, EMA, RNG streams and data position: --resume continues bit for bit (same number of processes,
any --num-workers). Arguments not given again on a resumed run are taken from its checkpoint.
All user mistakes end with one line `error: ...` and exit code 2; a failed run (NaN loss, GPU out of
memory) with one line and exit code 1.
"""
import argparse
import glob
import itertools
import json
import math
import os
import random
import resource
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm

import data
from diffusion import create_diffusion
from model import (LATENT_SCALE, METHODS, PUBLISHED, VAE_URL, AutoencoderKL, CheckpointError, DiT_models,
                   apply_delta, atomic_write, build_model, dit_config_from_state, file_sha256, latest_checkpoint, load_base_for_delta,
                   load_model, load_pretrained, read_checkpoint, sample_latent, set_trainable, unwrap_state)

PAPER_INIT = "DiT-XL-2-256x256.pt"
RANK_DUMP_ENV = "FINEDIFFUSION_RANK_DUMP"   # tests: every rank saves its final tensors into this folder


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


class TrainingError(Exception):
    """The run cannot go on (non-finite loss, out of memory): printed as one line, exit code 1."""


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=["inat21", "folder", "toy"], help="dataset (needed unless --latent-cache)")
    d.add_argument("--data-path", help="dataset root (inat21: the folder holding train_mini/)")
    d.add_argument("--split", help="default: train_mini for inat21, else train")
    d.add_argument("--hierarchy-csv", help="class,superclass rows for a flat folder dataset")
    d.add_argument("--coarse", action="store_true", help="train on the superclass ids (a coarse base model)")
    d.add_argument("--latent-cache", help="train from a VAE-latent cache made by `python data.py cache`")
    d.add_argument("--vae", help="SD VAE folder (sd-vae-ft-ema): encodes images on the fly, decodes samples")
    d.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per process")
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=list(DiT_models), help="default: from --init, else DiT-XL/2 (toy: DiT-T/4)")
    m.add_argument("--image-size", type=int, help="pixels; default: from --init, else 256 (toy: 32)")
    m.add_argument("--pixel-space", action=argparse.BooleanOptionalAction, default=None,
                   help="DiT on pixels instead of VAE latents; default: only for the toy data")
    m.add_argument("--init", help=f"pre-trained DiT ({PAPER_INIT} is looked up as given, then under pretrained/), "
                                  "one of our checkpoints, or 'none' (from scratch); default: "
                                  f"{PAPER_INIT}, toy: none")
    m.add_argument("--tune", choices=METHODS, help="what to train; default: finediffusion, full from scratch")
    m.add_argument("--superclass-prob", type=float, default=0.1, help="label -> superclass substitution (§3.2.2)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=1e-4)
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--global-batch-size", type=int, default=256, help="over all processes")
    o.add_argument("--max-steps", type=int, default=200_000)
    o.add_argument("--ema-decay", type=float, default=0.9999)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--precision", choices=["fp32", "tf32", "fp16", "bf16"], default="tf32",
                   help="tf32: fp32 weights, TF32 matmuls on Ampere+ (as DiT); fp16: autocast + loss scaling (V100)")
    o.add_argument("--compile", action="store_true", help="torch.compile the DiT")
    o.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations: less memory")
    o.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    r = p.add_argument_group("output")
    r.add_argument("--results-dir", default="results")
    r.add_argument("--run-dir", help="run folder; default: <results-dir>/NNN-<model>-<tune>")
    r.add_argument("--ckpt-every", type=int, default=50_000)
    r.add_argument("--save-full", action="store_true", help="store every tensor, not only the tuned ones")
    r.add_argument("--log-every", type=int, default=100)
    r.add_argument("--sample-every", type=int, default=0, help="save a sample grid every N steps (0: never)")
    r.add_argument("--sample-steps", type=int, default=50, help="DDPM steps of those samples")
    r.add_argument("--sample-cfg-scale", type=float, default=4.0)
    r.add_argument("--resume", help="continue a run from one of its checkpoints (the saved args are the defaults)")
    r.add_argument("--export", help="write a standalone checkpoint (full model + EMA) here: after training, "
                                    "or, with --resume, of that checkpoint without training")
    return p.parse_args(argv)


# Arguments a resumed run takes from its checkpoint unless given again on the command line.
NOT_RESUMED = {"resume", "export", "run_dir", "init"}   # --init on a resume: where its base moved to


def inherit_resumed_args(args, saved):
    defaults = vars(parse_args([]))
    for k, v in saved.items():
        if k in defaults and k not in NOT_RESUMED and getattr(args, k) == defaults[k]:
            setattr(args, k, v)


# ----------------------------------------------------------------------------------------------------------
# Processes and devices
# ----------------------------------------------------------------------------------------------------------

def world_from_env():
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) for a plain `python train.py`."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def setup_device(args, world, local_rank):
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA GPU is visible")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def setup_precision(precision, device):
    """Autocast context for the DiT's forward pass and a GradScaler (enabled for fp16 only)."""
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA GPU (it is meant for V100s): on a CPU use fp32 or bf16")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU has no bf16 (e.g. a V100): use --precision fp16")
    if device.type == "cuda":
        # TF32 keeps fp32 weights and accumulation, rounds matmul inputs to 10 mantissa bits (DiT trains so).
        torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    return autocast, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def rng_state(device):
    """This process's random streams as plain tensors / lists (torch.load(weights_only=True) reads them)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                           has_gauss=int(has_gauss), cached=float(cached)),
                python=[version, list(py_state), gauss])


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))


def all_ranks(obj, world):
    """[obj of rank 0, obj of rank 1, ...]."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------------
# The model to train: its configuration, its starting weights
# ----------------------------------------------------------------------------------------------------------

def find_init(path):
    """The base checkpoint file: as given (a run folder: its newest checkpoint), then under ./pretrained/.
    None for 'none'."""
    if path.lower() == "none":
        return None
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found is None:
            raise UsageError(f"no checkpoint in {path}: train one first, or pass a checkpoint file")
        return os.path.abspath(found)
    for candidate in (path, os.path.join("pretrained", path), os.path.join("pretrained", os.path.basename(path))):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    where = PUBLISHED.get(os.path.basename(path))
    hint = f"; download it from {where} into pretrained/" if where else "; pass --init none to train from scratch"
    raise UsageError(f"base checkpoint not found: {path} (also looked in pretrained/){hint}")


def init_config(init_ckpt):
    """(model name, image size, pixel space, extra build kwargs) of a base checkpoint."""
    if isinstance(init_ckpt, dict) and "config" in init_ckpt:        # ours: it says what it is
        c = init_ckpt["config"]
        extra = {"learn_sigma": c["learn_sigma"]} if "learn_sigma" in c else {}
        return c["name"], c["image_size"], c.get("pixel_space", False), extra
    c = dit_config_from_state(unwrap_state(init_ckpt))                # official / authors': tensor shapes
    pixel = c["in_channels"] == 3
    extra = {} if c["learn_sigma"] else {"learn_sigma": False}
    return c["name"], c["input_size"] * (1 if pixel else 8), pixel, extra


def resolve_model_args(args, init_ckpt, cache_image_size=None):
    """Fill --model, --image-size, --pixel-space: from the base checkpoint if any (they must agree), else defaults."""
    toy = args.data == "toy"
    if init_ckpt is None:
        args.model = args.model or ("DiT-T/4" if toy else "DiT-XL/2")
        args.image_size = args.image_size or cache_image_size or (32 if toy else 256)
        args.pixel_space = toy if args.pixel_space is None else args.pixel_space
        return {}
    name, size, pixel, extra = init_config(init_ckpt)
    for flag, given, found in (("--model", args.model, name), ("--image-size", args.image_size, size),
                               ("--pixel-space", args.pixel_space, pixel)):
        if given is not None and given != found:
            raise UsageError(f"{flag} {given} does not match the --init checkpoint ({found}): leave it out")
    args.model, args.image_size, args.pixel_space = name, size, pixel
    return extra


def model_config(args, dataset, extra):
    """Exactly the keyword arguments of model.build_model (minus superclass_of): stored in every checkpoint."""
    return dict(name=args.model, image_size=args.image_size, num_classes=dataset.num_classes,
                num_superclasses=dataset.num_superclasses, method=args.tune, pixel_space=bool(args.pixel_space),
                **extra)


def build(config, hierarchy, superclass_prob):
    return build_model(**config, superclass_of=hierarchy["superclass_of"], superclass_prob=superclass_prob)


def restore_model(ckpt, superclass_prob, base=None):
    """The DiT of one of our checkpoints with its trained (not EMA) tensors; a delta goes onto its base file."""
    model = build(ckpt["config"], ckpt["hierarchy"], superclass_prob)
    if ckpt.get("delta"):
        load_pretrained(model, load_base_for_delta(ckpt, base))
        apply_delta(model, ckpt["model"])
    else:
        load_pretrained(model, ckpt["model"])
    return model


def stored_names(model, delta):
    """Which tensors a checkpoint stores: the tuned ones (a "delta" on the base file), or every tensor.

    For DiT-XL/2 + FineDiffusion the delta is 1.8% of the full state (paper §3.2.1: "it only needs to store
    the small subset of parameters undergoing fine-tuning").
    """
    if not delta:
        return list(model.state_dict())
    return [name for name, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------------------
# EMA of the tuned tensors
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def update_ema(ema, named_params, decay):
    """ema <- decay * ema + (1 - decay) * theta, for the tuned tensors only (frozen ones never move)."""
    for name, p in named_params:
        ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)


def with_ema(state, ema):
    """A full state dict with the EMA tensors in place of the trained ones (what one samples with)."""
    return {k: ema.get(k, v) for k, v in state.items()}


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------

class SkipSampler(Sampler):
    """The indices of `sampler` after the first `skip`: resuming mid-epoch reproduces the rest of the
    epoch's order without loading the batches already used."""

    def __init__(self, sampler, skip):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


class SeededItems(Dataset):
    """dataset[i] with its random draws (flip, cached-latent noise) seeded by (seed, epoch, i).

    The draws then do not depend on which DataLoader worker loads an item, nor on where a run was resumed,
    and they leave the training RNG stream alone: resuming is exact with any --num-workers.
    """

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + i) % 2 ** 63)
            return self.dataset[i]


def open_latent_cache(args):
    """Cached VAE latents (`python data.py cache`); the cache refuses another VAE or another dataset."""
    expect = dict(data=args.data, data_path=args.data_path, vae=data.vae_identity(args.vae) if args.vae else None)
    return data.LatentCacheDataset(args.latent_cache, expect=expect, flip=True, coarse=args.coarse)


def build_images(args, image_size):
    """Images in [-1, 1] (trained on as pixels, or encoded by the VAE on the fly), DiT's crop and flips."""
    split = args.split or ("train_mini" if args.data == "inat21" else "train")
    return data.build_dataset(args.data, args.data_path, image_size, split, flip=True, seed=args.seed,
                              coarse=args.coarse, hierarchy_csv=args.hierarchy_csv)


def epoch_loader(items, sampler, epoch, position, local_batch, args, device):
    """The DataLoader of one epoch (SeededItems, DistributedSampler), starting after `position` batches."""
    sampler.set_epoch(epoch)   # a new shuffle each epoch, the same on every rank and on every resume
    items.epoch = epoch        # (workers receive a copy of `items` when the loader's iterator is created)
    # Its own generator: creating the iterator must not draw from the global RNG (resume would diverge).
    generator = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    return DataLoader(items, batch_size=local_batch, sampler=SkipSampler(sampler, position * local_batch),
                      num_workers=args.num_workers, pin_memory=device.type == "cuda", drop_last=True,
                      generator=generator)


def load_vae(path, device, why):
    if not path:
        raise UsageError(f"a latent DiT needs the SD VAE to {why}: download config.json and "
                         f"diffusion_pytorch_model.safetensors of sd-vae-ft-ema from {VAE_URL} into a folder and "
                         f"pass --vae DIR" + ("" if "grid" in why else " (or train from a --latent-cache)"))
    vae = AutoencoderKL.from_pretrained(path).to(device).eval()   # a missing path: CheckpointError naming it
    vae.requires_grad_(False)
    return vae


@torch.no_grad()
def encode(vae, x):
    """z = 0.18215 * (mean + exp(logvar / 2) * eps): one draw from the VAE posterior, as DiT's training."""
    mean, logvar = vae.encode(x)
    return LATENT_SCALE * sample_latent(mean, logvar)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------

def save_atomic(obj, path):
    """torch.save through model.atomic_write: a crash never leaves half a checkpoint."""
    atomic_write(path, lambda f: torch.save(obj, f))


def export(path, model_state, ema_state, args, config, hierarchy, step):
    """The official layout {"model", "ema"} with every tensor, plus what our tools read (config, hierarchy)."""
    save_atomic(dict(model=model_state, ema=ema_state, args=dict(args), config=config, hierarchy=hierarchy,
                     step=step), path)


def export_resumed(args, ckpt):
    model = restore_model(ckpt, args.superclass_prob, base=base_override(args))
    state = model.state_dict()
    export(args.export, state, with_ema(state, ckpt["ema"]), ckpt["args"], ckpt["config"], ckpt["hierarchy"],
           ckpt["step"])
    print(f"exported step {ckpt['step']} of {args.resume} to {args.export}")
    return dict(final_ckpt=args.resume, run_dir=None, losses=[], step=ckpt["step"], export=args.export)


def base_override(args):
    """--init on a resumed run: where the delta's base file is now, if it moved."""
    return find_init(args.init) if args.init and args.init.lower() != "none" else None


def make_run_dir(args, rank):
    if args.run_dir:
        run_dir = args.run_dir
    elif args.resume and os.path.basename(os.path.dirname(os.path.abspath(args.resume))) == "checkpoints":
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
    else:
        index = len(glob.glob(os.path.join(args.results_dir, "*")))
        run_dir = os.path.join(args.results_dir, f"{index:03d}-{args.model.replace('/', '-')}-{args.tune}")
    if not args.resume and glob.glob(os.path.join(run_dir, "checkpoints", "*.pt")):
        raise UsageError(f"{run_dir} already holds checkpoints: continue it with --resume {run_dir}/checkpoints/"
                         f"<step>.pt or choose another --run-dir")
    if rank == 0:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    return run_dir


# ----------------------------------------------------------------------------------------------------------
# Monitoring
# ----------------------------------------------------------------------------------------------------------

def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # Linux reports KiB


def log_line(record, run_dir):
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


@torch.no_grad()
def sample_grid(raw, ema, named_params, vae, args, step, run_dir, device):
    """A grid of EMA samples spread over the classes; training state (weights, RNG) is left as it was."""
    from sample import sample_images, save_png
    backup = {name: p.detach().clone() for name, p in named_params}
    K = raw.y_embedder.num_classes
    y = torch.linspace(0, K - 1, min(8, K)).round().long()
    guidance = "superclass" if raw.y_embedder.num_superclasses else "null"   # eq. 1 where superclass rows exist
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):   # sampling reseeds
        for name, p in named_params:
            p.copy_(ema[name])
        images = sample_images(raw, y, guidance, args.sample_cfg_scale, steps=args.sample_steps, vae=vae,
                               seed=args.seed, device=device, progress=False)
        for name, p in named_params:
            p.copy_(backup[name])
    raw.train()
    path = os.path.join(run_dir, "samples", f"{step:07d}.png")
    save_png(images, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------------------

def train_step(net, diffusion, opt, scaler, x, y, autocast, world):
    """Forward, hybrid loss, backward, AdamW. Returns the mean loss over all processes (a float).

    A non-finite loss raises FloatingPointError before the optimizer step, so the weights stay the last good ones.
    """
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)

    def eps_model(x_t, t, y):
        with autocast:
            return net(x_t, t, y).float()             # the diffusion math stays in fp32

    loss = diffusion.training_losses(eps_model, x, t, model_kwargs=dict(y=y))["loss"].mean()
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()                     # DDP all-reduces the gradients of tuned tensors only
    mean_loss = loss.detach().clone()
    if world > 1:
        dist.all_reduce(mean_loss)                    # every rank sees the same value: all stop together
        mean_loss /= world
    mean_loss = mean_loss.item()
    if not math.isfinite(mean_loss):
        raise FloatingPointError(mean_loss)
    scaler.step(opt)
    scaler.update()
    return mean_loss


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

def check_args(args, world, export_only):
    if args.global_batch_size < 1 or args.global_batch_size % world:
        raise UsageError(f"--global-batch-size {args.global_batch_size} does not divide over {world} processes: "
                         f"use a multiple of {world}")
    if export_only:
        return
    if not args.data and not args.latent_cache:
        raise UsageError("--data is required (inat21, folder or toy), or --latent-cache DIR")
    inat = f" (iNat21 is published at {data.INAT21_URL})" if args.data == "inat21" else ""
    if args.data in ("inat21", "folder") and not args.data_path and not args.latent_cache:
        raise UsageError(f"--data {args.data} needs --data-path DIR{inat}")
    if args.data_path and not os.path.exists(args.data_path):
        raise UsageError(f"--data-path {args.data_path} does not exist{inat}")
    for flag in ("max_steps", "ckpt_every", "log_every", "sample_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive")


def choose_base(args, cache, say):
    """A fresh run: the base checkpoint (--init) and what follows from it. -> (init_path, init_ckpt, extra)."""
    args.init = args.init or ("none" if args.data == "toy" else PAPER_INIT)
    init_path = find_init(args.init)
    init_ckpt = read_checkpoint(init_path) if init_path else None
    args.tune = args.tune or ("full" if init_ckpt is None else "finediffusion")
    extra = resolve_model_args(args, init_ckpt, cache.image_size if cache else None)
    if init_ckpt is None and args.tune != "full":
        say(f"warning: training from scratch with --tune {args.tune} trains only a few tensors")
    return init_path, init_ckpt, extra


def make_model(config, hierarchy, args, resume_ckpt, init_path, init_ckpt, say):
    """The DiT with its starting weights: the resumed checkpoint's, the base's (--init) or a fresh init."""
    seed_everything(args.seed)   # the same initial weights on every rank (DDP also broadcasts rank 0's)
    if resume_ckpt is not None:
        return restore_model(resume_ckpt, args.superclass_prob, base=base_override(args))
    model = build(config, hierarchy, args.superclass_prob)
    if init_ckpt is not None:
        # One of our deltas is first put back on its own base.
        source = load_model(init_path)[0].state_dict() if init_ckpt.get("delta") else init_ckpt
        try:
            report = load_pretrained(model, source)
        except CheckpointError as e:
            raise CheckpointError(f"--init {init_path} does not fit a --tune {config['method']} DiT: {e}") from None
        say(f"init: {init_path}" + "".join(f"; re-initialised {r}" for r in report["reinitialised"])
            + (f"; {len(report['identity'])} new tensors start at the identity" if report["identity"] else ""))
    return model


def restore_training_state(ckpt, opt, scaler, ema, args, rank, world, device, say):
    """Optimizer, loss scale, EMA and RNG streams of a checkpoint. -> (step, data epoch, batches into it)."""
    opt.load_state_dict(ckpt["opt"])
    for group in opt.param_groups:                   # a resumed run may change them (e.g. a lower --lr)
        group.update(lr=args.lr, weight_decay=args.weight_decay)
    if ckpt["scaler"] is not None and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    for name in ema:
        ema[name].copy_(ckpt["ema"][name])
    if ckpt.get("world_size", 1) == world:
        set_rng_state((ckpt.get("rng_ranks") or [ckpt["rng"]])[rank], device)
    else:
        say(f"warning: a run of {ckpt.get('world_size')} processes resumed on {world}: the data order and the "
            "noise will not repeat exactly")
    say(f"resumed {args.resume} at step {ckpt['step']} (epoch {ckpt['data_epoch']}, batch {ckpt['data_position']})")
    return ckpt["step"], ckpt["data_epoch"], ckpt["data_position"]


def train(args):
    """Train (or, with --resume and --export, only export). Returns dict(final_ckpt, run_dir, losses, step, export)."""
    rank, world, local_rank = world_from_env()
    resume_ckpt = None
    if args.resume:
        resume_ckpt = read_checkpoint(args.resume)
        if not (isinstance(resume_ckpt, dict) and "config" in resume_ckpt and "opt" in resume_ckpt):
            raise UsageError(f"--resume {args.resume}: not a training checkpoint of this train.py "
                             "(to start from it, use --init)")
        inherit_resumed_args(args, resume_ckpt["args"])
    export_only = bool(args.resume and args.export)
    check_args(args, world, export_only)
    if export_only:
        return export_resumed(args, resume_ckpt) if rank == 0 else {}
    device = setup_device(args, world, local_rank)
    try:
        return run(args, rank, world, device, resume_ckpt)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, rank, world, device, resume_ckpt):
    main_process = rank == 0
    say = print if main_process else (lambda *a, **k: None)
    autocast, scaler = setup_precision(args.precision, device)
    local_batch = args.global_batch_size // world

    # --- the base checkpoint, the data, the DiT configuration ------------------------------------------------
    cache = open_latent_cache(args) if args.latent_cache else None
    if resume_ckpt is not None:
        config, base, delta = dict(resume_ckpt["config"]), resume_ckpt["base"], resume_ckpt["delta"]
        init_path = init_ckpt = None
    else:
        init_path, init_ckpt, extra = choose_base(args, cache, say)
        # A delta needs a complete base file: deltas on deltas would chain, so a delta --init gives full saves.
        delta = init_ckpt is not None and not args.save_full and not init_ckpt.get("delta")
        base = dict(path=init_path, sha256=None) if init_path else None
        config = dict(name=args.model, image_size=args.image_size, pixel_space=bool(args.pixel_space))
    pixel = config["pixel_space"]
    # The VAE encodes images on the fly (no latent cache) and decodes the sample grids of a latent DiT.
    vae = load_vae(args.vae, device, "decode --sample-every grids" if cache else "encode the images") \
        if not pixel and (cache is None or args.sample_every) else None
    dataset = cache or build_images(args, config["image_size"])
    if cache is not None and (cache.image_size != config["image_size"] or pixel):
        raise UsageError(f"the latent cache holds {cache.image_size}px VAE latents; this DiT is for "
                         f"{config['image_size']}px {'pixels' if pixel else 'latents'}")
    hierarchy = dataset.hierarchy()
    if resume_ckpt is None:
        config = model_config(args, dataset, extra)
    elif hierarchy != resume_ckpt["hierarchy"]:
        raise UsageError(f"the data's classes differ from those of {args.resume}: resume with the same --data")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    batches_per_epoch = len(sampler) // local_batch
    if batches_per_epoch == 0:
        raise UsageError(f"{len(dataset)} training items give {len(sampler)} per process, fewer than the "
                         f"per-process batch {local_batch}: lower --global-batch-size")
    run_dir = make_run_dir(args, rank)

    # --- the model, what trains, the optimizer and the EMA ---------------------------------------------------
    raw = make_model(config, hierarchy, args, resume_ckpt, init_path, init_ckpt, say)
    del init_ckpt
    trainable, total = set_trainable(raw, config["method"])
    raw.to(device).train()
    raw.grad_checkpointing = args.grad_checkpointing
    named_params = [(n, p) for n, p in raw.named_parameters() if p.requires_grad]
    net = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else raw
    if args.compile:
        net = torch.compile(net)
    ema = {name: p.detach().clone() for name, p in named_params}   # after DDP's broadcast: equal on all ranks
    opt = torch.optim.AdamW([p for _, p in named_params], lr=args.lr, weight_decay=args.weight_decay)
    diffusion = create_diffusion(timestep_respacing="", learn_sigma=raw.learn_sigma)
    say(f"{config['name']} {config['image_size']}px {'pixels' if pixel else 'latents'}, {config['num_classes']} "
        f"classes / {config['num_superclasses']} superclasses, --tune {config['method']}: {trainable / 1e6:.2f}M "
        f"of {total / 1e6:.2f}M parameters trained ({100 * trainable / total:.2f}%), {world} process(es)")

    # --- a fresh start, or exactly where the checkpoint left off ---------------------------------------------
    step, epoch, position = 0, 0, 0
    seed_everything(args.seed * world + rank)        # per-rank timesteps, noise and label substitutions
    if resume_ckpt is not None:
        step, epoch, position = restore_training_state(resume_ckpt, opt, scaler, ema, args, rank, world, device,
                                                       say)
        del resume_ckpt
    if position >= batches_per_epoch:
        epoch, position = epoch + 1, 0

    # A checkpoint holds plain tensors, dicts, lists, str, int, float, bool and None only, so that
    # torch.load(weights_only=True) reads it:
    #   model, ema      the tuned tensors (delta=True; rebuilt on `base` by model.load_model) or all tensors
    #   opt, scaler     AdamW state (tuned tensors only), fp16 loss scale (or None)
    #   args            vars(args); config: the build_model kwargs; hierarchy: class names / superclass_of
    #   step, data_epoch, data_position, world_size, rng (rank 0's), rng_ranks: for an exact resume
    #   delta, base     True and {"path", "sha256"} of the --init file; False and None (or the init) otherwise
    def save(step):
        """Rank 0 writes <run>/checkpoints/<step>.pt; every rank contributes its RNG state."""
        rngs = all_ranks(rng_state(device), world)
        if not main_process:
            return None
        if base is not None and base["sha256"] is None:
            base["sha256"] = file_sha256(base["path"])           # a delta must only ever meet its own base
        state = raw.state_dict()
        model_state = {k: state[k] for k in stored_names(raw, delta)}
        ckpt = dict(model=model_state, ema=with_ema(model_state, ema), opt=opt.state_dict(),
                    scaler=scaler.state_dict() if scaler.is_enabled() else None, args=vars(args).copy(),
                    config=config, hierarchy=hierarchy, step=step, delta=delta, base=base, rng=rngs[0],
                    rng_ranks=rngs, world_size=world, data_epoch=epoch, data_position=position)
        path = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
        save_atomic(ckpt, path)
        return path

    # --- the loop ------------------------------------------------------------------------------------------
    items = SeededItems(dataset, args.seed)
    losses, window, last_ckpt = [], [], None
    clock, clock_step = time.time(), step
    bar = tqdm(total=args.max_steps, initial=step, desc="training", disable=not main_process, dynamic_ncols=True)
    try:
        while step < args.max_steps:
            for x, y in epoch_loader(items, sampler, epoch, position, local_batch, args, device):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                try:
                    if not pixel and cache is None:
                        x = encode(vae, x)                                     # (N, 4, H/8, W/8)
                    loss = train_step(net, diffusion, opt, scaler, x, y, autocast, world)
                except FloatingPointError as e:
                    kept = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
                    raise TrainingError(f"loss is {e} at step {step + 1}: stopped; {kept} (resume from it with a "
                                        "lower --lr or --precision fp32)") from None
                except torch.OutOfMemoryError:
                    half = max(world, args.global_batch_size // 2 // world * world)
                    raise TrainingError(f"CUDA out of memory with --global-batch-size {args.global_batch_size} "
                                        f"({local_batch} per GPU): try --global-batch-size {half} "
                                        f"({half // world} per GPU) or --grad-checkpointing") from None
                update_ema(ema, named_params, args.ema_decay)
                step, position = step + 1, position + 1
                if position == batches_per_epoch:
                    epoch, position = epoch + 1, 0
                losses.append(loss)
                window.append(loss)
                bar.update(1)
                if step % args.log_every == 0 or step == args.max_steps:
                    elapsed = max(time.time() - clock, 1e-9)
                    record = dict(step=step, epoch=epoch, loss=sum(window) / len(window),
                                  steps_per_s=(step - clock_step) / elapsed,
                                  images_per_s=(step - clock_step) * args.global_batch_size / elapsed,
                                  peak_mem_gb=peak_memory_gb(device))
                    if main_process:
                        bar.set_postfix(loss=f"{record['loss']:.4f}")
                        bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in record.items()))
                        log_line(record, run_dir)
                    window, clock, clock_step = [], time.time(), step
                if step % args.ckpt_every == 0 or step == args.max_steps:
                    last_ckpt = save(step) or last_ckpt
                if main_process and args.sample_every and step % args.sample_every == 0:
                    bar.write(f"samples: {sample_grid(raw, ema, named_params, vae, args, step, run_dir, device)}")
                if step >= args.max_steps:
                    break
    finally:
        bar.close()

    if os.environ.get(RANK_DUMP_ENV):
        os.makedirs(os.environ[RANK_DUMP_ENV], exist_ok=True)
        torch.save(dict(model=raw.state_dict(), ema=ema), os.path.join(os.environ[RANK_DUMP_ENV], f"rank{rank}.pt"))
    if main_process and args.export:
        state = raw.state_dict()
        export(args.export, state, with_ema(state, ema), vars(args), config, hierarchy, step)
        say(f"exported {args.export}")
    final = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
    return dict(final_ckpt=final if os.path.isfile(final) else last_ckpt, run_dir=run_dir, losses=losses, step=step,
                export=args.export)


def main(argv=None):
    args = parse_args(argv)
    rank = world_from_env()[0]
    try:
        train(args)
        return
    except (UsageError, data.DataError, CheckpointError) as e:
        message, code = str(e), 2
    except TrainingError as e:
        message, code = str(e), 1
    if rank == 0:                    # every rank fails alike; one message is enough
        print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()

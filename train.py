"""Fine-tune a pre-trained DiT for fine-grained classes with FineDiffusion (or a baseline), on one process or many.

    torchrun --nproc_per_node=8 train.py --data inat21        # the paper's run (§4.2), from DiT-XL-2-256x256.pt
    python train.py --data toy                                # the quickstart: the shipped toy base, on a CPU
    python train.py --data toy-base                           # how the toy base was made (12,000 steps)
    python train.py --resume results/000-DiT-T-4-finediffusion        # continue a run, bit for bit
    python train.py --resume CKPT --export model.pt           # a standalone file in the official {"model", "ema"} layout

One step (§3.1, §3.2.1; train_step): images x, or their SD-VAE latents z = 0.18215 (mean + sigma eps), with subclass
labels y; t ~ U{0..999}; the TieredEmbedder swaps y for its superclass row with probability --superclass-prob (0.1),
which trains eps(x_t | c_p), the guide of eq. 1 (--tiers genus,superclass: rows for genera too, a label swapped for
its genus or its superclass); the IDDPM hybrid loss; AdamW (lr 1e-4, no weight decay) on the
tensors --tune trains (Table 2: FineDiffusion's label table, biases and LayerNorm affine, 1.77% of DiT-XL/2) and their
EMA (0.9999). Frozen tensors get no weight gradient, no all-reduce and no AdamW state: the 1.56x speed-up.

Read train_step, then main: start_run builds the DiT from its base (--init) or the run it resumes, the run folder, the
data, what trains, AdamW and the EMA; batches feeds the loop. A checkpoint (model.save_checkpoint) holds only the tuned
tensors over a base file (a "delta"), and what --resume needs to continue bit for bit. Defaults are the paper's;
--data toy takes the toy's recipe (RECIPES).
"""
import argparse
import itertools
import json
import os
import random
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

import data
import hardening as guard
from diffusion import create_diffusion
from hardening import (ArgumentParser, Stopped, all_ranks, decay_rate, device_name, folder_path, nonnegative_int,
                       out_file, positive_float, positive_int, probability, rank_list, run_cli, weight_list)
from model import (LATENT_CHANNELS, METHODS, SUPERCLASS_PROB, TABLES, DiT_models, build_model, default_table, load_model,
                   load_pretrained, published_layout, rank_names, save_checkpoint, set_trainable, two_levels)
from sample import CFG_SCALE, Sampler, guide_labels, sample_images, save_png
from toy import TOY_SETS
from vae import AutoencoderKL, same_vae, scaled_latent

PAPER_INIT, VAE = "DiT-XL-2-256x256.pt", "sd-vae-ft-ema"     # looked up as given, then under pretrained/
# The toy world's published base (ImageNet's DiT-XL/2 in miniature), shipped in the repository, and its sha256.
TOY_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "DiT-T-4-toy-base.pt")
TOY_BASE_SHA256 = "52bf75fecd85e009a6bc0e092c6e86f4771fa7328924ba1a06e4c73cc0b8d485"

# The defaults that depend on --data: the paper's (§4.2) for iNat21, VegFru and folders; for the toy, fine-tuning from
# the shipped base as the quickstart was tuned, and the recipe that made that base. Given flags win; on --resume, the
# run's.
RECIPES = {
    "paper": dict(init=PAPER_INIT, lr=1e-4, global_batch_size=256, max_steps=200_000, ema_decay=0.9999,
                  ckpt_every=50_000, log_every=100),
    "toy": dict(init=TOY_BASE, lr=1e-2, global_batch_size=64, max_steps=800, ema_decay=0.995, ckpt_every=800,
                log_every=100),
    "toy-base": dict(init="none", lr=1e-3, global_batch_size=64, max_steps=12_000, ema_decay=0.999,
                     ckpt_every=2_000, log_every=200),
}


# --- The method: one training step (§3.1, §3.2.1), the EMA -----------------------------------------------------------

def train_step(net, diffusion, opt, scaler, x, y, autocast):
    """Forward, hybrid loss (IDDPM: eps-MSE + VB), backward, AdamW. -> the loss, a 0-dim tensor on the device (reading
    it every step would make the CPU wait for the GPU: the loop reads losses when it logs or saves)."""
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)

    def eps_model(x_t, t, y):
        with autocast:
            return net(x_t, t, y).float()             # the diffusion math stays in fp32

    loss = diffusion.training_losses(eps_model, x, t, model_kwargs=dict(y=y))["loss"].mean()
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()                     # DDP all-reduces the gradients of tuned tensors only
    scaler.step(opt)
    scaler.update()
    return loss.detach()


@torch.no_grad()
def update_ema(ema, named_params, decay):
    """ema <- decay * ema + (1 - decay) * theta, for the tuned tensors only (frozen ones never move)."""
    for name, p in named_params:
        ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)


def with_ema(state, ema):
    """A full state dict with the EMA tensors in place of the trained ones (what one samples with)."""
    return {k: ema.get(k, v) for k, v in state.items()}


# --- Training, top to bottom -----------------------------------------------------------------------------------------

def main(argv=None):
    """Fine-tune (§3.2): the set-up, then the loop. -> dict(final_ckpt, run_dir, step) of this process's run."""
    args = parse_args(argv)
    resume = read_resume(args) if args.resume else None
    guard.check_train_args(args, int(os.environ.get("WORLD_SIZE", 1)), data.dataset_root(args.data, args.data_path))
    if resume is not None and args.export:
        export(args.export, resumed_model(args, resume), resume["ema"], resume, resume["args"])
        print(f"exported step {resume['step']} of {args.resume} to {args.export}")
        return dict(final_ckpt=args.resume, run_dir=None, step=resume["step"])
    rank, world, device = guard.init_distributed(args.device)
    try:
        with start_run(args, resume, rank, world, device) as run:     # the DiT, what trains, AdamW, the EMA, data
            diffusion = create_diffusion(learn_sigma=run.model.learn_sigma)
            bar = tqdm(total=args.max_steps, initial=run.step, desc="training", disable=rank != 0, dynamic_ncols=True)
            half = max(world, args.global_batch_size // 2 // world * world)    # what to try when out of memory
            advice = (f"--global-batch-size {half} ({half // world} per process) instead of {args.global_batch_size} "
                      f"({args.global_batch_size // world}), or --grad-checkpointing")
            with bar, guard.stop_signals(world) as stop, guard.out_of_memory_advice(advice):
                stream = batches(run)                                 # from where a resumed run left off
                for x, y in stream:
                    run.window.append(train_step(run.net, diffusion, run.opt, run.scaler, x, y, run.autocast))
                    update_ema(run.ema, run.tuned, args.ema_decay)
                    run.step += 1
                    bar.update(1)
                    stopping = stop.agreed()       # asked of any rank, read once: all ranks stop after the same step
                    last = stopping or run.step == args.max_steps
                    if last:
                        stream.close()      # the DataLoader's workers end before the last save: none can break it
                    if run.step % args.log_every == 0 or last:
                        log(run, bar)
                    if run.step % args.ckpt_every == 0 or last:
                        save(run)
                    if rank == 0 and args.sample_every and run.step % args.sample_every == 0:
                        bar.write(f"samples: {sample_grid(run)}")
                    if stopping:
                        raise Stopped(f"{stop.name} after step {run.step}: {run.last_ckpt} is saved; continue with "
                                      f"--resume {run.run_dir}")
                    if last:
                        break
            if rank == 0 and args.export:
                export(args.export, run.model, run.ema, dict(config=run.config, vae=run.vae, step=run.step,
                                                             time_s=run.time_s()), saved_args(args))
                print(f"exported {args.export}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return dict(final_ckpt=run.last_ckpt, run_dir=run.run_dir, step=run.step)


@contextmanager
def start_run(args, resume, rank, world, device):
    """Everything the loop needs, as a Run: the DiT its base (--init) or the resumed run fixes; the run folder (one
    writer); the data and the VAE; what trains (Table 2), AdamW and the EMA; the random streams (a resumed run's)."""
    say = print if rank == 0 else (lambda *a, **k: None)
    autocast, scaler = setup_precision(args.precision, device)
    cache = data.LatentCacheDataset(args.latent_cache, dict(data=args.data, data_path=args.data_path)) \
        if args.latent_cache else None
    base_path, base, extra = (None, None, resume["config"]) if resume else choose_base(args, cache)
    pixel, image_size = extra["pixel_space"], resume["config"]["image_size"] if resume else args.image_size
    with guard.run_folder(args, resume["step"] if resume else 0) as run_dir:
        dataset, vae, vae_identity = data_and_vae(args, cache, pixel, image_size)
        if resume is None:
            model, config, base = fresh_model(args, dataset, base_path, base, extra, say)
        else:
            model, config, base = resumed_model(args, resume), resume["config"], resume["base"]
            guard.check_same_classes(two_levels(dataset.hierarchy()), two_levels(model.hierarchy), args.resume)
        trainable, total = set_trainable(model, config["method"])
        model.to(device).train()
        model.grad_checkpointing = args.grad_checkpointing
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
        net = torch.compile(net) if args.compile else net
        tuned = [(name, p) for name, p in model.named_parameters() if p.requires_grad]   # what --tune trains
        opt = torch.optim.AdamW([p for _, p in tuned], lr=args.lr, weight_decay=0)        # after DDP's broadcast
        run = Run(args, config, base, vae_identity, vae, dataset, model, net, tuned, opt, scaler, autocast, rank,
                  world, device, run_dir, ema={name: p.detach().clone() for name, p in tuned})
        tiers = model.y_embedder.tier_sizes                                       # the rows the table has
        say(f"{config['name']} {config['image_size']}px {'pixels' if pixel else 'latents'}, {config['num_classes']} "
            f"classes / {config['num_superclasses']} superclasses, --tune {config['method']}: {trainable / 1e6:.2f}M "
            f"of {total / 1e6:.2f}M parameters trained ({100 * trainable / total:.2f}%), {world} process(es)"
            + ("" if list(tiers) in ([], ["superclass"]) else
               f"; tier rows: {', '.join(f'{n} {rank}' for rank, n in tiers.items())}"))
        seed_everything(args.seed * world + rank)        # per-rank timesteps, noise and label substitutions
        if resume is not None:
            restore_training_state(run, resume, say)
        run.started = run.clock = time.time()
        yield run


def batches(run):
    """The training batches (x, y) on the device, from the run's epoch and position in it (a resumed run sees exactly
    the batches it would have); images become latents through the VAE here, unless a latent cache holds them."""
    args, dataset, world = run.args, run.dataset, run.world
    local_batch = args.global_batch_size // world
    sampler = DistributedSampler(dataset, num_replicas=world, rank=run.rank, shuffle=True, seed=args.seed)
    per_epoch = guard.batches_per_epoch(len(dataset), len(sampler), local_batch)
    if run.position >= per_epoch:
        run.epoch, run.position = run.epoch + 1, 0
    items = SeededItems(dataset, args.seed)
    encoder = run.vae_model if run.vae_model is not None and not args.latent_cache else None
    while True:
        sampler.set_epoch(run.epoch)   # a new shuffle each epoch, the same on every rank and on every resume
        items.epoch = run.epoch        # (workers receive a copy of `items` when the loader's iterator is created)
        # the loader has its own generator: making its iterator draws nothing from the training streams
        loader = DataLoader(items, batch_size=local_batch, sampler=SkipSampler(sampler, run.position * local_batch),
                            num_workers=args.num_workers, pin_memory=run.device.type == "cuda", drop_last=True,
                            generator=torch.Generator().manual_seed(args.seed * 100_003 + run.epoch),
                            worker_init_fn=guard.worker_init)
        for x, y in loader:
            run.position += 1
            if run.position == per_epoch:
                run.epoch, run.position = run.epoch + 1, 0
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
            yield (x if encoder is None else encode(encoder, x)), y            # (N, C, H, W), (N,)


class SkipSampler(torch.utils.data.Sampler):
    """The indices of `sampler` after the first `skip`: a resume mid-epoch loads none of the batches already used."""

    def __init__(self, sampler, skip):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


class SeededItems(Dataset):
    """dataset[i] with its random draws (flip, the cached latent's noise and mirror) seeded by (seed, epoch, i): they
    depend on no worker and no resume, and leave the training streams alone (exact resumes with any --num-workers)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):     # the CPU generator alone (seeding every GPU costs more than an item)
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + i) % 2 ** 63)
            return self.dataset[i]


@torch.no_grad()
def encode(vae, x):
    """The training latent of images x: one posterior draw times the VAE's latent scale (0.18215), as DiT trains."""
    return scaled_latent(*vae.encode(x), vae.scaling_factor)   # (N, 4, H/8, W/8)


# --- Set-up: flags, precision, the base and the model, the data ------------------------------------------------------

def recipe_help(flag):
    return "default: " + ", ".join(f"{v[flag]:g} (paper)" if k == "paper" else f"{k}: {v[flag]:g}"
                                   for k, v in RECIPES.items())


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    data.add_data_args(p)
    p.add_argument("--latent-cache", help="train from a VAE-latent cache made by `python data.py cache`")
    p.add_argument("--vae", help=f"SD VAE folder: encodes images on the fly, decodes sample grids; default: {VAE}")
    p.add_argument("--num-workers", type=nonnegative_int, default=data.DEFAULT_WORKERS,
                   help="DataLoader workers per process (default: 4, or the number of cores if fewer)")
    p.add_argument("--model", choices=list(DiT_models), help="default: from --init, else DiT-XL/2 (toy: DiT-T/4)")
    p.add_argument("--image-size", type=positive_int, help="pixels, a multiple of the patch (x8 for latents); default: "
                                                           "from --init, else 256 (toy: 32)")
    p.add_argument("--init", help=f"pre-trained DiT ({PAPER_INIT} is looked up as given, then under pretrained/), one "
                                  f"of our checkpoints or run folders, or 'none'; default: {PAPER_INIT}, toy: the "
                                  f"shipped toy/{os.path.basename(TOY_BASE)}, toy-base: none")
    p.add_argument("--tune", choices=METHODS, help="what to train; default: finediffusion, full from scratch")
    p.add_argument("--table", choices=TABLES, help="the label table apart from what is tuned: tiered (subclass + "
                   "superclass rows, eq. 1) or null (a null row, standard CFG); default: finediffusion's tiered, the "
                   "baselines' null")
    p.add_argument("--superclass-prob", type=probability, default=SUPERCLASS_PROB,
                   help="label -> superclass substitution (§3.2.1; the authors' value); with --tiers, to a tier's node")
    p.add_argument("--tiers", type=rank_list, help="ranks of the hierarchy with rows in a tiered table, e.g. "
                   "genus,superclass (default: superclass, the paper's table)")
    p.add_argument("--tier-probs", type=weight_list, help="how often substitution picks each tier, e.g. 0.5,0.5 "
                   "(default: uniform)")
    p.add_argument("--lr", type=positive_float, help=recipe_help("lr"))
    p.add_argument("--global-batch-size", type=positive_int, help="over all processes; " + recipe_help("global_batch_size"))
    p.add_argument("--max-steps", type=positive_int, help=recipe_help("max_steps"))
    p.add_argument("--ema-decay", type=decay_rate, help=recipe_help("ema_decay"))
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--precision", choices=["fp32", "tf32", "fp16", "bf16"], default="tf32",
                   help="tf32: fp32 weights, TF32 matmuls on Ampere+ (as DiT); fp16: autocast + loss scaling (V100)")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations: less memory")
    p.add_argument("--device", type=device_name, help="default: cuda (cuda:LOCAL_RANK under torchrun), else cpu")
    p.add_argument("--results-dir", type=folder_path, default="results")
    p.add_argument("--run-dir", type=folder_path, help="run folder; default: <results-dir>/NNN-<model>-<tune>")
    p.add_argument("--ckpt-every", type=positive_int, help=recipe_help("ckpt_every"))
    p.add_argument("--log-every", type=positive_int, help=recipe_help("log_every"))
    p.add_argument("--sample-every", type=nonnegative_int, default=0, help="an EMA sample grid every N steps (0: never)")
    p.add_argument("--resume", help="continue a run from one of its checkpoints (its arguments are the defaults)")
    p.add_argument("--export", type=out_file, help="a standalone checkpoint (every tensor, EMA): after training, or, "
                                                   "with --resume, of that checkpoint without training")
    args, given = p.parse_given(argv)
    args.given = given                               # --resume takes the others from the checkpoint
    for flag, value in RECIPES.get(args.data, RECIPES["paper"]).items():
        if flag not in given and not args.resume:
            setattr(args, flag, value)
    return args


def setup_precision(precision, device):
    """The autocast of the DiT's forward pass, and a GradScaler (fp16 only: its gradients underflow unscaled)."""
    guard.check_precision(precision, device)
    if device.type == "cuda":      # TF32: fp32 weights and accumulation, matmul inputs rounded (DiT trains so)
        torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    return guard.precision_context(precision, device.type), torch.amp.GradScaler(device.type,
                                                                                  enabled=precision == "fp16")


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def choose_base(args, cache):
    """A new run's base (--init; 'none': from scratch) -> (path, checkpoint, the build_model arguments it implies:
    pixel_space, learn_sigma), filling --model, --image-size (the base's: they must agree) and --tune."""
    path = None if args.init.lower() == "none" else os.path.abspath(guard.resolve_checkpoint(args.init))
    guard.check_toy_base(path, TOY_BASE, TOY_BASE_SHA256)
    base = guard.read_checkpoint(path) if path else None
    args.tune = args.tune or ("full" if base is None else "finediffusion")
    toy = args.data in TOY_SETS and cache is None
    if base is None:
        args.model = args.model or ("DiT-T/4" if toy else "DiT-XL/2")
        args.image_size = args.image_size or (cache.image_size if cache else data.default_image_size(args.data))
        extra = dict(pixel_space=toy)
    else:            # ours say what they are; the official and the authors' files, their tensor shapes
        c = base["config"] if "config" in base else published_layout(guard.checkpoint_tensors(base))[1]
        guard.check_fits_base(args, c["name"], c["image_size"])
        args.model, args.image_size = c["name"], c["image_size"]
        extra = dict(pixel_space=c["pixel_space"], **({} if c.get("learn_sigma", True) else dict(learn_sigma=False)))
    guard.check_image_size(args.model, args.image_size, extra["pixel_space"])
    return path, base, extra


def fresh_model(args, dataset, base_path, base, extra, say):
    """A new run's DiT, its config and its base {"path", "sha256"} (None: every tensor is saved). The base's tensors
    start it (a label table of another size re-initialised); a delta base is first put back on its own base, and the
    run then saves every tensor (deltas on deltas would chain)."""
    guard.check_tiers(args.tiers or ["superclass"], rank_names(dataset.hierarchy()), args.tier_probs,
                      (args.table or default_table(args.tune)) == "tiered")
    tiers = {} if args.tiers in (None, ["superclass"]) else dict(tiers=args.tiers)     # the paper's: config as before
    config = dict(name=args.model, image_size=args.image_size, num_classes=dataset.num_classes,
                  num_superclasses=dataset.num_superclasses, method=args.tune,
                  table=args.table or default_table(args.tune), **tiers, **extra)
    seed_everything(args.seed)   # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(**config, hierarchy=dataset.hierarchy(), superclass_prob=args.superclass_prob,
                        tier_probs=args.tier_probs)
    if base is None:
        return model, config, None
    chained = bool(base.get("base"))
    state = load_model(base_path, base_flag=None)[0].state_dict() if chained else guard.checkpoint_tensors(base)
    report = load_pretrained(model, state, f"--init {base_path} does not fit a --tune {args.tune} DiT")
    say(f"init: {base_path}" + "".join(f"; re-initialised {r}" for r in report["reinitialised"])
        + (f"; {len(report['identity'])} new tensors start at the identity" if report["identity"] else ""))
    return model, config, None if chained else dict(path=base_path, sha256=None)


def data_and_vae(args, cache, pixel, image_size):
    """The training items (a latent cache, or images; built by rank 0 alone under torchrun) and, for a latent DiT,
    the VAE that encodes images (unless cached) and decodes sample grids -> (dataset, vae or None, its identity)."""
    vae = None if pixel or (cache and not args.sample_every) else AutoencoderKL.from_pretrained(args.vae or VAE)
    guard.check_training_inputs(cache, vae, pixel, image_size, LATENT_CHANNELS, args.latent_cache,
                                cache is None or vae is None or same_vae(cache.meta["vae"], vae.identity()))
    dataset = cache or guard.on_rank0(lambda: data.build_dataset(
        args.data, args.data_path, args.image_size, args.split, flip=True, seed=args.seed,
        hierarchy_csv=args.hierarchy_csv))
    return dataset, vae, vae.identity() if vae else cache.meta["vae"] if cache else None


# --- The state of a run, its checkpoints and its log -----------------------------------------------------------------

@dataclass
class Run:
    """What a training run holds between steps; a checkpoint saves it (model.save_checkpoint's schema)."""
    args: argparse.Namespace
    config: dict
    base: dict                    # None: save every tensor; else {"path", "sha256"}: save the tuned ones only
    vae: dict                     # the VAE's identity (None in pixel space)
    vae_model: torch.nn.Module    # the VAE that encodes the images and decodes the sample grids, or None
    dataset: Dataset
    model: torch.nn.Module
    net: torch.nn.Module          # the model as the loop calls it: wrapped in DDP, compiled
    tuned: list                   # (name, parameter) of every tensor --tune trains
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object              # the --precision context of the forward pass
    rank: int
    world: int
    device: torch.device
    run_dir: str = None
    ema: dict = None              # the EMA of each tuned tensor, by name
    step: int = 0
    epoch: int = 0
    position: int = 0             # batches of this epoch already trained on
    last_ckpt: str = None
    window: list = field(default_factory=list)   # the losses (device tensors) of the steps not yet logged
    time_before: float = 0.0      # training wall time (s) of the run before this process: from --resume
    started: float = 0.0          # time.time() when this process's loop began
    clock: float = 0.0            # time.time() of the last log line
    log_failed: bool = False      # log.jsonl could not be appended to (a full disk): warned once

    def time_s(self):
        """Wall time spent in the training loop, summed over resumes (seconds): the cost axis of paper Fig. 2."""
        return self.time_before + time.time() - self.started


def save(run):
    """<run>/checkpoints/<step>.pt, written by rank 0, with every rank's random streams; only weights whose every loss
    was finite (read_losses)."""
    read_losses(run)
    rngs = all_ranks(guard.rng_state(run.device), run.world)
    if run.rank != 0:
        return
    if run.base is not None and run.base["sha256"] is None:
        run.base["sha256"] = guard.file_sha256(run.base["path"])      # a delta must only ever meet its own base
    state = run.model.state_dict()
    model = {name: state[name] for name, _ in run.tuned} if run.base else state
    path = os.path.join(run.run_dir, "checkpoints", f"{run.step:07d}.pt")
    with guard.saving_checkpoint(path, run.step, run.last_ckpt):   # nothing half-written; the last good one named
        save_checkpoint(path, model=model, ema=with_ema(model, run.ema), base=run.base, config=run.config,
                        hierarchy=run.model.hierarchy, vae=run.vae, step=run.step, time_s=run.time_s(),
                        args=saved_args(run.args),
                        train=dict(opt=run.opt.state_dict(), scaler=run.scaler.state_dict() if run.scaler.is_enabled()
                                   else None, rng=rngs, world_size=run.world, epoch=run.epoch, position=run.position))
    run.last_ckpt = path


def export(path, model, ema, made, args):
    """A standalone checkpoint: every tensor and its EMA, no base, no training state. made: config, vae, step, time_s."""
    state = model.state_dict()
    save_checkpoint(path, model=state, ema=with_ema(state, ema), base=None, config=made["config"],
                    hierarchy=model.hierarchy, vae=made.get("vae"), step=made["step"], time_s=made.get("time_s"),
                    args=args)


def saved_args(args):
    return {k: v for k, v in vars(args).items() if k != "given"}


def read_losses(run):
    """The losses of the steps since the last read, averaged over the processes -> list: the loop's only wait for the
    GPU. A non-finite one stops the run before anything is saved: the last checkpoint stays the last good state."""
    if not run.window:
        return []
    losses = torch.stack(run.window).float()                   # (k,) one per step
    if run.world > 1:
        dist.all_reduce(losses)                               # every rank sees the same values: all stop together
        losses /= run.world
    run.window = []
    return guard.check_losses(losses.tolist(), run.step, run.last_ckpt)


def log(run, bar):
    """One log line on the console and in <run>/log.jsonl: the mean loss since the last line, speed, memory."""
    window = read_losses(run)
    elapsed, run.clock = max(time.time() - run.clock, 1e-9), time.time()
    peak = torch.cuda.max_memory_allocated(run.device) / 2 ** 30 if run.device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20          # Linux reports KiB
    record = dict(step=run.step, epoch=run.epoch, time_s=run.time_s(), loss=sum(window) / max(len(window), 1),
                  steps_per_s=len(window) / elapsed, images_per_s=len(window) * run.args.global_batch_size / elapsed,
                  peak_mem_gb=peak)
    if run.rank == 0:
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        run.log_failed = guard.append_log(os.path.join(run.run_dir, "log.jsonl"), json.dumps(record), bar.write,
                                          run.log_failed)


@torch.no_grad()
def sample_grid(run):
    """<run>/samples/<step>.png: EMA samples spread over the classes (50 DDPM steps, w = 4, eq. 1 where superclass
    rows exist); the training weights and random streams are left as they were."""
    model, tuned = run.model, run.tuned
    backup = {name: p.detach().clone() for name, p in tuned}
    K = model.y_embedder.num_classes
    y = torch.linspace(0, K - 1, min(8, K)).round().long()
    guide = guide_labels(model, y, "superclass" if model.y_embedder.num_superclasses else "null")
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        for name, p in tuned:
            p.copy_(run.ema[name])
        images = sample_images(model, y, guide, CFG_SCALE, Sampler("ddpm", 50), run.vae_model, run.args.seed,
                               run.device, progress=False)
        for name, p in tuned:
            p.copy_(backup[name])
    model.train()
    path = os.path.join(run.run_dir, "samples", f"{run.step:07d}.png")
    save_png(images, path, enlarge=True)
    return path


# --- Resume: continue a run exactly where one of its checkpoints left off --------------------------------------------

NOT_RESUMED = {"resume", "export", "run_dir", "init", "given"}     # --init on a resume: where its base moved to
# What fixes the model or its data: a resumed run cannot change it (paths may move: --data-path, --latent-cache, --vae).
FIXED_ON_RESUME = ("model", "image_size", "tune", "table", "tiers", "data", "split")


def read_resume(args):
    """The checkpoint of --resume (a run folder: its newest); the run's arguments become the defaults of the others."""
    args.resume = guard.resolve_checkpoint(args.resume)
    ckpt = guard.read_checkpoint(args.resume)
    guard.check_resume(args, ckpt, FIXED_ON_RESUME)
    for k, v in ckpt["args"].items():
        if k not in NOT_RESUMED and k not in args.given and hasattr(args, k):
            setattr(args, k, v)
    guard.check_resume_steps(args, ckpt)
    return ckpt


def resumed_model(args, ckpt):
    """The run's DiT with its trained (not EMA) tensors; a delta goes onto its base (--init: if it moved)."""
    base = os.path.abspath(guard.resolve_checkpoint(args.init)) if args.init and args.init.lower() != "none" else None
    model, _ = load_model(args.resume, base=base, weights="model", base_flag="--init")
    model.y_embedder.superclass_prob, model.y_embedder.tier_probs = args.superclass_prob, args.tier_probs
    return model


def restore_training_state(run, ckpt, say):
    """Optimizer, loss scale, EMA, data position and every rank's random streams."""
    state = ckpt["train"]
    run.opt.load_state_dict(state["opt"])
    for group in run.opt.param_groups:               # a resumed run may change it (e.g. a lower --lr)
        group.update(lr=run.args.lr)
    if state["scaler"] is not None and run.scaler.is_enabled():
        run.scaler.load_state_dict(state["scaler"])
    for name in run.ema:
        run.ema[name].copy_(ckpt["ema"][name])
    if state["world_size"] == run.world:
        guard.set_rng_state(state["rng"][run.rank], run.device)
    else:
        say(f"warning: a run of {state['world_size']} processes resumed on {run.world}: the data order and the "
            "noise will not repeat exactly")
    run.step, run.epoch, run.position = ckpt["step"], state["epoch"], state["position"]
    run.time_before, run.last_ckpt = ckpt["time_s"], run.args.resume
    say(f"resumed {run.args.resume} at step {run.step} (epoch {run.epoch}, batch {run.position})")


if __name__ == "__main__":
    sys.exit(run_cli(main))

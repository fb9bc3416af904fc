"""Fine-tune a pre-trained DiT for fine-grained classes with FineDiffusion (or a baseline), on one process or many.

    torchrun --nproc_per_node=8 train.py --data inat21          # the paper's run (§4.2), from DiT-XL-2-256x256.pt
    python train.py --data toy                                   # the quickstart: from the shipped toy base, a CPU
    python train.py --data toy-base                              # how the toy base was made (12,000 steps, ~64 min on 2 cores)
    python train.py --resume results/001-DiT-T-4-finediffusion  # continue a run (its newest checkpoint), bit for bit
    python train.py --resume CKPT --export model.pt     # a standalone file in the official {"model", "ema"} layout

What one step does (paper §3.1, §3.2.1; `train_step`):
  x (an image batch, or its SD-VAE latent z = 0.18215 * (mean + sigma * eps)) and labels y of subclasses;
  t ~ U{0..999}; the TieredEmbedder swaps y for its superclass row with probability --superclass-prob (0.1),
  which trains eps(x_t | c_p), the guide of fine-grained CFG (eq. 1); loss = IDDPM hybrid (eps-MSE + VB);
  AdamW (lr 1e-4, no weight decay) updates only the tensors --tune trains; the EMA (0.9999) follows them.
--tune (paper Table 2): full | bitfit | difffit | finediffusion (label table + biases + LayerNorm affine, 1.77% of
DiT-XL/2). Frozen tensors have requires_grad=False, so autograd computes no weight gradient for them, DDP does
not all-reduce them, AdamW and the EMA hold no state for them: that is where the 1.56x speed-up comes from.

Defaults are the paper's (§4.2): DiT-XL/2 from DiT-XL-2-256x256.pt, 256 px, FineDiffusion, AdamW lr 1e-4, global
batch 256, 200K steps, EMA 0.9999, data under data/<name>/, the base and the VAE under pretrained/. `--data toy`
defaults to the toy world's published base and the settings its quickstart was tuned with (RECIPES).

Read `train_step`, then `main` top to bottom: set-up (`start_run`: base checkpoint, run folder, data, model, what
trains, AdamW, the EMA), then the loop. Checkpoints (model.save_checkpoint has the schema) hold only the tuned
tensors when there is a base file ("delta", §3.2.1), plus what --resume needs to continue bit for bit. The run
folder's machinery (one writer, its log, the random streams of an exact resume, pre-emption) is in runs.py.
"""
import argparse
import errno
import itertools
import json
import math
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
from diffusion import create_diffusion
from hardening import (DISK_FULL, ArgumentParser, RunFailed, Stopped, UserError, all_ranks, append_line,
                       checkpoint_tensors, decay_rate, device_name, file_sha256, folder_path, init_distributed,
                       nonnegative_int, out_file, out_of_memory_advice, positive_float, positive_int, precision_context,
                       probability, read_checkpoint, resolve_checkpoint, rng_state, run_cli, run_folder, set_rng_state,
                       stop_signals, worker_init)
from model import (LATENT_CHANNELS, METHODS, SUPERCLASS_PROB, TABLES, DiT_models, build_model, check_image_size,
                   default_table, load_model, load_pretrained, published_layout, save_checkpoint, set_trainable)
from sample import CFG_SCALE, Sampler, guide_labels, sample_images, save_png
from vae import AutoencoderKL, same_vae, scaled_latent

PAPER_INIT = "DiT-XL-2-256x256.pt"
VAE = "sd-vae-ft-ema"     # the paper's (DiT's) VAE, looked up as given, then under pretrained/
# The toy world's published base (ImageNet's DiT-XL/2 in miniature): shipped in the repository (found from any
# working folder), and its sha256, so that a changed or half-checked-out file is refused instead of fine-tuned from.
TOY_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "DiT-T-4-toy-base.pt")
TOY_BASE_SHA256 = "52bf75fecd85e009a6bc0e092c6e86f4771fa7328924ba1a06e4c73cc0b8d485"

# The defaults that depend on --data: the paper's (§4.1-4.2) for iNat21 and any folder of images; for the toy world,
# fine-tuning from the shipped toy base with the settings its quickstart was tuned with (README), and the recipe that
# made that base from the broad toy-base set. A flag given on the command line wins; on --resume, the run's own.
RECIPES = {
    "paper": dict(init=PAPER_INIT, lr=1e-4, global_batch_size=256, max_steps=200_000, ema_decay=0.9999,
                  ckpt_every=50_000, log_every=100),
    "toy": dict(init=TOY_BASE, lr=1e-2, global_batch_size=64, max_steps=800, ema_decay=0.995, ckpt_every=800,
                log_every=100),
    "toy-base": dict(init="none", lr=1e-3, global_batch_size=64, max_steps=12_000, ema_decay=0.999,
                     ckpt_every=2_000, log_every=200),
}


# ----------------------------------------------------------------------------------------------------------
# The method: one training step (paper §3.1, §3.2.1), the EMA
# ----------------------------------------------------------------------------------------------------------

def train_step(net, diffusion, opt, scaler, x, y, autocast):
    """Forward, hybrid loss (IDDPM: eps-MSE + VB), backward, AdamW. Returns the loss as a 0-dim tensor on the device:
    reading it (.item()) would make the CPU wait for the GPU every step, so the loop reads losses only when it logs
    or saves (check_losses)."""
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


# ----------------------------------------------------------------------------------------------------------
# Training, top to bottom
# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    """Fine-tune (paper §3.2) top to bottom: the set-up, then the loop. Returns dict(final_ckpt, run_dir, losses,
    step) of what this process trained (losses: each step's, averaged over the processes)."""
    args = parse_args(argv)
    resume = read_resume(args) if args.resume else None
    check_args(args, int(os.environ.get("WORLD_SIZE", 1)))
    if resume is not None and args.export:
        return export_resumed(args, resume)
    rank, world, device = init_distributed(args.device)
    try:
        with start_run(args, resume, rank, world, device) as run:     # the DiT, what trains, AdamW, the EMA, data
            diffusion = create_diffusion(learn_sigma=run.model.learn_sigma)
            bar = tqdm(total=args.max_steps, initial=run.step, desc="training", disable=rank != 0, dynamic_ncols=True)
            with bar, stop_signals(world) as stop, out_of_memory_advice(smaller_batch(args, world)):
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
                export(args.export, run.model, run.ema, run.config, run.vae, run.step, run.time_s(), saved_args(args))
                print(f"exported {args.export}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return dict(final_ckpt=run.last_ckpt, run_dir=run.run_dir, losses=run.losses, step=run.step)


@contextmanager
def start_run(args, resume, rank, world, device):
    """Everything the loop needs, as a Run: the base checkpoint (--init) or the resumed run fixes the DiT; then
    the run folder (locked: one writer), the data and the VAE, the model and what it trains (paper Table 2), AdamW
    and the EMA over the tuned tensors, and the random streams (exactly a resumed run's)."""
    say = print if rank == 0 else (lambda *a, **k: None)
    autocast, scaler = setup_precision(args.precision, device)
    cache = open_latent_cache(args) if args.latent_cache else None
    if resume is None:
        init_path, init, extra = choose_base(args, cache)
        pixel, image_size = extra["pixel_space"], args.image_size
    else:
        pixel, image_size = resume["config"]["pixel_space"], resume["config"]["image_size"]
    with run_folder(args, resume["step"] if resume else 0) as run_dir:
        dataset, vae, vae_identity = data_and_vae(args, cache, pixel, image_size)
        if resume is None:
            model, config, base = fresh_model(args, dataset, init_path, init, extra, say)
            del init
        else:
            model, config, base = resumed_model(args, resume), resume["config"], resume["base"]
            if dataset.hierarchy() != model.hierarchy:
                raise UserError(f"the data's classes differ from those of {args.resume}: resume with the same --data")
        trainable, total = set_trainable(model, config["method"])
        model.to(device).train()
        model.grad_checkpointing = args.grad_checkpointing
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
        net = torch.compile(net) if args.compile else net
        tuned = [(name, p) for name, p in model.named_parameters() if p.requires_grad]   # what --tune trains
        opt = torch.optim.AdamW([p for _, p in tuned], lr=args.lr, weight_decay=0)        # after DDP's broadcast
        run = Run(args, config, base, vae_identity, vae, dataset, model, net, tuned, opt, scaler, autocast, rank,
                  world, device, run_dir, ema={name: p.detach().clone() for name, p in tuned})
        say(f"{config['name']} {config['image_size']}px {'pixels' if pixel else 'latents'}, {config['num_classes']} "
            f"classes / {config['num_superclasses']} superclasses, --tune {config['method']}: {trainable / 1e6:.2f}M "
            f"of {total / 1e6:.2f}M parameters trained ({100 * trainable / total:.2f}%), {world} process(es)")
        seed_everything(args.seed * world + rank)        # per-rank timesteps, noise and label substitutions
        if resume is not None:
            restore_training_state(run, resume, say)
        run.started = run.clock = time.time()
        yield run


def smaller_batch(args, world):
    """What to try when a training step runs out of memory: half the batch per process, or recomputing activations."""
    batch = args.global_batch_size
    half = max(world, batch // 2 // world * world)
    return (f"--global-batch-size {half} ({half // world} per process) instead of {batch} ({batch // world}), or "
            "--grad-checkpointing")


def export_resumed(args, resume):
    """--resume CKPT --export FILE: write the checkpoint as a standalone file, without training."""
    model = resumed_model(args, resume)
    export(args.export, model, resume["ema"], resume["config"], resume.get("vae"), resume["step"],
           resume.get("time_s"), resume["args"])
    print(f"exported step {resume['step']} of {args.resume} to {args.export}")
    return dict(final_ckpt=args.resume, run_dir=None, losses=[], step=resume["step"])


def batches(run):
    """The training batches (x, y) on the device, from where the run is: its epoch and its position in it (so a
    resumed run sees exactly the batches it would have). The epoch and position count each batch as it is handed
    out; images become latents through the VAE here, unless they come from a latent cache."""
    args, dataset, world = run.args, run.dataset, run.world
    local_batch = args.global_batch_size // world
    sampler = DistributedSampler(dataset, num_replicas=world, rank=run.rank, shuffle=True, seed=args.seed)
    per_epoch = len(sampler) // local_batch
    if per_epoch == 0:
        raise UserError(f"{len(dataset)} training items give {len(sampler)} per process, fewer than the "
                        f"per-process batch {local_batch}: lower --global-batch-size")
    if run.position >= per_epoch:
        run.epoch, run.position = run.epoch + 1, 0
    items = SeededItems(dataset, args.seed)
    encoder = run.vae_model if run.vae_model is not None and not args.latent_cache else None
    while True:
        for x, y in epoch_loader(items, sampler, run.epoch, run.position, local_batch, args, run.device):
            run.position += 1
            if run.position == per_epoch:
                run.epoch, run.position = run.epoch + 1, 0
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
            yield (x if encoder is None else encode(encoder, x)), y            # (N, C, H, W), (N,)


# ----------------------------------------------------------------------------------------------------------
# Set-up: arguments, precision, random streams
# ----------------------------------------------------------------------------------------------------------

def recipe_help(flag):
    """'default: 0.0001 (paper), toy: 0.01, toy-base: 0.001' for a flag whose default depends on --data."""
    return "default: " + ", ".join(f"{v[flag]:g} (paper)" if k == "paper" else f"{k}: {v[flag]:g}"
                                   for k, v in RECIPES.items())


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=data.DATASETS, help="dataset (needed unless --latent-cache)")
    d.add_argument("--data-path", help="dataset root; default: data/<--data> (inat21: the folder holding train_mini/)")
    d.add_argument("--split", help="default: train_mini for inat21, else train")
    d.add_argument("--hierarchy-csv", help="class,superclass rows for a flat folder dataset")
    d.add_argument("--coarse", action="store_true", help="train on the superclass ids (a coarse base model)")
    d.add_argument("--latent-cache", help="train from a VAE-latent cache made by `python data.py cache`")
    d.add_argument("--vae", help=f"SD VAE folder: encodes images on the fly, decodes sample grids; default: "
                                 f"{VAE} (as given, then under pretrained/)")
    d.add_argument("--num-workers", type=nonnegative_int, default=data.DEFAULT_WORKERS,
                   help="DataLoader workers per process (default: 4, or the number of cores if fewer)")
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=list(DiT_models), help="default: from --init, else DiT-XL/2 (toy: DiT-T/4)")
    m.add_argument("--image-size", type=positive_int, help="pixels, a multiple of the patch (x8 for latents); "
                                                         "default: from --init, else 256 (toy: 32)")
    m.add_argument("--init", help=f"pre-trained DiT ({PAPER_INIT} is looked up as given, then under pretrained/), "
                                  f"one of our checkpoints or run folders, or 'none'; default: {PAPER_INIT}, toy: "
                                  f"the shipped toy/{os.path.basename(TOY_BASE)}, toy-base: none")
    m.add_argument("--tune", choices=METHODS, help="what to train; default: finediffusion, full from scratch")
    m.add_argument("--table", choices=TABLES, help="the label table, to separate what is tuned from how it is guided: "
                   "tiered (subclass + superclass rows, eq. 1) or null (a null row, standard CFG); default: "
                   "finediffusion's tiered, the baselines' null")
    m.add_argument("--superclass-prob", type=probability, default=SUPERCLASS_PROB,
                   help="label -> superclass substitution (§3.2.1; the authors' value)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=positive_float, help=recipe_help("lr"))
    o.add_argument("--global-batch-size", type=positive_int,
                   help="over all processes; " + recipe_help("global_batch_size"))
    o.add_argument("--max-steps", type=positive_int, help=recipe_help("max_steps"))
    o.add_argument("--ema-decay", type=decay_rate, help=recipe_help("ema_decay"))
    o.add_argument("--seed", type=nonnegative_int, default=0)
    o.add_argument("--precision", choices=["fp32", "tf32", "fp16", "bf16"], default="tf32",
                   help="tf32: fp32 weights, TF32 matmuls on Ampere+ (as DiT); fp16: autocast + loss scaling (V100; "
                        "on a CPU too, where torch supports it)")
    o.add_argument("--compile", action="store_true", help="torch.compile the DiT")
    o.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations: less memory")
    o.add_argument("--device", type=device_name,
                   help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    r = p.add_argument_group("output")
    r.add_argument("--results-dir", type=folder_path, default="results")
    r.add_argument("--run-dir", type=folder_path, help="run folder; default: <results-dir>/NNN-<model>-<tune>")
    r.add_argument("--ckpt-every", type=positive_int, help=recipe_help("ckpt_every"))
    r.add_argument("--log-every", type=positive_int, help=recipe_help("log_every"))
    r.add_argument("--sample-every", type=nonnegative_int, default=0,
                   help="save an EMA sample grid every N steps (0: never)")
    r.add_argument("--resume", help="continue a run from one of its checkpoints (its arguments are the defaults)")
    r.add_argument("--export", type=out_file,
                   help="write a standalone checkpoint (every tensor, EMA): after training, or, with --resume, "
                        "of that checkpoint without training")
    args, given = p.parse_given(argv)
    args.given = given                          # --resume takes the others from the checkpoint
    for flag, value in RECIPES.get(args.data, RECIPES["paper"]).items():
        if flag not in given and not args.resume:    # a resumed run takes its own (read_resume)
            setattr(args, flag, value)
    return args


def check_args(args, world):
    """User mistakes found before any process starts work (every rank finds the same ones)."""
    if args.global_batch_size % world:
        raise UserError(f"--global-batch-size {args.global_batch_size} does not divide over {world} processes: "
                        f"use a positive multiple of {world}")
    if args.resume and args.export:
        return
    if not args.data and not args.latent_cache:
        raise UserError("--data is required (inat21, folder or toy), or --latent-cache DIR")
    if args.data in ("inat21", "folder") and not args.latent_cache:
        path = data.dataset_root(args.data, args.data_path)
        if not os.path.isdir(path):
            where = f"; iNat21 is published at {data.INAT21_URL}" if args.data == "inat21" else ""
            raise UserError(f"--data {args.data}: no dataset at {path} (put it there or pass --data-path DIR){where}")


def setup_precision(precision, device):
    """Autocast context for the DiT's forward pass and a GradScaler (enabled for fp16 only: fp16 gradients
    underflow without loss scaling)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bf16 (e.g. a V100): use --precision fp16")
    if device.type == "cuda":
        # TF32 keeps fp32 weights and accumulation, rounds matmul inputs to 10 mantissa bits (DiT trains so).
        torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    return precision_context(precision, device.type), torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


# ----------------------------------------------------------------------------------------------------------
# The model to train: its base checkpoint (--init), its configuration, its starting weights
# ----------------------------------------------------------------------------------------------------------

def choose_base(args, cache):
    """A new run's base checkpoint (--init; 'none' trains from scratch), and the DiT it fixes: fills --model,
    --image-size and --tune. -> (path, checkpoint, extra build_model kwargs), path and checkpoint None for none."""
    init_path = None if args.init.lower() == "none" else os.path.abspath(resolve_checkpoint(args.init))
    if init_path and os.path.isfile(TOY_BASE) and os.path.samefile(init_path, TOY_BASE) and \
            file_sha256(init_path) != TOY_BASE_SHA256:
        raise UserError(f"{TOY_BASE} is not the toy base this repository shipped (its sha256 differs): restore it "
                        f"with `git checkout -- {TOY_BASE}`")
    init = read_checkpoint(init_path) if init_path else None
    args.tune = args.tune or ("full" if init is None else "finediffusion")
    extra = base_config(args, init, cache)
    check_image_size(args.model, args.image_size, extra["pixel_space"])
    return init_path, init, extra


def base_config(args, init, cache):
    """Fill --model and --image-size from the base checkpoint (they must agree) or the defaults: DiT-XL/2 at 256 px
    on VAE latents; the toy's DiT-T/4 on 32 px pixels; a latent cache's size.
    -> the build_model keyword arguments the base implies (pixel_space, learn_sigma)."""
    toy = args.data in data.TOY_SETS and cache is None
    if init is None:
        args.model = args.model or ("DiT-T/4" if toy else "DiT-XL/2")
        args.image_size = args.image_size or (cache.image_size if cache else data.default_image_size(args.data))
        return dict(pixel_space=toy)
    # ours say what they are; the official and the authors' files, their tensor shapes
    c = init["config"] if "config" in init else published_layout(checkpoint_tensors(init))[1]
    name, size, pixel, learn_sigma = c["name"], c["image_size"], c["pixel_space"], c.get("learn_sigma", True)
    for flag, given, found in (("--model", args.model, name), ("--image-size", args.image_size, size)):
        if given is not None and given != found:
            raise UserError(f"{flag} {given} does not match the --init checkpoint ({found}): leave it out")
    args.model, args.image_size = name, size
    return dict(pixel_space=pixel, **({} if learn_sigma else dict(learn_sigma=False)))


def fresh_model(args, dataset, init_path, init, extra, say):
    """A new run's DiT, its configuration and its base {"path", "sha256"} (None: every tensor is saved).

    The base's tensors are the starting weights; a label table of another size is re-initialised. One of our
    delta checkpoints is first put back on its own base, and then the run saves every tensor (deltas on deltas
    would chain)."""
    config = dict(name=args.model, image_size=args.image_size, num_classes=dataset.num_classes,
                  num_superclasses=dataset.num_superclasses, method=args.tune,
                  table=args.table or default_table(args.tune), **extra)
    seed_everything(args.seed)   # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(**config, hierarchy=dataset.hierarchy(), superclass_prob=args.superclass_prob)
    if init is None:
        if args.tune != "full":
            say(f"warning: training from scratch with --tune {args.tune} trains only a few tensors")
        return model, config, None
    chained = bool(init.get("base"))
    state = load_model(init_path, base_flag=None)[0].state_dict() if chained else checkpoint_tensors(init)
    try:
        report = load_pretrained(model, state)
    except UserError as e:
        raise UserError(f"--init {init_path} does not fit a --tune {args.tune} DiT: {e}") from None
    say(f"init: {init_path}" + "".join(f"; re-initialised {r}" for r in report["reinitialised"])
        + (f"; {len(report['identity'])} new tensors start at the identity" if report["identity"] else ""))
    return model, config, None if chained else dict(path=init_path, sha256=None)


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------

def data_and_vae(args, cache, pixel, image_size):
    """The training items (a latent cache, or images) and, for a latent DiT, the VAE that encodes the images
    (unless they are cached) and decodes the sample grids, checked against the DiT before any step.
    -> (dataset, vae or None, the VAE's identity for the checkpoints)."""
    latents = [LATENT_CHANNELS, image_size // 8, image_size // 8]
    if cache is not None and (pixel or cache.latent_shape != latents):
        raise UserError(f"the latent cache holds {'x'.join(map(str, cache.latent_shape))} latents of "
                        f"{cache.image_size}px images; this DiT takes " + (f"{image_size}px pixels" if pixel else
                        f"{'x'.join(map(str, latents))} latents of {image_size}px images"))
    vae = None if pixel or (cache and not args.sample_every) else AutoencoderKL.from_pretrained(args.vae or VAE)
    if vae is not None:
        vae.check_fits(LATENT_CHANNELS, image_size)
    if cache is not None and vae is not None and not same_vae(cache.meta["vae"], vae.identity()):
        raise UserError(f"the latent cache {args.latent_cache} was built with another VAE than {vae.weights_file}")
    dataset = cache or image_dataset(args)
    return dataset, vae, vae.identity() if vae else cache.meta["vae"] if cache else None


def open_latent_cache(args):
    """Cached VAE latents (`python data.py cache`); a cache of another dataset is refused."""
    return data.LatentCacheDataset(args.latent_cache, expect=dict(data=args.data, data_path=args.data_path),
                                   flip=True, coarse=args.coarse)


def image_dataset(args):
    """The images, in [-1, 1] with DiT's crop and flips: trained on as pixels, or encoded by the VAE on the fly."""
    return data.build_dataset(args.data, args.data_path, args.image_size, args.split, flip=True, seed=args.seed,
                              coarse=args.coarse, hierarchy_csv=args.hierarchy_csv)


def epoch_loader(items, sampler, epoch, position, local_batch, args, device):
    """The DataLoader of one epoch (SeededItems, DistributedSampler), starting after `position` batches."""
    sampler.set_epoch(epoch)   # a new shuffle each epoch, the same on every rank and on every resume
    items.epoch = epoch        # (workers receive a copy of `items` when the loader's iterator is created)
    # Its own generator: creating the iterator must not draw from the global RNG (resume would diverge).
    generator = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    return DataLoader(items, batch_size=local_batch, sampler=SkipSampler(sampler, position * local_batch),
                      num_workers=args.num_workers, pin_memory=device.type == "cuda", drop_last=True,
                      generator=generator, worker_init_fn=worker_init)


class SkipSampler(torch.utils.data.Sampler):
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
            # the CPU generator alone: items are made on the CPU, and torch.manual_seed, which also seeds every
            # GPU, costs more than rendering a toy image
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + i) % 2 ** 63)
            return self.dataset[i]


@torch.no_grad()
def encode(vae, x):
    """The training latent of images x: one posterior draw, times the VAE's latent scale (0.18215), as DiT's training."""
    return scaled_latent(*vae.encode(x), vae.scaling_factor)   # (N, 4, H/8, W/8)


# ----------------------------------------------------------------------------------------------------------
# The state of a run, its checkpoints and its log
# ----------------------------------------------------------------------------------------------------------

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
    window: list = field(default_factory=list)   # the losses (device tensors) of the steps not yet read
    losses: list = field(default_factory=list)   # every step's loss this process trained, once read (floats)
    logged: int = 0               # how many of `losses` the log has averaged
    time_before: float = 0.0      # training wall time (s) of the run before this process: from --resume
    started: float = 0.0          # time.time() when this process's loop began
    clock: float = 0.0            # time.time() of the last log line
    log_failed: bool = False      # log.jsonl could not be appended to (a full disk): warned once

    def time_s(self):
        """Wall time spent in the training loop, summed over resumes (seconds): the cost axis of paper Fig. 2."""
        return self.time_before + time.time() - self.started


def save(run):
    """<run>/checkpoints/<step>.pt, written by rank 0; every rank contributes its random streams. Only weights whose
    every loss was finite are saved (check_losses)."""
    check_losses(run)
    rngs = all_ranks(rng_state(run.device), run.world)
    if run.rank != 0:
        return
    if run.base is not None and run.base["sha256"] is None:
        run.base["sha256"] = file_sha256(run.base["path"])      # a delta must only ever meet its own base
    state = run.model.state_dict()
    model = {name: state[name] for name, _ in run.tuned} if run.base else state
    path = os.path.join(run.run_dir, "checkpoints", f"{run.step:07d}.pt")
    try:
        save_checkpoint(path, model=model, ema=with_ema(model, run.ema), base=run.base, config=run.config,
                        hierarchy=run.model.hierarchy, vae=run.vae, step=run.step, time_s=run.time_s(),
                        args=saved_args(run.args),
                        train=dict(opt=run.opt.state_dict(), scaler=run.scaler.state_dict() if run.scaler.is_enabled()
                                   else None, rng=rngs, world_size=run.world, epoch=run.epoch, position=run.position))
    except OSError as e:       # atomic: nothing half-written is left, and the earlier checkpoints are intact
        why, fix = ("disk full", "free some space") if e.errno in DISK_FULL else (
            e.strerror, "make the folder writable" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else
            "check the disk")
        if run.last_ckpt:
            raise RunFailed(f"{why} writing {path}; last good checkpoint: {run.last_ckpt}; nothing else lost; "
                                f"{fix} and resume from it") from None
        raise RunFailed(f"{why} writing {path}, the run's first checkpoint: its {run.step} steps are lost; "
                            f"{fix} and start again") from None
    run.last_ckpt = path


def export(path, model, ema, config, vae, step, time_s, args):
    """A standalone checkpoint: every tensor and its EMA, no base, no training state."""
    state = model.state_dict()
    save_checkpoint(path, model=state, ema=with_ema(state, ema), base=None, config=config, hierarchy=model.hierarchy,
                    vae=vae, step=step, time_s=time_s, args=args)


def saved_args(args):
    return {k: v for k, v in vars(args).items() if k != "given"}


def log(run, bar):
    """One log line on the console and in <run>/log.jsonl: mean loss since the last line, speed, memory."""
    check_losses(run)
    window, run.logged = run.losses[run.logged:], len(run.losses)
    elapsed, run.clock = max(time.time() - run.clock, 1e-9), time.time()
    record = dict(step=run.step, epoch=run.epoch, time_s=run.time_s(), loss=sum(window) / len(window),
                  steps_per_s=len(window) / elapsed,
                  images_per_s=len(window) * run.args.global_batch_size / elapsed,
                  peak_mem_gb=peak_memory_gb(run.device))
    if run.rank == 0:
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        try:
            append_line(os.path.join(run.run_dir, "log.jsonl"), json.dumps(record))
        except OSError as e:   # a log line is not worth the steps since the last checkpoint: train on
            if not run.log_failed:
                bar.write(f"warning: cannot append to log.jsonl ({e.strerror}); training goes on, logging to the "
                          "console only until it can")
            run.log_failed = True


def check_losses(run):
    """Read the losses of the steps since the last check, averaged over the processes: the loop's only wait for the
    GPU, at log and checkpoint steps. A non-finite one stops the run before anything is saved, so the last
    checkpoint stays the last good state."""
    if not run.window:
        return
    losses = torch.stack(run.window).float()                   # (k,) one per step
    if run.world > 1:
        dist.all_reduce(losses)                               # every rank sees the same values: all stop together
        losses /= run.world
    losses, run.window = losses.tolist(), []
    bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
    if bad is not None:
        kept = (f"the last good checkpoint is {run.last_ckpt}: resume from it" if run.last_ckpt else
                "no checkpoint was written yet: start again")
        raise RunFailed(f"loss is {losses[bad]} at step {run.step - len(losses) + bad + 1}: stopped; {kept} with "
                            "a lower --lr or --precision fp32")
    run.losses += losses


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # Linux reports KiB


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


# ----------------------------------------------------------------------------------------------------------
# Resume: continue a run exactly where one of its checkpoints left off
# ----------------------------------------------------------------------------------------------------------

# Arguments a resumed run takes from its checkpoint unless given again on the command line.
NOT_RESUMED = {"resume", "export", "run_dir", "init", "given"}   # --init on a resume: where its base moved to


# Arguments that fix the model or its data: a resumed run cannot change them (the new value would be ignored,
# yet recorded in its checkpoints). Paths (--data-path, --latent-cache, --vae) may move.
FIXED_ON_RESUME = ("model", "image_size", "tune", "table", "data", "split", "coarse")


def read_resume(args):
    """The checkpoint of --resume (a run folder: its newest); the run's saved arguments become the defaults of the
    ones not given."""
    args.resume = resolve_checkpoint(args.resume)
    ckpt = read_checkpoint(args.resume)
    if "train" not in ckpt:
        raise UserError(f"--resume {args.resume}: not a training checkpoint of this train.py "
                        "(to start from it, use --init)")
    saved = ckpt["args"]
    for k in FIXED_ON_RESUME:
        if k in args.given and getattr(args, k) != saved.get(k):
            raise UserError(f"--{k.replace('_', '-')} {getattr(args, k)}: the resumed run has {saved.get(k)} and "
                            f"cannot change it; leave it out, or start a new run from it with --init {args.resume}")
    for k, v in saved.items():
        if k not in NOT_RESUMED and k not in args.given and hasattr(args, k):
            setattr(args, k, v)
    if not args.export and args.max_steps <= ckpt["step"]:
        raise UserError(f"--max-steps {args.max_steps}: {args.resume} is already at step {ckpt['step']}; "
                        "pass a larger --max-steps to train on")
    return ckpt


def resumed_model(args, ckpt):
    """The run's DiT with its trained (not EMA) tensors; a delta goes onto its base (--init: if it moved)."""
    base = os.path.abspath(resolve_checkpoint(args.init)) if args.init and args.init.lower() != "none" else None
    model, _ = load_model(args.resume, base=base, weights="model", base_flag="--init")
    model.y_embedder.superclass_prob = args.superclass_prob
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
        set_rng_state(state["rng"][run.rank], run.device)
    else:
        say(f"warning: a run of {state['world_size']} processes resumed on {run.world}: the data order and the "
            "noise will not repeat exactly")
    run.step, run.epoch, run.position = ckpt["step"], state["epoch"], state["position"]
    run.time_before = ckpt["time_s"]
    run.last_ckpt = run.args.resume
    say(f"resumed {run.args.resume} at step {run.step} (epoch {run.epoch}, batch {run.position})")


if __name__ == "__main__":
    sys.exit(run_cli(main))

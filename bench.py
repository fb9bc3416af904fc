"""Benchmarks: what parameter-efficient fine-tuning buys (paper Table 2), and where time goes.

    python bench.py                    # CPU: DiT-S/2 at 256 px (32x32 latents), batch 8; ~10 minutes
    python bench.py --quick            # seconds: tiny models, for the test suite
    python bench.py --device cuda --precision bf16 --model DiT-XL/2   # on a GPU: the paper's model
    python bench.py --sample-model DiT-XL/2 --sample-batches 2        # CPU seconds per DDPM step of XL
    python bench.py --only samplers --sample-model DiT-XL/2 --repeats 3 --warmup 1   # each sampler's cost at XL

It prints one table and writes JSON (--out, default results/bench.json):
  train     seconds per training step and peak training memory for full / BitFit / DiffFit / FineDiffusion,
            each method's speed-up over full fine-tuning (paper: FineDiffusion 1.56x) and memory ratio.
  data      end-to-end training images/s reading the VAE-latent cache against encoding with the VAE each step.
  sampling  seconds per DDPM step with CFG at forward batch 2, 8, 32 (batch 2 = one image and its guide),
            and DDIM-50 and DPM-Solver++(2M)-20 against DDPM-250 wall time.
  decode    seconds per image of the SD VAE decode in fp32 (what every command does, whatever --precision) and under the
            autocast of --precision: what decoding in fp32 costs.
  samplers  seconds per image of DDPM-250, DDIM-50 and DPM-Solver++(2M) at 10/15/20/25 steps, with guidance at
            every step and in --guidance-interval: DiT evaluations per image, speed-up against DDPM-250, hours
            for Table 1's 100K images on this machine. Projected from timed steps (see bench_samplers).
  fid       FID Inception feature extraction, images/s.
Every figure is the median of --repeats runs after --warmup runs; ratios compare figures of the same run.
Training memory on a CPU is the peak resident set of a fresh process minus its size before the model was
built (weights, gradients, optimizer state and activations); on CUDA, torch.cuda.max_memory_allocated.

    python bench.py --gpu-check        # one CUDA GPU, at most 8 minutes; never in CI

checks that DiT-XL/2 trains and samples on a GPU as the paper runs it, on random weights in the published layouts
(nothing is downloaded). Each part runs in a fresh process, in this order, within a 470-s budget; a part the
budget leaves out says so. A line on stderr as each part ends, and results/gpu-check.json (--out) written again,
so a check stopped early keeps what it measured; the table at the end.
  training  DiT-XL/2 at 256 px, FineDiffusion and full fine-tuning: the largest batch of 32, 64, 128, ... that fits
            (bf16), and at it the s/step, images/s, peak memory and model FLOPs utilisation (MFU) of bf16, of fp16
            with GradScaler loss scaling (10 steps, every loss finite), and, last, of bf16 with torch.compile.
            Model FLOPs of a step: the forward, 237.2 GFLOP an image (the DiT paper's Table 4 gives 118.6 "Gflops":
            multiply-adds, 2 FLOPs each), and the backward, 2x the forward for full fine-tuning (input and weight
            gradients), 1x for FineDiffusion (frozen weights need no weight gradient). MFU divides them by the
            GPU's dense bf16 peak: from a table of datasheets (PEAK_TFLOPS), or --peak-tflops.
  sampling  one image of the authors' FineDiffusion layout (iNat21: 10,000 classes, 11 superclasses) with
            fine-grained guidance, DPM-Solver++(2M) in 20 steps, decoded by the SD VAE, bf16: seconds, warm and cold.
  ddp       with 2 GPUs, 2 processes under torchrun (nccl), set up as train.py sets them up, 2 FineDiffusion steps
            on different batches: the tuned weights must come out identical on both; skipped with one GPU.
It takes --device cuda:N, --out and --peak-tflops, and refuses other flags; without CUDA it says so and exits 2.
"""
import gc
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import train
from diffusion import create_diffusion
from fid_inception import FIDInceptionV3, inception_features
from cli import (ArgumentParser, RunFailed, UserError, device_name, int_in, nonnegative_int, out_file, positive_float,
                 positive_int, precision_context, run_cli)
from files import write_json
from hierarchy import make_hierarchy
from model import METHODS, DiT_models, build_model, check_image_size, set_trainable
from vae import AutoencoderKL
from sample import CFG_SCALE, Sampler, guide_labels, sample_images

HERE = os.path.dirname(os.path.abspath(__file__))


def median_seconds(fn, repeats, warmup, sync=lambda: None):
    """Median wall time of fn() over `repeats` runs after `warmup` runs."""
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def cuda_sync(device):
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB -> MiB (a high-water mark)


# ----------------------------------------------------------------------------------------------------------
# Training steps, one tuning method per fresh process (so each peak memory is its own)
# ----------------------------------------------------------------------------------------------------------

CLASSES, SUPERCLASSES = 1000, 10        # the label table of the timed DiTs (its size hardly changes the cost)


def dealt_hierarchy(K, S):
    """K classes dealt round-robin into S superclasses: the cost does not depend on which class is where."""
    return make_hierarchy(range(K), range(S), [c % S for c in range(K)])


def trainer(model_name, image_size, batch, method, device, precision, compile=False, world=1):
    """(model, step): a DiT set up for `method` and one training step as train.py runs it (train.train_step),
    step(x, y) -> the loss (a 0-dim tensor), on a random batch of `batch` made here unless given another.
    world > 1 (under torchrun): the DiT wrapped in DDP, as train.py wraps it."""
    device = torch.device(device)
    with device:                        # built where it trains: DiT-XL/2 initialises in a second on a GPU
        model = build_model(model_name, image_size, CLASSES, SUPERCLASSES, method,
                            hierarchy=dealt_hierarchy(CLASSES, SUPERCLASSES)).train()
    set_trainable(model, method)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    net = torch.compile(net) if compile else net
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0)
    autocast, scaler = train.setup_precision(precision, device)
    diffusion = create_diffusion()
    x = torch.randn(batch, model.in_channels, image_size // 8, image_size // 8, device=device)
    y = torch.randint(0, CLASSES, (batch,), device=device)
    return model, lambda x=x, y=y: train.train_step(net, diffusion, opt, scaler, x, y, autocast)


def gpu_of(device):
    """{"gpu": its name and memory} for a CUDA device (what --gpu-check's table and peak FLOP/s go by), else {}."""
    if torch.device(device).type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    return dict(gpu=f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB")


def train_worker(args):
    """Runs in a fresh process: prints {"seconds_per_step", "peak_memory_mb", "losses"} for one method (the loss
    of every step, warm-up included; a non-finite one fails it)."""
    torch.manual_seed(0)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = rss_mb()
    _, step = trainer(args.model, args.image_size, args.batch, args.method, args.device, args.precision, args.compile)
    losses = []
    seconds = median_seconds(lambda: losses.append(step()), args.repeats, args.warmup, cuda_sync(args.device))
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if args.device.startswith("cuda") else rss_mb() - before
    print(json.dumps(dict(seconds_per_step=seconds, peak_memory_mb=peak, losses=read_losses(losses),
                          **gpu_of(args.device))))


def read_losses(losses):
    """train_step's losses (0-dim tensors on the device) as floats; a non-finite one fails the measurement, as it
    stops train.py."""
    losses = torch.stack(losses).float().tolist()
    bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
    if bad is not None:
        raise RunFailed(f"loss is {losses[bad]} at step {bad + 1} of {len(losses)}")
    return losses


def run_worker(what, argv, timeout=None, launcher=()):
    """`python [launcher] bench.py argv` (a --worker) in a fresh process: the JSON it prints last. A failure, or
    running past `timeout` seconds, is a UserError naming `what`."""
    cmd = [sys.executable, *launcher, os.path.join(HERE, "bench.py"), *map(str, argv)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException as e:       # out of time, or Ctrl-C: the worker goes, and what it started
            proc.terminate()             # SIGTERM: torchrun then stops its ranks (each in a session of its own)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if isinstance(e, subprocess.TimeoutExpired):
                raise UserError(f"{what} was stopped after {timeout:.0f} s, when the time budget ran out") from None
            raise
    if proc.returncode != 0:
        lines = err.strip().splitlines() or [f"exit code {proc.returncode}"]
        said = [line for line in lines if line.startswith("error: ")]     # run_cli's line, under torchrun's own
        raise UserError(f"{what} failed: {(said or lines)[-1]}")
    return json.loads(out.strip().splitlines()[-1])


def bench_train(args):
    results = {}
    for method in METHODS:
        results[method] = run_worker(
            f"the {method} training benchmark",
            ["--worker", "train", "--method", method, "--model", args.model, "--image-size", args.image_size,
             "--batch", args.batch, "--device", args.device, "--precision", args.precision, "--repeats",
             args.repeats, "--warmup", args.warmup] + (["--compile"] if args.compile else []))
    full = results["full"]
    for r in results.values():
        r["speedup_vs_full"] = full["seconds_per_step"] / r["seconds_per_step"]
        r["memory_vs_full"] = r["peak_memory_mb"] / full["peak_memory_mb"]
    return results


# ----------------------------------------------------------------------------------------------------------
# Data: the latent cache against encoding with the VAE every step
# ----------------------------------------------------------------------------------------------------------

def bench_data(args, vae_config):
    torch.manual_seed(0)
    device = args.device
    vae = AutoencoderKL(**vae_config).to(device).eval()          # random weights: the cost is the same
    images = data.ToyDataset(image_size=args.image_size, images_per_class=max(1, args.batch // 16 + 1), flip=False)
    _, step = trainer(args.model, args.image_size, args.batch, "finediffusion", device, args.precision)
    x, y = next(iter(torch.utils.data.DataLoader(images, batch_size=args.batch)))
    x, y = x.to(device), y.to(device)

    def encode_every_step():
        with torch.no_grad():
            z = train.encode(vae, x)
        step(z, y)

    with tempfile.TemporaryDirectory() as cache_dir:
        data.build_latent_cache(images, vae, cache_dir, batch_size=args.batch, num_workers=0, device=device,
                                progress=False)
        cache = data.LatentCacheDataset(cache_dir)
        batches = iter(torch.utils.data.DataLoader(cache, batch_size=args.batch, shuffle=True, drop_last=True))

        def from_cache():
            nonlocal batches
            try:
                z, labels = next(batches)
            except StopIteration:
                batches = iter(torch.utils.data.DataLoader(cache, batch_size=args.batch, shuffle=True, drop_last=True))
                z, labels = next(batches)
            step(z.to(device), labels.to(device))

        sync = cuda_sync(device)
        cached = args.batch / median_seconds(from_cache, args.repeats, args.warmup, sync)
        encoded = args.batch / median_seconds(encode_every_step, args.repeats, args.warmup, sync)
    return dict(cache_images_per_s=cached, vae_images_per_s=encoded, cache_speedup=cached / encoded)


# ----------------------------------------------------------------------------------------------------------
# Sampling and FID features
# ----------------------------------------------------------------------------------------------------------

def sampling_dit(args, K=1000, S=10):
    """A FineDiffusion-layout DiT of --sample-model (random weights: the cost is the same) and its autocast."""
    torch.manual_seed(0)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision)
    with torch.device(args.device):     # built where it runs: DiT-XL/2 initialises in a second on a GPU
        model = DiT_models[args.sample_model](input_size=args.image_size // 8, num_classes=K, num_superclasses=S,
                                              hierarchy=dealt_hierarchy(K, S), null_class=False,
                                              norm_affine=True).eval()
    return model, torch.autocast(torch.device(args.device).type, dtype=dtype) if dtype else nullcontext()


def bench_sampling(args):
    device, K = args.device, 1000
    model, autocast = sampling_dit(args, K)
    sync = cuda_sync(device)

    def cfg_model(x, t, **kw):
        with autocast:
            return model.forward_with_cfg(x, t, **kw).float()

    def one_step(diffusion, batch):
        half = batch // 2
        x = torch.randn(batch, 4, args.image_size // 8, args.image_size // 8, device=device)
        y = torch.randint(0, K, (half,), device=device)
        kw = dict(y=torch.cat([y, model.y_embedder.superclass_ids(y)]), cfg_scale=4.0)
        t = torch.full((batch,), diffusion.num_timesteps - 1, device=device)
        return lambda: diffusion.p_sample(cfg_model, x, t, model_kwargs=kw)

    results = {"model": args.sample_model, "seconds_per_ddpm_step": {}}
    ddpm = create_diffusion("250")
    with torch.no_grad():
        for batch in args.sample_batches:
            results["seconds_per_ddpm_step"][str(batch)] = median_seconds(one_step(ddpm, batch), args.repeats, 1, sync)
        if args.loops:
            shape = (2, 4, args.image_size // 8, args.image_size // 8)
            kw = dict(y=torch.tensor([1, 10 + 1], device=device), cfg_scale=4.0)
            ddim, full = create_diffusion("ddim50"), create_diffusion()
            loops = dict(ddpm250=lambda: ddpm.p_sample_loop(cfg_model, shape, model_kwargs=kw, device=device),
                         ddim50=lambda: ddim.ddim_sample_loop(cfg_model, shape, model_kwargs=kw, device=device),
                         dpm20=lambda: full.dpm_solver_sample_loop(cfg_model, shape, steps=20, model_kwargs=kw,
                                                                   device=device))
            for name, fn in loops.items():
                results[f"{name}_seconds"] = median_seconds(fn, args.loop_repeats, 0, sync)
            results["ddim50_speedup"] = results["ddpm250_seconds"] / results["ddim50_seconds"]
            results["dpm20_speedup"] = results["ddpm250_seconds"] / results["dpm20_seconds"]
    return results


SAMPLER_RUNS = [("ddpm", 250), ("ddim", 50), ("dpm++2m", 10), ("dpm++2m", 15), ("dpm++2m", 20), ("dpm++2m", 25)]
TABLE1_IMAGES = 100_000        # paper §4.3: the images behind each FID of Table 1


def bench_samplers(args, vae_config):
    """Seconds per image of each sampler, guided at every step (the paper) and in --guidance-interval.

    Projected, not run end to end (DDPM-250 of DiT-XL/2 takes about 16 CPU minutes per image): the DiT on
    [x_t; x_t] (a guided step) and on x_t alone (a step outside the interval) is timed, median of --repeats
    runs; the sampler's own arithmetic is timed by running its loop with a network that costs nothing; the VAE
    decode once per batch. An image costs its steps' network times plus those two."""
    device, sync, n = args.device, cuda_sync(args.device), args.sampler_images
    model, autocast = sampling_dit(args)
    x = torch.randn(2 * n, 4, args.image_size // 8, args.image_size // 8, device=device)    # [x_t; x_t]
    y = torch.randint(0, 1000, (n,), device=device)
    y = torch.cat([y, model.y_embedder.superclass_ids(y)])
    t = torch.full((2 * n,), 500, device=device)
    vae = AutoencoderKL(**vae_config).to(device).eval()          # random weights: the cost is the same
    with torch.no_grad(), autocast:
        guided = median_seconds(lambda: model.forward_with_cfg(x, t, y, 4.0), args.repeats, args.warmup, sync)
        conditional = median_seconds(lambda: model(x[:n], t[:n], y[:n]), args.repeats, args.warmup, sync)
        decode = median_seconds(lambda: vae.decode(x[:n]), args.repeats, 1, sync)
    free = lambda x, t, **kw: torch.zeros(len(x), 8, *x.shape[2:], device=x.device)  # eps and sigma channels
    lo, hi = args.guidance_interval
    runs = []
    for sampler, steps in SAMPLER_RUNS:
        loop = Sampler(sampler, steps).loop()
        arithmetic = median_seconds(lambda: loop(free, x.shape, x.clone(), device=device), 1, 0, sync)
        for interval in (None, [lo, hi]):
            inside = Sampler(sampler, steps, interval).guided_steps
            seconds = (inside * guided + (steps - inside) * conditional + arithmetic + decode) / n
            runs.append(dict(sampler=sampler, steps=steps, guidance_interval=interval, guided_steps=inside,
                             evaluations_per_image=2 * inside + (steps - inside), seconds_per_image=seconds,
                             speedup_vs_ddpm250=runs[0]["seconds_per_image"] / seconds if runs else 1.0,
                             hours_per_100k=seconds * TABLE1_IMAGES / 3600))
    return dict(model=args.sample_model, image_size=args.image_size, images_per_batch=n, guidance_interval=[lo, hi],
                seconds_per_guided_step=guided, seconds_per_conditional_step=conditional,
                decode_seconds_per_batch=decode, runs=runs)


def bench_decode(args, vae_config):
    """The SD VAE decode of one batch of --batch latents: in fp32, as every command decodes whatever --precision the DiT
    samples in (an fp16 decoder overflows), against the autocast of --precision, the cost that fp32 adds."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_config).to(args.device).eval()      # random weights: the cost is the same
    z = torch.randn(args.batch, 4, args.image_size // 8, args.image_size // 8, device=args.device)
    sync, autocast = cuda_sync(args.device), precision_context(args.precision, torch.device(args.device).type)

    def decode(low_precision):
        with torch.no_grad(), (autocast if low_precision else nullcontext()):
            vae.decode(z)
    fp32, low = (median_seconds(lambda: decode(low), args.repeats, 1, sync) for low in (False, True))
    return dict(batch=args.batch, fp32_seconds_per_image=fp32 / args.batch, precision=args.precision,
                precision_seconds_per_image=low / args.batch, fp32_cost=fp32 / low)


def bench_fid(args):
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()                               # random weights: the cost is the same
    images = torch.rand(args.fid_batch, 3, args.fid_size, args.fid_size)
    run = lambda: inception_features(model, images, args.device, batch_size=args.fid_batch, progress=False)
    return dict(images_per_s=args.fid_batch / median_seconds(run, args.repeats, 1, cuda_sync(args.device)),
                batch=args.fid_batch, image_size=args.fid_size)


# ----------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------

def samplers_report(s, device):
    lo, hi = s["guidance_interval"]
    lines = [f"samplers: {s['model']} at {s['image_size']} px on {device}, {s['images_per_batch']} image(s) per batch "
             f"with the guide half; projected from timed steps, not run end to end:",
             f"  guided step {s['seconds_per_guided_step']:.3f} s, conditional-half step "
             f"{s['seconds_per_conditional_step']:.3f} s, VAE decode {s['decode_seconds_per_batch']:.3f} s per batch",
             f"  {'sampler':<9}{'steps':>6}  {'guided steps':<20}{'DiT evals/image':>16}{'s/image':>10}{'speed-up':>10}"
             f"{'h per 100K':>12}"]
    for r in s["runs"]:
        where = "all" if r["guidance_interval"] is None else f"{r['guided_steps']}, t in [{lo}, {hi}]"
        lines.append(f"  {r['sampler']:<9}{r['steps']:>6}  {where:<20}{r['evaluations_per_image']:>16}"
                     f"{r['seconds_per_image']:>10.2f}{r['speedup_vs_ddpm250']:>9.1f}x{r['hours_per_100k']:>12.1f}")
    return lines


def report(results):
    lines = [f"device {results['device']}, precision {results['precision']}, threads {results['threads']}"
             + (", torch.compile" if results["compile"] else "")]
    if "train" in results:
        lines += [f"training step: {results['model']} at {results['image_size']} px, batch {results['batch']}",
                  f"  {'method':<15}{'s/step':>9}{'speed-up':>10}{'peak MiB':>10}{'memory':>8}"]
        for method, r in results["train"].items():
            lines.append(f"  {method:<15}{r['seconds_per_step']:>9.3f}{r['speedup_vs_full']:>9.2f}x"
                         f"{r['peak_memory_mb']:>10.0f}{r['memory_vs_full']:>7.2f}x")
    if "data" in results:
        d = results["data"]
        lines.append(f"training images/s: latent cache {d['cache_images_per_s']:.1f}, VAE every step "
                     f"{d['vae_images_per_s']:.2f} -> {d['cache_speedup']:.1f}x")
    if "sampling" in results:
        s = results["sampling"]
        steps = ", ".join(f"batch {b}: {v:.3f}" for b, v in s["seconds_per_ddpm_step"].items())
        lines.append(f"sampling {s['model']} s per DDPM step with CFG: {steps}")
        if "ddim50_speedup" in s:
            lines.append(f"  batch 2 wall time: DDPM-250 {s['ddpm250_seconds']:.1f} s, DDIM-50 "
                         f"{s['ddim50_seconds']:.1f} s -> {s['ddim50_speedup']:.1f}x, DPM++(2M)-20 "
                         f"{s['dpm20_seconds']:.1f} s -> {s['dpm20_speedup']:.1f}x")
    if "samplers" in results:
        lines += samplers_report(results["samplers"], results["device"])
    if "decode" in results:
        d = results["decode"]
        lines.append(f"SD VAE decode, s per image (batch {d['batch']}): fp32 {d['fp32_seconds_per_image']:.3f} (every "
                     f"command's), {d['precision']} autocast {d['precision_seconds_per_image']:.3f} -> fp32 costs "
                     f"{d['fp32_cost']:.2f}x")
    if "fid" in results:
        f = results["fid"]
        lines.append(f"FID Inception features: {f['images_per_s']:.1f} images/s ({f['image_size']} px, batch {f['batch']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# --gpu-check: DiT-XL/2 on one CUDA GPU as the paper trains and samples it, within 8 minutes
# ----------------------------------------------------------------------------------------------------------

# DiT paper (Peebles & Xie, ICCV 2023), Table 4: a forward pass of DiT-XL/2 at 256 px is "118.6 Gflops". Those are
# multiply-adds (28 blocks x (12 T d^2 + 2 T^2 d + 6 d^2) with T = 256 tokens, d = 1152 gives 118.6 G; torch's
# FlopCounterMode counts 237.2 GFLOP), and a GPU's peak counts a multiply-add as 2 FLOPs.
XL2_FORWARD_FLOPS = 2 * 118.6e9
BACKWARD_PER_FORWARD = {"full": 2, "finediffusion": 1}   # input and weight gradients; input gradients only
CHECKED = ("finediffusion", "full")
TORCHRUN_2 = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]   # 2 processes on this machine

GPU_CHECK = dict(
    model="DiT-XL/2", image_size=256, forward_flops=XL2_FORWARD_FLOPS,
    first_batch=32, max_batch=2048,          # the batch search: 32, 64, 128, ... until one does not fit
    repeats=5, warmup=2, fp16_steps=10,      # timed steps (their median) after warm-up steps (compiling, with it)
    compile=True, ddp_batch=8, ddp_steps=2,
    budget_seconds=470)                      # all parts together: 8 minutes with this process's own start-up

# Dense (no sparsity) bf16 = fp16 tensor-core TFLOP/s with fp32 accumulation, from the vendors' datasheets. The first
# name found as a whole word in the device's name wins: "H100 PCIe" before "H100"; "L4" does not match "L40S".
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200 NVL", 835), ("H200", 989),
               ("A100", 312), ("L4", 121), ("RTX 4090", 165)]


def peak_tflops(gpu, given=None):
    """The device's dense bf16/fp16 peak in TFLOP/s: `given` (--peak-tflops), else the datasheet's; None: unknown."""
    if given:
        return given
    return next((peak for name, peak in PEAK_TFLOPS if re.search(rf"\b{re.escape(name)}\b", gpu or "")), None)


def step_flops(method, batch, forward_flops):
    """FLOPs one training step needs: the forward pass, and a backward pass of twice its work in full fine-tuning
    (the input and the weight gradient of every matrix multiply) or of once its work in FineDiffusion (input
    gradients only: frozen weights need no weight gradient, and those of biases and norms are negligible)."""
    return batch * forward_flops * (1 + BACKWARD_PER_FORWARD[method])


def throughput(run, forward_flops, peak):
    """A timed run's images/s, model TFLOP/s and model FLOPs utilisation (mfu: None when the peak is unknown)."""
    flops = step_flops(run["method"], run["batch"], forward_flops)
    tflops = flops / run["seconds_per_step"] / 1e12
    return dict(images_per_s=run["batch"] / run["seconds_per_step"], step_tflop=flops / 1e12, tflops=tflops,
                peak_tflops=peak, mfu=tflops / peak if peak else None)


def fits_in_memory(step, batch):
    """Does step(batch) run without the GPU running out of memory? (Any other error is raised.)"""
    try:
        step(batch)
        return True
    except torch.OutOfMemoryError:
        pass
    gc.collect()                # out of the except block, the error's traceback no longer holds the step's tensors
    torch.cuda.empty_cache()
    return False


def largest_batch(fits, first, most):
    """The largest batch that fits: `first`, then doubling (up to `most`) while the next one fits, or, if `first`
    does not fit, halving until one does. -> (batch, or None if not even 1 fits; [[batch, fits], ...] as tried)."""
    tried = []

    def fit(batch):
        tried.append([batch, fits(batch)])
        return tried[-1][1]

    batch = first
    if fit(batch):
        while 2 * batch <= most and fit(2 * batch):
            batch *= 2
        return batch, tried
    while batch > 1:
        batch //= 2
        if fit(batch):
            return batch, tried
    return None, tried


def batch_worker(args):
    """Runs in a fresh process: prints {"batch", "tried"}: the largest batch of --method's training step that fits
    in memory, searched from --batch up to --max-batch."""
    torch.manual_seed(0)
    model, step = trainer(args.model, args.image_size, args.batch, args.method, args.device, args.precision)
    side = args.image_size // 8

    def step_at(batch):         # AdamW's state, made by the first step that fits, counts in every later one
        step(torch.randn(batch, model.in_channels, side, side, device=args.device),
             torch.randint(0, CLASSES, (batch,), device=args.device))

    batch, tried = largest_batch(lambda b: fits_in_memory(step_at, b), args.batch, args.max_batch)
    if batch is None:
        raise UserError(f"a {args.method} training step of {args.model} does not fit in memory even at batch 1")
    print(json.dumps(dict(batch=batch, tried=tried, **gpu_of(args.device))))


def sample_worker(args):
    """Runs in a fresh process: prints the seconds of one image of --model in the authors' FineDiffusion layout
    (iNat21: 10,000 classes, 11 superclasses) sampled as sample.py samples it, with fine-grained guidance, by
    DPM-Solver++(2M) in 20 steps, decoded by the SD VAE; random weights, the first run (set-up) timed apart."""
    model, _ = sampling_dit(args, K=10_000, S=11)
    with torch.device(args.device):
        vae = AutoencoderKL().eval()            # the SD VAE's layout: its default config
    y, sampler, images = [4021], Sampler("dpm++2m", 20), []
    guide = guide_labels(model, y, "superclass")            # eq. 1: each class's superclass row
    run = lambda: images.append(sample_images(model, y, guide, CFG_SCALE, sampler, vae, device=args.device,
                                              precision=args.precision, progress=False))
    sync = cuda_sync(args.device)
    first = median_seconds(run, 1, 0, sync)
    print(json.dumps(dict(seconds=median_seconds(run, 1, 0, sync), first_seconds=first, **sampler.record(),
                          cfg_scale=CFG_SCALE, precision=args.precision, shape=list(images[-1].shape),
                          **gpu_of(args.device))))


def spread(t):
    """Over the ranks of the process group: the largest difference between two ranks' values of an element of t
    (0: every rank holds the same t)."""
    hi, lo = t.clone(), t.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return (hi - lo).max().item()


def ddp_worker(args):
    """Runs as each of torchrun's processes: --repeats training steps of --method under DDP, set up as train.py
    sets it up (data.init_distributed: nccl on CUDA, gloo on a CPU), each rank on its own batch. DDP averages the
    gradients, so afterwards the tuned weights must have moved and be identical on every rank: rank 0 prints it."""
    rank, world, device = data.init_distributed(args.device)
    try:
        torch.manual_seed(0)                    # DDP hands rank 0's weights to every rank anyway
        model, step = trainer(args.model, args.image_size, args.batch, args.method, device, args.precision, world=world)
        tuned = lambda: torch.cat([p.detach().flatten().float() for p in model.parameters() if p.requires_grad])
        start = tuned()
        torch.manual_seed(1 + rank)             # each rank its own batch, timesteps and noise, as in train.py
        x = torch.randn(args.batch, model.in_channels, model.input_size, model.input_size, device=device)
        y = torch.randint(0, CLASSES, (args.batch,), device=device)
        losses = read_losses([step(x, y) for _ in range(args.repeats)])
        weights = tuned()
        result = dict(processes=world, backend=dist.get_backend(), method=args.method, steps=len(losses),
                      losses=losses, input_spread=spread(x), weight_spread=spread(weights),
                      moved=(weights - start).abs().max().item(), **gpu_of(device))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    result["ok"] = result["weight_spread"] == 0 and result["input_spread"] > 0 and result["moved"] > 0
    if rank == 0:
        print(json.dumps(result))


def gpu_check(args, plan=GPU_CHECK):
    """--gpu-check: the plan's parts in order, each in a fresh process (its own peak memory), while
    plan["budget_seconds"] lasts (a part it leaves out says so). After each part a line on stderr and the JSON
    written again, so a check stopped early keeps what it measured; the table at the end."""
    clock = time.monotonic()
    results = dict(check="gpu", device=args.device, gpu=None, torch=torch.__version__, plan=plan,
                   peak_tflops=args.peak_tflops, seconds=0.0, search={}, runs=[], sample=None, ddp=None)
    common = ["--model", plan["model"], "--image-size", plan["image_size"], "--device", args.device]
    print(f"gpu-check: {plan['model']} at {plan['image_size']} px on {args.device}, within {plan['budget_seconds']} s; "
          f"{args.out} is written after each part", file=sys.stderr, flush=True)

    def attempt(what, argv, launcher=()):
        left = plan["budget_seconds"] - (time.monotonic() - clock)
        if left <= 0:
            return dict(skipped="the time budget was spent")
        try:
            outcome = run_worker(what, argv, left, launcher)
        except UserError as e:
            return dict(error=str(e))
        results["gpu"] = outcome.pop("gpu", results["gpu"])
        return outcome

    def done(line):
        results["seconds"] = time.monotonic() - clock
        write_json(args.out, results)
        print(f"gpu-check {results['seconds']:4.0f} s: {line.strip()}", file=sys.stderr, flush=True)

    def search(method):
        results["search"][method] = attempt(f"the {method} batch search", [
            "--worker", "batch", "--method", method, *common, "--precision", "bf16", "--batch", plan["first_batch"],
            "--max-batch", plan["max_batch"]])
        done(search_line(method, results["search"][method]))

    def timed(method, precision, compile, repeats):
        run = dict(method=method, precision=precision, compile=compile, batch=results["search"][method].get("batch"))
        if run["batch"] is None:
            run["skipped"] = "no batch: its search did not finish"
        else:
            run.update(attempt(f"the {method} {precision} training steps", [
                "--worker", "train", "--method", method, *common, "--precision", precision, "--batch", run["batch"],
                "--repeats", repeats, "--warmup", plan["warmup"]] + (["--compile"] if compile else [])))
        if "seconds_per_step" in run:
            run.update(throughput(run, plan["forward_flops"], peak_tflops(results["gpu"], args.peak_tflops)))
        results["runs"].append(run)
        done(run_line(run))

    for method in CHECKED:
        search(method)
        timed(method, "bf16", False, plan["repeats"])
    for method in CHECKED:
        timed(method, "fp16", False, plan["fp16_steps"] - plan["warmup"])
    results["sample"] = attempt("the sampling check", ["--worker", "sample", *common, "--precision", "bf16"])
    done(sample_line(results["sample"]))
    results["ddp"] = ddp_check(args, plan, attempt)
    done(ddp_line(results["ddp"]))
    if plan["compile"]:
        for method in CHECKED:
            timed(method, "bf16", True, plan["repeats"])
    print(gpu_check_report(results))
    print(f"wrote {args.out}")
    return results


def ddp_check(args, plan, attempt):
    """The DDP smoke test: 2 processes under torchrun on 2 GPUs (nccl), or on the CPU (gloo) when the check runs
    there; skipped with one GPU."""
    kind = torch.device(args.device).type
    if kind == "cuda" and torch.cuda.device_count() < 2:
        return dict(skipped=f"{torch.cuda.device_count()} GPU visible, the test needs 2")
    return attempt("the DDP smoke test", [
        "--worker", "ddp", "--method", "finediffusion", "--model", plan["model"], "--image-size", plan["image_size"],
        "--device", kind, "--precision", "bf16", "--batch", plan["ddp_batch"], "--repeats", plan["ddp_steps"]],
        launcher=TORCHRUN_2)


def not_done(outcome):
    return outcome["error"] if "error" in outcome else f"skipped: {outcome['skipped']}"


def run_line(r):
    """A training row of the --gpu-check table."""
    precision = "fp16+scaler" if r["precision"] == "fp16" else r["precision"]
    head = f"  {r['method']:<15}{precision:<13}{'on' if r['compile'] else 'off':<9}{r['batch'] or '-':>6}"
    if "seconds_per_step" not in r:
        return f"{head}  {not_done(r)}"
    mfu = "?" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return (f"{head}{r['seconds_per_step']:>9.3f}{r['images_per_s']:>10.1f}{r['peak_memory_mb'] / 1024:>10.1f}"
            f"{r['tflops']:>9.1f}{mfu:>7}{r['losses'][-1]:>9.4f}")


def search_line(method, s):
    if "batch" not in s:
        return f"  largest batch of {method}: {not_done(s)}"
    tried = ", ".join(str(b) if ok else f"{b} out of memory" for b, ok in s["tried"])
    return f"  largest batch of {method}: {s['batch']} (tried {tried})"


def sample_line(s):
    if "seconds" not in s:
        return f"sampling: {not_done(s)}"
    sampler = "DPM-Solver++(2M)" if s["sampler"] == "dpm++2m" else s["sampler"]
    return (f"sampling: one {s['shape'][1]}x{s['shape'][2]} image, fine-grained guidance {s['cfg_scale']:g}, "
            f"{sampler} in {s['steps']} steps, SD VAE decode, {s['precision']}: {s['seconds']:.2f} s "
            f"({s['first_seconds']:.2f} s the first time)")


def ddp_line(d):
    if "ok" not in d:
        return f"DDP smoke test: {not_done(d)}"
    return (f"DDP smoke test: {d['processes']} processes ({d['backend']}), {d['steps']} {d['method']} steps on "
            f"different batches: tuned weights moved (up to {d['moved']:.1e}), largest difference between ranks "
            f"{d['weight_spread']:g}: {'ok' if d['ok'] else 'FAILED'}")


def gpu_check_report(results):
    plan = results["plan"]
    peak = peak_tflops(results["gpu"], results["peak_tflops"])
    source = "--peak-tflops" if results["peak_tflops"] else "datasheet, dense bf16/fp16"
    mfu = f"MFU against {peak:g} TFLOP/s ({source})" if peak else "MFU: peak unknown for this GPU (give --peak-tflops)"
    return "\n".join([
        f"gpu-check on {results['gpu'] or results['device']}, torch {results['torch']}, {results['seconds']:.0f} s: "
        f"{plan['model']} at {plan['image_size']} px, random weights in the published layouts",
        f"training steps at the largest batch that fits; a forward pass is {plan['forward_flops'] / 1e9:.1f} GFLOP an "
        f"image, the backward 2x that for full, 1x for finediffusion; {mfu}",
        "fp16+scaler: fp16 autocast with GradScaler loss scaling, every step's loss finite (the last one shown)",
        f"  {'method':<15}{'precision':<13}{'compile':<9}{'batch':>6}{'s/step':>9}{'images/s':>10}{'peak GiB':>10}"
        f"{'TFLOP/s':>9}{'MFU':>7}{'loss':>9}",
        *map(run_line, results["runs"]),
        *(search_line(method, s) for method, s in results["search"].items()),
        sample_line(results["sample"]), ddp_line(results["ddp"])])


WORKERS = dict(train=train_worker, batch=batch_worker, sample=sample_worker, ddp=ddp_worker)


def check_gpu_check_flags(parser, args, given):
    """--gpu-check runs a fixed plan: a flag it would ignore is refused, in one line."""
    flag = {action.dest: action.option_strings[0] for action in parser._actions}
    ignored = [flag[dest] for dest in given if dest not in ("gpu_check", "device", "out", "peak_tflops")]
    if ignored:
        raise UserError(f"--gpu-check runs a fixed plan ({GPU_CHECK['model']} at {GPU_CHECK['image_size']} px, bf16 "
                        f"and fp16): {', '.join(ignored)} would not apply; it takes --device, --out and --peak-tflops")
    if "device" in given and torch.device(args.device).type != "cuda":
        raise UserError(f"--gpu-check runs on a CUDA GPU, not --device {args.device}")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models and few repeats (seconds; for tests)")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "tf32", "fp16", "bf16"], default="fp32")
    p.add_argument("--model", default="DiT-S/2", help="DiT of the training benchmarks")
    p.add_argument("--image-size", type=positive_int, default=256, help="pixels (latents are 8x smaller)")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--sample-model", default=None, help="DiT of the sampling benchmark (default: --model)")
    p.add_argument("--sample-batches", type=int_in(2), nargs="+", default=[2, 8, 32],
                   help="forward batches: half images, half their guides")
    p.add_argument("--no-loops", dest="loops", action="store_false",
                   help="skip DDPM-250 / DDIM-50 / DPM++(2M)-20 wall times")
    p.add_argument("--sampler-images", type=positive_int, default=1, help="images per batch of the samplers part (CPU: 1)")
    p.add_argument("--guidance-interval", type=int, nargs=2, default=[200, 700], metavar=("LO", "HI"),
                   help="the samplers part's guidance interval (an example: sigma_t 0.72 ... 12; what it saves "
                        "is the share of steps outside it)")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT in the training benchmark")
    p.add_argument("--repeats", type=positive_int, default=7)
    p.add_argument("--warmup", type=nonnegative_int, default=3)
    p.add_argument("--loop-repeats", type=positive_int, default=3)
    p.add_argument("--only", nargs="+", choices=["train", "data", "sampling", "samplers", "decode", "fid"],
                   default=["train", "data", "sampling", "samplers", "decode", "fid"], help="run only these parts")
    p.add_argument("--gpu-check", action="store_true",
                   help="DiT-XL/2 on one CUDA GPU in about 8 minutes (see above); takes only --device, --out and "
                        "--peak-tflops")
    p.add_argument("--peak-tflops", type=positive_float,
                   help="the GPU's dense bf16 peak, for --gpu-check's MFU (default: from a table of datasheets)")
    p.add_argument("--out", type=out_file, help="default: results/bench.json; with --gpu-check, results/gpu-check.json")
    p.add_argument("--worker", choices=list(WORKERS), help="(internal: one measurement in a fresh process)")
    p.add_argument("--method", choices=METHODS, help="(internal: the method of --worker train, batch or ddp)")
    p.add_argument("--max-batch", type=positive_int, help="(internal: --worker batch searches up to it)")
    args, given = p.parse_given(argv)
    if args.gpu_check:
        check_gpu_check_flags(p, args, given)
    elif "peak_tflops" in given:
        raise UserError("--peak-tflops is for --gpu-check")
    args.out = args.out or ("results/gpu-check.json" if args.gpu_check else "results/bench.json")
    if args.quick:
        args.model, args.image_size, args.batch = "DiT-T/4", 64, 4
        args.sample_batches, args.repeats, args.warmup, args.loop_repeats = [2, 4], 2, 1, 1
    args.sample_model = args.sample_model or args.model
    args.fid_batch, args.fid_size = (4, 64) if args.quick else (32, 256)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        if args.device.startswith("cuda:"):
            torch.cuda.set_device(args.device)   # peak memory and synchronize read the current GPU: this one
        return WORKERS[args.worker](args)
    if args.gpu_check:
        if not torch.cuda.is_available():
            raise UserError("--gpu-check needs a CUDA GPU (none is visible here)")
        return gpu_check(args)
    if args.model not in DiT_models or args.sample_model not in DiT_models:
        raise UserError(f"unknown model; choose one of {', '.join(DiT_models)}")
    for name in (args.model, args.sample_model):        # both run on latents of --image-size images
        check_image_size(name, args.image_size, pixel_space=False)
    vae_config = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1) if args.quick else {}
    results = dict(device=args.device, precision=args.precision, threads=torch.get_num_threads(), model=args.model,
                   image_size=args.image_size, batch=args.batch, quick=args.quick, compile=args.compile)
    Sampler(interval=args.guidance_interval)            # a bad interval fails before any work
    run = dict(train=lambda: bench_train(args), data=lambda: bench_data(args, vae_config),
               sampling=lambda: bench_sampling(args), samplers=lambda: bench_samplers(args, vae_config),
               decode=lambda: bench_decode(args, vae_config), fid=lambda: bench_fid(args))
    for part in args.only:
        results[part] = run[part]()
    print(report(results))
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))

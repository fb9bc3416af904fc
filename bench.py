"""Benchmarks: what parameter-efficient fine-tuning buys (paper Table 2), and where time goes.

    python bench.py                    # CPU: DiT-S/2 at 256 px (32x32 latents), batch 8; ~10 minutes
    python bench.py --device cuda --precision bf16 --model DiT-XL/2   # on a GPU: the paper's model
    python bench.py --sample-model DiT-XL/2 --sample-batches 2        # CPU seconds per DDPM step of XL
    python bench.py --only samplers --sample-model DiT-XL/2 --repeats 3 --warmup 1   # each sampler's cost at XL
    python bench.py --gpu-check        # DiT-XL/2 on one CUDA GPU in 8 minutes: tools/gpu_check.py, never in CI

It prints one table and writes JSON (--out; default results/bench.json, for --only results/bench-<parts>.json), a key
per part (--only):
  train     seconds per training step and peak training memory for full / BitFit / DiffFit / FineDiffusion,
            each method's speed-up over full fine-tuning (paper: FineDiffusion 1.56x) and memory ratio.
  data      end-to-end training images/s reading the VAE-latent cache against encoding with the VAE each step.
  sampling  seconds per DDPM step with CFG at forward batch 2, 8, 32 (batch 2 = one image and its guide),
            and DDIM-50 and DPM-Solver++(2M)-20 against DDPM-250 wall time.
  samplers  seconds per image of DDPM-250, DDIM-50 and DPM-Solver++(2M) at 10/15/20/25 steps, guided at every step
            and in --guidance-interval: DiT evaluations, speed-up, hours for Table 1's 100K images (projected).
  decode    seconds per image of the SD VAE decode in fp32 (what every command does) and under --precision.
  fid       FID Inception feature extraction, images/s.
  memory    (only when named) peak resident memory of `evaluate.py fid --fake X.npz` at each --memory-images count,
            and what it costs per image: python bench.py --only memory --memory-images 2000 20000
Every figure is the median of --repeats runs after --warmup runs; ratios compare figures of the same run.
Training memory on a CPU is the peak resident set of a fresh process minus its size before the model was
built (weights, gradients, optimizer state and activations); on CUDA, torch.cuda.max_memory_allocated.
"""
import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import toy
import train
from diffusion import create_diffusion
from fid_inception import FID_WEIGHTS, FIDInceptionV3, inception_features
from hardening import (ArgumentParser, RunFailed, UserError, check_image_size, device_name, int_in, nonnegative_int,
                       out_file, positive_int, precision_context, run_cli, write_json, write_npz_rows)
from model import METHODS, DiT_models, build_model, make_hierarchy, set_trainable
from sample import Sampler
from vae import AutoencoderKL

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


# ---- Training steps, one tuning method per fresh process (so each peak memory is its own) ------------------

CLASSES, SUPERCLASSES = 1000, 10        # the label table of the timed DiTs (its size hardly changes the cost)


def dealt_hierarchy(K, S):
    """K classes dealt round-robin into S superclasses: the cost does not depend on which class is where."""
    return make_hierarchy(range(K), range(S), [c % S for c in range(K)])


def trainer(model_name, image_size, batch, method, device, precision, compile=False, world=1):
    """(model, step): a DiT set up for `method` and step(x, y) -> the loss (0-dim) of train.py's train_step, on a random
    batch of `batch` unless given another. world > 1 (under torchrun): the DiT wrapped in DDP, as train.py wraps it."""
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
    rss_mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB -> MiB, a high-water mark
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


def run_worker(what, argv, timeout=None, launcher=(), script=os.path.join(HERE, "bench.py")):
    """`python [launcher] script argv` (a --worker) in a fresh process: the JSON it prints last. A failure, or running
    past `timeout` seconds, is a UserError naming `what`."""
    cmd = [sys.executable, *launcher, script, *map(str, argv)]
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
    flags = [a for name in ("model", "image_size", "batch", "device", "precision", "repeats", "warmup")
             for a in (f"--{name.replace('_', '-')}", getattr(args, name))] + (["--compile"] if args.compile else [])
    results = {method: run_worker(f"the {method} training benchmark", ["--worker", "train", "--method", method, *flags])
               for method in METHODS}
    full = results["full"]
    for r in results.values():
        r["speedup_vs_full"] = full["seconds_per_step"] / r["seconds_per_step"]
        r["memory_vs_full"] = r["peak_memory_mb"] / full["peak_memory_mb"]
    return results


# ---- Data: the latent cache against encoding with the VAE every step ---------------------------------------

def bench_data(args):
    torch.manual_seed(0)
    device = args.device
    vae = AutoencoderKL().to(device).eval()          # random weights: the cost is the same
    images = toy.ToyDataset(image_size=args.image_size, images_per_class=max(1, args.batch // 16 + 1), flip=False)
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

        def epochs():                   # as training reads the cache: reshuffled every epoch
            while True:
                yield from torch.utils.data.DataLoader(cache, batch_size=args.batch, shuffle=True, drop_last=True)
        batches = epochs()

        def from_cache():
            z, labels = next(batches)
            step(z.to(device), labels.to(device))

        sync = cuda_sync(device)
        cached = args.batch / median_seconds(from_cache, args.repeats, args.warmup, sync)
        encoded = args.batch / median_seconds(encode_every_step, args.repeats, args.warmup, sync)
    return dict(cache_images_per_s=cached, vae_images_per_s=encoded, cache_speedup=cached / encoded)


# ---- Sampling and FID features -----------------------------------------------------------------------------

def sampling_dit(args, K=1000, S=10):
    """A FineDiffusion-layout DiT of --sample-model (random weights: the cost is the same) and its autocast."""
    torch.manual_seed(0)
    with torch.device(args.device):     # built where it runs: DiT-XL/2 initialises in a second on a GPU
        model = DiT_models[args.sample_model](input_size=args.image_size // 8, num_classes=K, num_superclasses=S,
                                              hierarchy=dealt_hierarchy(K, S), null_class=False,
                                              norm_affine=True).eval()
    return model, precision_context(args.precision, torch.device(args.device).type)


def bench_sampling(args):
    device, sync = args.device, cuda_sync(args.device)
    model, autocast = sampling_dit(args)

    def cfg_model(x, t, **kw):
        with autocast:
            return model.forward_with_cfg(x, t, **kw).float()

    def one_step(diffusion, batch):
        x = torch.randn(batch, 4, args.image_size // 8, args.image_size // 8, device=device)
        y = torch.randint(0, 1000, (batch // 2,), device=device)              # half images, half their guides
        kw = dict(y=torch.cat([y, model.y_embedder.tier_ids(y)]), cfg_scale=4.0)
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
            for name, kind, steps in (("ddpm250", "ddpm", 250), ("ddim50", "ddim", 50), ("dpm20", "dpm++2m", 20)):
                loop = Sampler(kind, steps).loop()
                results[f"{name}_seconds"] = median_seconds(
                    lambda: loop(cfg_model, shape, model_kwargs=kw, device=device), args.loop_repeats, 0, sync)
            for name in ("ddim50", "dpm20"):
                results[f"{name}_speedup"] = results["ddpm250_seconds"] / results[f"{name}_seconds"]
    return results


SAMPLER_RUNS = [("ddpm", 250), ("ddim", 50), ("dpm++2m", 10), ("dpm++2m", 15), ("dpm++2m", 20), ("dpm++2m", 25)]
TABLE1_IMAGES = 100_000        # paper §4.3: the images behind each FID of Table 1


def bench_samplers(args):
    """Seconds per image of each sampler, guided at every step (the paper) and in --guidance-interval, projected, not
    run end to end (DDPM-250 of DiT-XL/2 takes about 16 CPU minutes per image): an image costs its steps' timed DiT
    evaluations (on [x_t; x_t] guided, on x_t outside the interval), the sampler's own arithmetic (its loop timed
    with a network that costs nothing) and the VAE decode of its batch."""
    device, sync, n = args.device, cuda_sync(args.device), args.sampler_images
    model, autocast = sampling_dit(args)
    x = torch.randn(2 * n, 4, args.image_size // 8, args.image_size // 8, device=device)    # [x_t; x_t]
    y = torch.randint(0, 1000, (n,), device=device)
    y = torch.cat([y, model.y_embedder.tier_ids(y)])
    t = torch.full((2 * n,), 500, device=device)
    vae = AutoencoderKL().to(device).eval()          # random weights: the cost is the same
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


def bench_decode(args):
    """The SD VAE decode of one batch of --batch latents: in fp32, as every command decodes whatever --precision the DiT
    samples in (an fp16 decoder overflows), against the autocast of --precision, the cost that fp32 adds."""
    torch.manual_seed(0)
    vae = AutoencoderKL().to(args.device).eval()      # random weights: the cost is the same
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
    images = torch.rand(args.batch, 3, args.image_size, args.image_size)
    run = lambda: inception_features(model, images, args.device, batch_size=args.batch, progress=False)
    return dict(images_per_s=args.batch / median_seconds(run, args.repeats, 1, cuda_sync(args.device)),
                batch=args.batch, image_size=args.image_size)


def bench_memory(args):
    """Peak resident memory of `evaluate.py fid --fake X.npz`, a fresh process, for X of each N of --memory-images
    (random uint8 images of --image-size; Inception with random weights in the published layout: the memory is the
    same). The images are read a batch at a time: what grows with N is the features kept, 20 KB an image (pool 8 for
    KID and precision/recall, spatial 8 for sFID's covariance, logits 4 for IS), not the image."""
    rng, size, peaks = np.random.default_rng(0), args.image_size, {}
    with tempfile.TemporaryDirectory() as tmp:
        def npz(n):  # (n, size, size, 3) uint8, written 100 at a time
            path = os.path.join(tmp, f"{n}.npz")
            batches = (rng.integers(0, 256, (min(100, n - i), size, size, 3), np.uint8) for i in range(0, n, 100))
            write_npz_rows(path, n, batches, dict)
            return path
        torch.manual_seed(0)
        torch.save(FIDInceptionV3().state_dict(), os.path.join(tmp, FID_WEIGHTS))
        common = ["--inception", os.path.join(tmp, FID_WEIGHTS), "--device", args.device, "--workers", "0",
                  "--batch-size", args.batch]
        reference = os.path.join(tmp, "reference.npz")
        peak_rss_mb("evaluate.py stats", ["stats", "--images", npz(min(args.memory_images)), "--out", reference, *common])
        for n in args.memory_images:
            fake = npz(n)
            peaks[n] = peak_rss_mb(f"evaluate.py fid of {n} images", ["fid", "--real", reference, "--fake", fake,
                                                                       "--pairs", 0, *common])
            os.remove(fake)                                   # 3.9 GB at 20,000 images of 256 px
    (n0, m0), (n1, m1) = min(peaks.items()), max(peaks.items())
    return dict(peak_rss_mb=peaks, kb_per_image=(m1 - m0) * 1024 / (n1 - n0) if n1 > n0 else None,
                image_kb=size * size * 3 / 1024, image_size=size)


def peak_rss_mb(what, argv):
    """The peak resident memory, in MiB, of `python evaluate.py argv` run to its end (a UserError naming `what` if
    it fails)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "evaluate.py"), *map(str, argv)],
                                stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)   # this child's own rusage (RUSAGE_CHILDREN would be the largest)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise UserError(f"{what} failed: {(err.read().decode().strip().splitlines() or ['?'])[-1]}")
    return usage.ru_maxrss / 1024    # Linux: KiB


# ---- The report --------------------------------------------------------------------------------------------

def report(results):
    lines = [f"device {results['device']}, precision {results['precision']}, threads {results['threads']}"
             + (", torch.compile" if results["compile"] else "")]
    if "train" in results:
        lines += [f"training step: {results['model']} at {results['image_size']} px, batch {results['batch']}",
                  f"  {'method':<15}{'s/step':>9}{'speed-up':>10}{'peak MiB':>10}{'memory':>8}"]
        for method, r in results["train"].items():
            lines.append(f"  {method:<15}{r['seconds_per_step']:>9.3f}{r['speedup_vs_full']:>9.2f}x"
                         f"{r['peak_memory_mb']:>10.0f}{r['memory_vs_full']:>7.2f}x")
    if d := results.get("data"):
        lines.append(f"training images/s: latent cache {d['cache_images_per_s']:.1f}, VAE every step "
                     f"{d['vae_images_per_s']:.2f} -> {d['cache_speedup']:.1f}x")
    if s := results.get("sampling"):
        steps = ", ".join(f"batch {b}: {v:.3f}" for b, v in s["seconds_per_ddpm_step"].items())
        lines.append(f"sampling {s['model']} s per DDPM step with CFG: {steps}")
        if "ddim50_speedup" in s:
            lines.append(f"  batch 2 wall time: DDPM-250 {s['ddpm250_seconds']:.1f} s, DDIM-50 "
                         f"{s['ddim50_seconds']:.1f} s -> {s['ddim50_speedup']:.1f}x, DPM++(2M)-20 "
                         f"{s['dpm20_seconds']:.1f} s -> {s['dpm20_speedup']:.1f}x")
    if s := results.get("samplers"):
        lo, hi = s["guidance_interval"]
        lines += [f"samplers: {s['model']} at {s['image_size']} px on {results['device']}, {s['images_per_batch']} "
                  f"image(s) per batch with the guide half; projected from timed steps, not run end to end:",
                  f"  guided step {s['seconds_per_guided_step']:.3f} s, conditional-half step "
                  f"{s['seconds_per_conditional_step']:.3f} s, VAE decode {s['decode_seconds_per_batch']:.3f} s per "
                  "batch",
                  f"  {'sampler':<9}{'steps':>6}  {'guided steps':<20}{'DiT evals/image':>16}{'s/image':>10}"
                  f"{'speed-up':>10}{'h per 100K':>12}"]
        for r in s["runs"]:
            where = "all" if r["guidance_interval"] is None else f"{r['guided_steps']}, t in [{lo}, {hi}]"
            lines.append(f"  {r['sampler']:<9}{r['steps']:>6}  {where:<20}{r['evaluations_per_image']:>16}"
                         f"{r['seconds_per_image']:>10.2f}{r['speedup_vs_ddpm250']:>9.1f}x{r['hours_per_100k']:>12.1f}")
    if d := results.get("decode"):
        lines.append(f"SD VAE decode, s per image (batch {d['batch']}): fp32 {d['fp32_seconds_per_image']:.3f} (every "
                     f"command's), {d['precision']} autocast {d['precision_seconds_per_image']:.3f} -> fp32 costs "
                     f"{d['fp32_cost']:.2f}x")
    if f := results.get("fid"):
        lines.append(f"FID Inception features: {f['images_per_s']:.1f} images/s ({f['image_size']} px, "
                     f"batch {f['batch']})")
    if m := results.get("memory"):
        peaks = ", ".join(f"{n:,} images {mb:,.0f}" for n, mb in m["peak_rss_mb"].items())
        lines.append(f"evaluate.py fid --fake X.npz ({m['image_size']} px), peak MiB: {peaks}" + (
            f" -> {m['kb_per_image']:.0f} KB per image (an image: {m['image_kb']:.0f} KB)" if m["kb_per_image"] else ""))
    return "\n".join(lines)


PARTS = dict(train=bench_train, data=bench_data, sampling=bench_sampling, samplers=bench_samplers, decode=bench_decode,
             fid=bench_fid, memory=bench_memory)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "tf32", "fp16", "bf16"], default="fp32")
    p.add_argument("--model", choices=list(DiT_models), default="DiT-S/2", help="DiT of the training benchmarks")
    p.add_argument("--image-size", type=positive_int, default=256, help="pixels (latents are 8x smaller)")
    p.add_argument("--batch", type=positive_int, default=8, help="images a step (and an Inception batch)")
    p.add_argument("--sample-model", choices=list(DiT_models), help="DiT of the sampling benchmark (default: --model)")
    p.add_argument("--sample-batches", type=int_in(2), nargs="+", default=[2, 8, 32],
                   help="forward batches: half images, half their guides")
    p.add_argument("--no-loops", dest="loops", action="store_false",
                   help="skip DDPM-250 / DDIM-50 / DPM++(2M)-20 wall times")
    p.add_argument("--sampler-images", type=positive_int, default=1,
                   help="images per batch of the samplers part (CPU: 1)")
    p.add_argument("--guidance-interval", type=int, nargs=2, default=[200, 700], metavar=("LO", "HI"),
                   help="the samplers part's guidance interval (an example: sigma_t 0.72 ... 12; what it saves "
                        "is the share of steps outside it)")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT in the training benchmark")
    p.add_argument("--repeats", type=positive_int, default=7)
    p.add_argument("--warmup", type=nonnegative_int, default=3)
    p.add_argument("--loop-repeats", type=positive_int, default=3)
    p.add_argument("--memory-images", type=int_in(10), nargs="+", default=[500, 2000],
                   help="the memory part's image counts (Table 1: 100,000)")
    p.add_argument("--only", nargs="+", choices=list(PARTS), default=[p for p in PARTS if p != "memory"],
                   help="run only these parts (memory: only when named)")
    p.add_argument("--out", type=out_file, help="default: results/bench.json, or with --only results/bench-<parts>.json "
                                                "(a part run alone leaves the whole run's figures as they are)")
    p.add_argument("--worker", choices=["train"], help=argparse.SUPPRESS)    # one measurement, in a fresh process
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sample_model = args.sample_model or args.model
    if args.out is None:
        args.out = "results/bench.json" if args.only == p.get_default("only") else \
            f"results/bench-{'-'.join(args.only)}.json"
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if "--gpu-check" in argv:                 # the GPU acceptance check: developer tooling, with flags of its own
        sys.path.insert(0, os.path.join(HERE, "tools"))
        import gpu_check
        return gpu_check.main([a for a in argv if a != "--gpu-check"])
    args = parse_args(argv)
    if args.worker:
        if args.device.startswith("cuda:"):
            torch.cuda.set_device(args.device)   # peak memory and synchronize read the current GPU: this one
        return train_worker(args)
    for name in (args.model, args.sample_model):        # both run on latents of --image-size images
        check_image_size(name, args.image_size, pixel_space=False)
    results = dict(device=args.device, precision=args.precision, threads=torch.get_num_threads(), model=args.model,
                   image_size=args.image_size, batch=args.batch, compile=args.compile)
    Sampler(interval=args.guidance_interval)            # a bad interval fails before any work
    for part in args.only:
        results[part] = PARTS[part](args)
    print(report(results))
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))

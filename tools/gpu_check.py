"""The GPU acceptance check: DiT-XL/2 on one CUDA GPU as the paper trains and samples it, within 8 minutes. Developer
tooling, run by `python bench.py --gpu-check` (or directly); never in CI.

    python bench.py --gpu-check [--device cuda:N] [--out results/gpu-check.json] [--peak-tflops T]

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
import argparse
import gc
import json
import os
import re
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))          # the repository: bench.py and the project it measures

import bench  # noqa: E402
from bench import (CLASSES, gpu_of, median_seconds, read_losses, run_worker, sampling_dit, trainer,  # noqa: E402
                   cuda_sync)
from hardening import (ArgumentParser, UserError, device_name, init_distributed, out_file, positive_float,  # noqa: E402
                       positive_int, run_cli, write_json)
from model import METHODS  # noqa: E402
from sample import CFG_SCALE, Sampler, guide_labels, sample_images  # noqa: E402
from vae import AutoencoderKL  # noqa: E402

ME = os.path.abspath(__file__)

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
    args.sample_model = args.model
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
    rank, world, device = init_distributed(args.device)
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
            script = bench.__file__ if argv[1] == "train" else ME       # bench's training step, or a part of ours
            outcome = run_worker(what, argv, left, launcher, script)
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


WORKERS = dict(batch=batch_worker, sample=sample_worker, ddp=ddp_worker)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=out_file, default="results/gpu-check.json")
    p.add_argument("--peak-tflops", type=positive_float,
                   help="the GPU's dense bf16 peak, for the MFU (default: from a table of datasheets)")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)       # one part, in a fresh process
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=positive_int, help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=positive_int, help=argparse.SUPPRESS)
    p.add_argument("--max-batch", type=positive_int, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=positive_int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        if args.device.startswith("cuda:"):
            torch.cuda.set_device(args.device)   # peak memory and synchronize read the current GPU: this one
        return WORKERS[args.worker](args)
    if not torch.cuda.is_available():
        raise UserError("--gpu-check needs a CUDA GPU (none is visible here)")
    if torch.device(args.device).type != "cuda":
        raise UserError(f"--gpu-check runs on a CUDA GPU, not --device {args.device}")
    return gpu_check(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))

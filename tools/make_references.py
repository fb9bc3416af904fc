"""Regenerate tools/reference_values.safetensors: outputs of the independent reference implementations that this
project's numerics are pinned to (the `*_equals_*` reference tests in test_all.py read the file).

Never run in CI, and nothing here is imported by the project. The file holds only inputs and outputs (plain
numbers, facts); no weights and no code of the reference implementations. Both sides build identical
weights from the published tensor names and shapes with `seeded_state` from test_all.py.

What is pinned, and against what
  1. DiT (facebookresearch/DiT, models.py): fixed sin-cos positions, the timestep embedding, forward and
     forward_with_cfg (guidance of the first 3 channels, batch [conditional; null]) of a small DiT
     (input 8, patch 2, width 64, depth 2, 4 heads, 10 classes + null row). The fine-grained DiT of the
     authors' FineDiffusion code (FineDiffusion/FineDiffusion, models.py: a label table of 10,000 subclass
     + 11 superclass rows and LayerNorm affine): forward_with_cfg with guide labels = superclass rows,
     computed by the authors' own LabelEmbedder.token_drop (their iNat21 subclass -> superclass map).
  2. Gaussian diffusion (facebookresearch/DiT, diffusion/): linear schedule, respaced timesteps, hybrid
     training loss, p_mean_variance, one DDPM step, a 10-step DDPM loop with CFG and a 10-step DDIM loop.
     DPM-Solver++(2M), which the official code lacks: diffusers' DPMSolverMultistepScheduler (dpmsolver++,
     order 2, "linspace" timesteps, lower_order_final, final sigma 0) driving the eps (first 4 output
     channels) of the same small official DiT: its timesteps, a 10-step loop with CFG, a 25-step plain loop.
     DPM-Solver++(2M) SDE: the same scheduler with algorithm_type "sde-dpmsolver++" (solver_type "midpoint"),
     each step's variance_noise one torch.randn_like(x) from the stream seeded before x_T, after the network
     call: its timesteps, loops with CFG at 1, 2, 3, 10, 25 and 50 steps, a 20-step plain loop.
  3. The authors' sampling flow (their sample.py / DiT's sample.py, written out below): seed, x_T, [z; z],
     labels [c; superclass row], p_sample_loop(forward_with_cfg, clip_denoised=False), drop the guide half,
     vae.decode(z / 0.18215), then DiT's uint8 conversion clamp(127.5 x + 128, 0, 255).
     "cli": the same flow, one class per run as the command line runs it (`sample.py --class-id C
     --num-samples 2 --steps 10 --seed 0`), for one class of each of the 11 iNat21 superclasses (CLI_CLASSES),
     with the authors' DiT at DiT-T/2's size (depth 4, width 128, 4 heads, patch 2, 8 x 8 latents; loaders
     recognise it by its tensor shapes) and a diffusers VAE of test_all.py's CLI_VAE_CONFIG (8x, as the SD
     VAE; 64 x 64 images), both with seeded weights: the guide rows (the authors' token_drop), the decoded
     images and their uint8 pixels.
     "cli512": the same as the command line runs it on a file in FineDiffusion-iNat-512.pt's layout (the authors'
     sample.py at --image-size 512, whose only change is latent_size = 64): the "cli" group's DiT at 64 x 64 latents
     (a 512 px position table, the authors' own), its VAE, class CLI512_CLASS, 2 samples, seed 0, 10 steps: the guide
     row, the latents (the conditional half, before the VAE) and, of the 512 x 512 images, every 8th row and column of
     the decoded floats and of their uint8 pixels (the whole images would be 12 MB).
  4. diffusers AutoencoderKL (small config): posterior mean and log-variance (also where the [-30, 20]
     clamp engages), decode.
  5. pytorch-fid's FID InceptionV3 (2048-d pool features), with the download patched to seeded weights.
  6. pytorch-fid's calculate_frechet_distance: full-rank, rank-deficient and singular statistics (the
     last can make scipy's sqrtm non-finite, and then pytorch-fid's eps-offset fallback runs: it did on the
     machine that made the stored file, and the file says so in fid.fd.singular.fallback).
  7. lpips 0.1 LPIPS(net="alex", version 0.1) with seeded AlexNet trunk and linear heads.
  8. The metrics beside FID: torch-fidelity's own KID (kid_features_to_metric: 100 subsets of 100, and a set of 40
     with subsets of all 40, the size ours falls back to), Inception Score (isc_features_to_metric, 10 splits) and
     precision/recall (prc_features_to_metric, k = 3) of seeded features and logits; its InceptionV3 with the
     seeded weights on a black image (where its (x - 128) / 128 and pytorch-fid's 2x - 1 agree): pool features,
     "logits_unbiased" (what its IS reads) and ADM's spatial features (the first 7 channels of Mixed_6d.branch1x1,
     the graph's mixed_6/conv by torch-fidelity's own weight map, flattened in TF's NHWC order, hooked); sFID as
     ADM's evaluator computes it (guided-diffusion evaluations/evaluator.py, its TF graph not run: the numpy that
     follows the graph written out in adm_sfid) of seeded NHWC activations.

How to regenerate (on any machine with Python 3.11; no GPU; about 20 seconds)
  1. The official code, outside this repository (CC-BY-NC: it must never be copied into this repository):
         git clone https://github.com/facebookresearch/DiT /tmp/DiT-official
         git -C /tmp/DiT-official checkout 4961bcb01370bc5a552909b2f4c1b0f096e3f79e
         git clone https://github.com/FineDiffusion/FineDiffusion /tmp/FineDiffusion-authors
         git -C /tmp/FineDiffusion-authors checkout a59fdba62fe35dd15426356b2a16c7549fe4d680
     Used from them: DiT's models.py (the version of commit 4961bcb0..., which guides eps[:, :3]) and its
     diffusion/ package (__init__.py, gaussian_diffusion.py, respace.py as of commit 50142678f6f5...,
     diffusion_utils.py as of 29e4fa6cad81...); the authors' models.py (a59fdba6...). The script checks the
     sha256 of each of these files (SOURCE_SHA256 below) and refuses other content.
  2. A throwaway virtual environment, outside this repository, with pinned versions:
         python3.11 -m venv /tmp/refvenv && . /tmp/refvenv/bin/activate
         pip install torch==2.14.1 torchvision==0.29.1 numpy==2.4.6 scipy==1.17.1 \
             diffusers==0.42.1 pytorch-fid==0.3.0 lpips==0.1.4 safetensors==0.8.0 timm==1.0.31 \
             torch-fidelity==0.4.0
         pip install -r requirements.txt        # test_all.py (imported for seeded_state) imports the project
     (timm: the official models.py takes PatchEmbed, Attention and Mlp from it.)
  3. From the repository root:
         python tools/make_references.py --dit-repo /tmp/DiT-official \
             --finediffusion-repo /tmp/FineDiffusion-authors --out tools/reference_values.safetensors
     The script is deterministic (one thread, seeded inputs, a single metadata entry): running it twice gives
     a byte-identical file. It prints the sha256 of what it wrote; then run the reference tests.
  4. On another CPU, other kernels change the last bits of most float values (about 1e-6 of a tensor's
     largest value; a uint8 pixel at a rounding edge by one level), and whether scipy's sqrtm fails in the
     FID singular case (item 6). To add a group without rewriting the groups the tests already pin, keep the
     earlier file's tensors: add `--keep tools/reference_values.safetensors`. The script then prints, for every
     kept tensor this machine does not reproduce bit for bit, how far its own value is, and writes the kept
     tensors unchanged and only the new ones fresh.
Nothing is downloaded: pytorch-fid's weight download is replaced by seeded weights, lpips is built with
pnet_rand=True (its v0.1 heads ship inside the package) and then given seeded weights, diffusers builds its
VAE from a config.

Values were computed on an x86-64 CPU, the "cli" and "dpmsde" groups added later with --keep on another (AVX2)
x86-64 CPU, the "cli512" group with --keep on a third, the "metrics" group (8.) with --keep; the tests compare with
tolerances that absorb other CPU kernels.
"""
import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import sys
import tempfile
import types
import warnings

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The weights: the project's seeded_state (tensor `name` drawn from crc32(name)), shared with the tests, and the
# config.json of the CLI group's VAE, which the tests write beside its seeded weights.
sys.path.insert(0, REPO)
from test_all import CLI_VAE_CONFIG, seeded_state  # noqa: E402

DIT_COMMIT = "4961bcb01370bc5a552909b2f4c1b0f096e3f79e"
FINEDIFFUSION_COMMIT = "a59fdba62fe35dd15426356b2a16c7549fe4d680"
# sha256 of the files the values were made from: a checkout with other content is refused (--skip-source-check
# to go on anyway, e.g. to see what a newer upstream changes).
SOURCE_SHA256 = {
    ("dit", "models.py"): "57b4b1b34401b964ad39031737c3591bd2a41d0a84c4f85d2f74a3aed870fa80",
    ("dit", "diffusion/__init__.py"): "2c7dded048b6056907a424037cb334f8c7ed99272163f227fae0faae1c5209d6",
    ("dit", "diffusion/diffusion_utils.py"): "e2bf3d542baea8f9b49a10d742a1bc80c3437de24ea27cd4156f8cdc96f5044c",
    ("dit", "diffusion/gaussian_diffusion.py"): "3b7fb44cdfd685ce9b63513bbb68a592019a342f8bafcb208250885761a65e73",
    ("dit", "diffusion/respace.py"): "c8a8d93f1a7b7825753a0db7b932de43dcdc3802bb8a7abccc87dbc9fad2e8cc",
    ("finediffusion", "models.py"): "72d4c9fd220b90b7088357d9691aa9bc129e9471b37194b1c5ba858a6c50c9f6",
}

# Small configurations, the same in the tests.
DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4)
DIT_CLASSES = 10                                   # + 1 null row (class_dropout_prob > 0)
FINE_CLASSES, FINE_SUPERCLASSES = 10000, 11        # iNat21's table in the authors' code
VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8, latent_channels=4,
           sample_size=16)
VAE_LOGVAR_SHIFT = (21.0, -29.0, 0.0, 0.0)         # added to quant_conv.bias[4:8]: pushes logvar past the clamp
DPMSDE_STEPS = (1, 2, 3, 10, 25, 50)               # DPM-Solver++(2M) SDE: first order only, one 2M step, ..., many
# The CLI group: DiT-T/2's size (the project's loader knows a DiT by its tensor shapes) in the authors' layout,
# and one class of each iNat21 superclass, in superclass order (Plants 0, Insects 1, ..., Animalia 10).
CLI_DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=4, num_heads=4)
CLI_CLASSES = [7000, 1908, 4021, 5476, 5000, 4700, 2800, 3000, 5300, 100, 170]
# The 512 px group: the CLI group's DiT at 64 x 64 latents, one class (Birds), every CLI512_STRIDE-th row and column.
CLI512_LATENT, CLI512_CLASS, CLI512_STRIDE = 64, 4021, 8


def check_sources(roots):
    """Refuse checkouts whose files differ from the ones the stored values were made from."""
    bad = []
    for (repo, rel), digest in SOURCE_SHA256.items():
        with open(os.path.join(roots[repo], rel), "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                bad.append(f"{repo}: {rel}")
    if bad:
        sys.exit("these files differ from the versions the references were made from (see the docstring for the "
                 "commits): " + ", ".join(bad) + "; pass --skip-source-check to go on anyway")


def load_module(name, path, package_dir=None):
    """Import a file (or a package, from its __init__.py) under a name of our choosing: the official code
    has a `models.py` and a `diffusion` package, names the project uses too."""
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[package_dir] if package_dir else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def gen(seed):
    return torch.Generator().manual_seed(seed)


def load_seeded(model, skip=("pos_embed",)):
    """Load seeded_state of the model's own state dict; returns the model in eval mode."""
    state = seeded_state(model.state_dict(), skip=skip)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert sorted(missing) == sorted(skip) and not unexpected, (missing, unexpected)
    return model.eval()


def f32(t):
    return t.detach().to(torch.float32).contiguous()


def f64(a):
    return torch.as_tensor(np.asarray(a, dtype=np.float64)).contiguous()


def i64(a):
    return torch.as_tensor(a, dtype=torch.int64).contiguous()


# ----------------------------------------------------------------------------------------------------------
# 1. DiT: official and the authors' fine-grained variant
# ----------------------------------------------------------------------------------------------------------

def dit_references(models, out):
    model = load_seeded(models.DiT(**DIT, num_classes=DIT_CLASSES, class_dropout_prob=0.1, learn_sigma=True))
    grid = DIT["input_size"] // DIT["patch_size"]
    out["dit.pos_embed"] = f64(models.get_2d_sincos_pos_embed(DIT["hidden_size"], grid))

    t = i64([0, 1, 250, 999])
    out["dit.t_emb.t"] = t
    out["dit.t_emb.out"] = f32(models.TimestepEmbedder.timestep_embedding(t, 256))

    x = torch.randn(6, 4, 8, 8, generator=gen(101))
    t = i64([0, 999, 1, 250, 500, 999])
    y = i64([0, 3, 10, 7, 10, 9])                  # 10: the null row
    with torch.no_grad():
        out["dit.forward.out"] = f32(model(x, t, y))
    out["dit.forward.x"], out["dit.forward.t"], out["dit.forward.y"] = x, t, y

    x = torch.randn(4, 4, 8, 8, generator=gen(102))
    t = i64([500, 20, 500, 20])
    y = i64([2, 5, 10, 10])                        # [conditional; null]
    with torch.no_grad():
        out["dit.cfg.out"] = f32(model.forward_with_cfg(x, t, y, cfg_scale=4.0))
    out["dit.cfg.x"], out["dit.cfg.t"], out["dit.cfg.y"] = x, t, y
    return model


def fine_model(authors):
    return load_seeded(authors.DiT(**DIT, num_classes=FINE_CLASSES, num_super_classes=FINE_SUPERCLASSES,
                                   class_dropout_prob=0.1, learn_sigma=True))


def guide_rows(model, classes):
    """The guide half's labels as the authors compute them: their LabelEmbedder.token_drop with every label
    dropped maps a subclass c to its superclass row K + superclass(c)."""
    return model.y_embedder.token_drop(classes.clone(), force_drop_ids=torch.ones(len(classes)))


def fine_references(authors, out):
    model = fine_model(authors)
    classes = i64([1908, 5476, 170])               # Insects, Fungi, Animalia
    y = torch.cat([classes, guide_rows(model, classes)])
    assert y.tolist()[3:] == [10001, 10003, 10010], y
    x = torch.randn(6, 4, 8, 8, generator=gen(103))
    t = i64([700, 30, 999, 700, 30, 999])
    with torch.no_grad():
        out["fine.cfg.out"] = f32(model.forward_with_cfg(x, t, y, cfg_scale=4.0))
    out["fine.cfg.x"], out["fine.cfg.t"], out["fine.cfg.y"] = x, t, y
    return model


# ----------------------------------------------------------------------------------------------------------
# 2. Gaussian diffusion (official), with the small official DiT as the model
# ----------------------------------------------------------------------------------------------------------

def diffusion_references(diffusion, model, out):
    train = diffusion.create_diffusion(timestep_respacing="")
    out["diff.betas"] = f64(train.betas)
    out["diff.alphas_cumprod"] = f64(train.alphas_cumprod)
    for respacing in ("250", "10", "ddim10"):
        out[f"diff.timestep_map.{respacing}"] = i64(diffusion.create_diffusion(respacing).timestep_map)

    # training_losses: t = 0 takes the decoder NLL (x_start exactly at +-1 hits its edge cases)
    x_start = torch.rand(4, 4, 8, 8, generator=gen(201)) * 2 - 1
    x_start[:, :, 0, :4] = 1.0
    x_start[:, :, 1, :4] = -1.0
    noise = torch.randn(4, 4, 8, 8, generator=gen(202))
    t, y = i64([0, 999, 1, 500]), i64([1, 10, 4, 8])
    with torch.no_grad():
        terms = train.training_losses(model, x_start, t, model_kwargs=dict(y=y), noise=noise)
    out.update({"diff.train.x_start": x_start, "diff.train.noise": noise, "diff.train.t": t, "diff.train.y": y})
    for k in ("loss", "mse", "vb"):
        out[f"diff.train.{k}"] = f32(terms[k])

    # p_mean_variance on a respaced chain (the model sees the original steps)
    d250 = diffusion.create_diffusion("250")
    x = torch.randn(4, 4, 8, 8, generator=gen(203))
    t, y = i64([125, 60, 0, 249]), i64([3, 10, 0, 6])
    with torch.no_grad():
        o = d250.p_mean_variance(model, x, t, clip_denoised=False, model_kwargs=dict(y=y))
    out.update({"diff.pmv.x": x, "diff.pmv.t": t, "diff.pmv.y": y})
    for k in ("mean", "log_variance", "pred_xstart"):
        out[f"diff.pmv.{k}"] = f32(o[k])

    # one DDPM step: its noise is the step's torch.randn_like(x) after torch.manual_seed(seed)
    x = torch.randn(4, 4, 8, 8, generator=gen(204))
    t, y, seed = i64([999, 400, 1, 0]), i64([5, 10, 2, 9]), 7
    torch.manual_seed(seed)
    with torch.no_grad():
        o = train.p_sample(model, x, t, clip_denoised=False, model_kwargs=dict(y=y))
    out.update({"diff.p_sample.x": x, "diff.p_sample.t": t, "diff.p_sample.y": y, "diff.p_sample.seed": i64(seed)})
    out["diff.p_sample.sample"] = f32(o["sample"])

    # 10-step DDPM with CFG (batch [z; z], labels [c; null]) and 10-step DDIM (eta 0), as DiT's sample.py
    z = torch.randn(2, 4, 8, 8, generator=gen(205))
    y = i64([1, 6, 10, 10])
    seed = 11
    torch.manual_seed(seed)
    samples = diffusion.create_diffusion("10").p_sample_loop(
        model.forward_with_cfg, (4, 4, 8, 8), torch.cat([z, z]), clip_denoised=False,
        model_kwargs=dict(y=y, cfg_scale=4.0), progress=False, device="cpu")
    out.update({"diff.ddpm10.z": z, "diff.ddpm10.y": y, "diff.ddpm10.seed": i64(seed),
                "diff.ddpm10.samples": f32(samples)})

    z = torch.randn(2, 4, 8, 8, generator=gen(206))
    y = i64([8, 10])
    samples = diffusion.create_diffusion("ddim10").ddim_sample_loop(
        model, (2, 4, 8, 8), z, clip_denoised=False, model_kwargs=dict(y=y), progress=False, device="cpu", eta=0.0)
    out.update({"diff.ddim10.z": z, "diff.ddim10.y": y, "diff.ddim10.samples": f32(samples)})


def dpm_scheduler(steps, sde=False):
    """diffusers' DPM-Solver++(2M) on DiT's schedule (linear betas 1e-4 ... 0.02 over 1000 steps, eps prediction);
    sde: its SDE variant (algorithm_type "sde-dpmsolver++"). solver_type "midpoint" is diffusers' default."""
    from diffusers import DPMSolverMultistepScheduler
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++", solver_order=2, solver_type="midpoint",
        timestep_spacing="linspace", lower_order_final=True, final_sigmas_type="zero")
    scheduler.set_timesteps(steps)
    return scheduler


def dpm_solve(net, x, steps, sde=False):
    """x_T -> x_0 with diffusers' scheduler driving net's eps. sde: each step's variance_noise is one
    torch.randn_like(x) from the global stream, drawn after the network call (DiT's rule for DDPM's noise)."""
    scheduler = dpm_scheduler(steps, sde)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = net(x, t.expand(len(x)))[:, :4]          # learned sigma: eps is the first C channels
            noise = torch.randn_like(x) if sde else None
            x = scheduler.step(eps, t, x, variance_noise=noise).prev_sample
    return x


def dpm_solver_references(model, out):
    for steps in (10, 15, 20, 25, 50):
        out[f"dpm.timesteps.{steps}"] = i64(dpm_scheduler(steps).timesteps)
    # 10 steps with CFG, batch [z; z], labels [c; null], as DiT's sample.py builds it
    z, y = torch.randn(2, 4, 8, 8, generator=gen(207)), i64([1, 6, 10, 10])
    samples = dpm_solve(lambda x, t: model.forward_with_cfg(x, t, y, cfg_scale=4.0), torch.cat([z, z]), 10)
    out.update({"dpm.cfg10.z": z, "dpm.cfg10.y": y, "dpm.cfg10.samples": f32(samples)})
    z, y = torch.randn(2, 4, 8, 8, generator=gen(208)), i64([8, 3])
    samples = dpm_solve(lambda x, t: model(x, t, y), z, 25)
    out.update({"dpm.plain25.z": z, "dpm.plain25.y": y, "dpm.plain25.samples": f32(samples)})


def dpm_sde_references(model, out):
    """DPM-Solver++(2M) SDE at DPMSDE_STEPS with CFG ([z; z], labels [c; null]) and 20 plain steps. x_T (z) is
    torch.randn after torch.manual_seed(seed), and each step's noise comes from the same stream, in order: so a
    sampler that draws x_T and one randn_like(x) per step from that seed must land on the same samples."""
    for steps in DPMSDE_STEPS:
        out[f"dpmsde.timesteps.{steps}"] = i64(dpm_scheduler(steps, sde=True).timesteps)
        seed, y = 300 + steps, i64([1, 6, 10, 10])
        torch.manual_seed(seed)
        z = torch.randn(2, 4, 8, 8)                                   # (N, C, H, W): the conditional half's x_T
        samples = dpm_solve(lambda x, t: model.forward_with_cfg(x, t, y, cfg_scale=4.0), torch.cat([z, z]), steps,
                            sde=True)
        out.update({f"dpmsde.cfg{steps}.seed": i64(seed), f"dpmsde.cfg{steps}.z": z, f"dpmsde.cfg{steps}.y": y,
                    f"dpmsde.cfg{steps}.samples": f32(samples)})
    seed, y = 320, i64([8, 3])
    torch.manual_seed(seed)
    z = torch.randn(2, 4, 8, 8)                                       # (N, C, H, W)
    samples = dpm_solve(lambda x, t: model(x, t, y), z, 20, sde=True)
    out.update({"dpmsde.plain20.seed": i64(seed), "dpmsde.plain20.z": z, "dpmsde.plain20.y": y,
                "dpmsde.plain20.samples": f32(samples)})


# ----------------------------------------------------------------------------------------------------------
# 3. + 4. The SD VAE (diffusers) and the authors' end-to-end sampling flow
# ----------------------------------------------------------------------------------------------------------

def seeded_vae(shift_logvar=False, config=None):
    """diffusers' AutoencoderKL, the small VAE or one of a config.json dict, with seeded_state weights."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(**VAE) if config is None else AutoencoderKL.from_config(config)
    state = seeded_state(vae.state_dict(), skip=())
    if shift_logvar:
        state["quant_conv.bias"] = state["quant_conv.bias"] + torch.tensor((0.0,) * 4 + VAE_LOGVAR_SHIFT)
    vae.load_state_dict(state, strict=True)
    return vae.eval()


def vae_references(out):
    vae = seeded_vae()
    x = torch.rand(2, 3, 16, 16, generator=gen(401)) * 2 - 1
    z = torch.randn(2, 4, 8, 8, generator=gen(402))
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        out["vae.encode.mean"], out["vae.encode.logvar"] = f32(posterior.mean), f32(posterior.logvar)
        out["vae.decode.out"] = f32(vae.decode(z).sample)
        shifted = seeded_vae(shift_logvar=True).encode(x).latent_dist
        out["vae.clamp.mean"], out["vae.clamp.logvar"] = f32(shifted.mean), f32(shifted.logvar)
    out["vae.x"], out["vae.z"] = x, z
    lv = shifted.logvar
    print(f"  VAE clamp case: {(lv == 20).float().mean():.0%} of logvar at 20, {(lv == -30).float().mean():.0%} at -30")
    return vae


def authors_sample(fine, vae, diffusion, classes, seed, latent_size, cfg_scale=4.0, respacing="10"):
    """The authors' sample.py (= DiT's sample.py with superclass guide labels), written out, at 10 DDPM steps.
    Returns the latents, the decoded images and their uint8 pixels."""
    torch.manual_seed(seed)
    z = torch.randn(len(classes), 4, latent_size, latent_size)
    z = torch.cat([z, z], 0)
    y = torch.cat([classes, guide_rows(fine, classes)], 0)
    with torch.no_grad():
        samples = diffusion.create_diffusion(respacing).p_sample_loop(
            fine.forward_with_cfg, z.shape, z, clip_denoised=False, model_kwargs=dict(y=y, cfg_scale=cfg_scale),
            progress=False, device="cpu")
        samples, _ = samples.chunk(2, dim=0)       # remove the guide half
        images = vae.decode(samples / 0.18215).sample
    # DiT's sample_ddp.py / the project's uint8 conversion
    uint8 = torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)
    return samples, images, uint8


def end_to_end_references(fine, vae, diffusion, out):
    seed, classes = 0, i64([1908, 5476])
    samples, images, uint8 = authors_sample(fine, vae, diffusion, classes, seed, DIT["input_size"])
    out.update({"e2e.classes": classes, "e2e.seed": i64(seed), "e2e.latents": f32(samples),
                "e2e.decoded": f32(images), "e2e.uint8": i64(uint8)})


def cli_references(authors, diffusion, out):
    """What `sample.py --class-id C --ckpt <the authors' layout> --vae <folder> --num-samples 2 --steps 10 --seed 0`
    must write, for C in CLI_CLASSES, one class per run as the authors' sample.py draws it: the authors' DiT of
    DiT-T/2's size and a diffusers VAE of CLI_VAE_CONFIG (8x, as the SD VAE), both with seeded weights, so the
    tests can write the same checkpoint and VAE folder; nothing else is stored."""
    fine = load_seeded(authors.DiT(**CLI_DIT, num_classes=FINE_CLASSES, num_super_classes=FINE_SUPERCLASSES,
                                   class_dropout_prob=0.1, learn_sigma=True))
    vae = seeded_vae(config=CLI_VAE_CONFIG)
    assert json.loads(vae.to_json_string()) == CLI_VAE_CONFIG      # the config.json the tests write is diffusers'
    classes = i64(CLI_CLASSES)
    guide = guide_rows(fine, classes)
    assert guide.tolist() == list(range(FINE_CLASSES, FINE_CLASSES + FINE_SUPERCLASSES)), guide
    decoded, uint8 = [], []
    for c in CLI_CLASSES:
        _, images, pixels = authors_sample(fine, vae, diffusion, i64([c, c]), 0, CLI_DIT["input_size"])
        decoded.append(f32(images))                                   # (2, 3, 64, 64)
        uint8.append(i64(pixels))                                     # (2, 64, 64, 3)
    out.update({"cli.classes": classes, "cli.guide_rows": guide, "cli.decoded": torch.stack(decoded),
                "cli.uint8": torch.stack(uint8)})


def cli512_references(authors, diffusion, out):
    """What `sample.py --class-id CLI512_CLASS --ckpt <FineDiffusion-iNat-512.pt's layout> --num-samples 2 --steps 10
    --seed 0` must draw: the authors' sample.py at --image-size 512 (latent_size 64) with the CLI group's weights at
    64 x 64 latents (seeded_state does not depend on the size; pos_embed is the authors' own) and its VAE."""
    fine = load_seeded(authors.DiT(**{**CLI_DIT, "input_size": CLI512_LATENT}, num_classes=FINE_CLASSES,
                                   num_super_classes=FINE_SUPERCLASSES, class_dropout_prob=0.1, learn_sigma=True))
    vae = seeded_vae(config=CLI_VAE_CONFIG)
    c, k = i64([CLI512_CLASS]), CLI512_STRIDE
    latents, images, pixels = authors_sample(fine, vae, diffusion, i64([CLI512_CLASS] * 2), 0, CLI512_LATENT)
    assert images.shape == (2, 3, 512, 512), images.shape
    out.update({"cli512.classes": c, "cli512.guide_rows": guide_rows(fine, c), "cli512.latents": f32(latents),
                "cli512.decoded": f32(images[:, :, ::k, ::k]), "cli512.uint8": i64(pixels[:, ::k, ::k])})


# ----------------------------------------------------------------------------------------------------------
# 5. + 6. FID (pytorch-fid)
# ----------------------------------------------------------------------------------------------------------

def fid_references(out):
    import pytorch_fid.inception as fid_inception
    from pytorch_fid.fid_score import calculate_frechet_distance

    template = fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict()
    fid_inception.load_state_dict_from_url = lambda *a, **k: seeded_state(template)   # instead of the download
    net = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                    normalize_input=True, use_fid_inception=True).eval()
    images = torch.rand(3, 3, 32, 32, generator=gen(501))
    with torch.no_grad():
        features = net(images)[0]                  # [N, 2048, 1, 1]
    out["fid.images"], out["fid.features"] = images, f32(features.flatten(1))

    rng = np.random.default_rng(502)
    cases = {
        # full rank: 64 samples of 16 correlated features
        "full": [rng.standard_normal((64, 16)) @ rng.standard_normal((16, 16)) + rng.standard_normal(16)
                 for _ in range(2)],
        # fewer samples than dimensions: both covariances rank-deficient (scipy's sqrtm copes)
        "lowrank": [rng.standard_normal((n, 16)) for n in (6, 9)],
    }
    # Singular: 6 and 2 samples of integer-valued features (exact zeros in the product's Schur form), where
    # scipy's sqrtm(sigma1 sigma2) can come out non-finite, and then pytorch-fid's eps-offset fallback runs.
    # Whether sqrtm fails here hinges on round-off: it did on the machine that made the stored file, not with
    # the AVX2 (Haswell) OpenBLAS kernels of an AMD EPYC. So only this case may fall back, and the `fallback`
    # flag says whether it did (the tests read it).
    rng = np.random.default_rng(1)
    cases["singular"] = [rng.integers(-3, 4, size=(n, 16)).astype(np.float64) for n in (6, 2)]
    for name, (a, b) in cases.items():
        mu1, sigma1 = a.mean(axis=0), np.cov(a, rowvar=False)
        mu2, sigma2 = b.mean(axis=0), np.cov(b, rowvar=False)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            value = calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
        fell_back = "singular product" in printed.getvalue()
        assert not fell_back or name == "singular", (name, printed.getvalue())
        print(f"  Frechet distance, {name}: {value:.6f}" + (" (eps fallback ran)" if fell_back else ""))
        for k, v in dict(mu1=mu1, sigma1=sigma1, mu2=mu2, sigma2=sigma2, value=value).items():
            out[f"fid.fd.{name}.{k}"] = f64(v)
        out[f"fid.fd.{name}.fallback"] = i64(int(fell_back))


# ----------------------------------------------------------------------------------------------------------
# 7. LPIPS (lpips package)
# ----------------------------------------------------------------------------------------------------------

def lpips_references(out):
    import lpips
    from torchvision.models import alexnet

    net = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    # seeded AlexNet trunk in the published layout (alexnet-owt-7be5be79.pth: features.N.*) ...
    trunk = seeded_state({k: v for k, v in alexnet().state_dict().items() if k.startswith("features.")})
    own = net.state_dict()
    state = {}
    for key, value in trunk.items():
        index = key.split(".")[1]
        (target,) = [k for k in own if k.startswith("net.slice") and k.split(".")[2] == index
                     and k.endswith(key.split(".")[-1])]
        state[target] = value
    # ... and seeded linear heads under their published names (alex.pth: lin{i}.model.1.weight)
    lins = seeded_state({f"lin{i}.model.1.weight": own[f"lin{i}.model.1.weight"] for i in range(5)})
    state.update(lins)
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("scaling_layer.", "lins.")) for k in missing), missing
    assert all(torch.equal(net.lins[i].model[1].weight, lins[f"lin{i}.model.1.weight"]) for i in range(5))

    x = torch.rand(3, 3, 48, 48, generator=gen(701))
    y = torch.rand(3, 3, 48, 48, generator=gen(702))
    y[0] = (x[0] + 0.05 * torch.randn(3, 48, 48, generator=gen(703))).clamp(0, 1)   # a near pair too
    with torch.no_grad():
        d = net(x, y, normalize=True)              # [N, 1, 1, 1]
    out["lpips.x"], out["lpips.y"], out["lpips.distance"] = x, y, f32(d.flatten())


# ----------------------------------------------------------------------------------------------------------
# 8. KID, Inception Score, precision and recall (torch-fidelity); sFID (ADM's evaluator, written out)
# ----------------------------------------------------------------------------------------------------------

def torch_fidelity_references(out):
    import pytorch_fid.inception as fid_inception
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    # torch-fidelity's network with the seeded weights (the published key names, as pytorch-fid's)
    template = fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict()
    with tempfile.TemporaryDirectory() as folder:
        torch.save(seeded_state(template), os.path.join(folder, "seeded.pth"))
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=os.path.join(folder, "seeded.pth"))
    branch1x1 = []
    net.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, output: branch1x1.append(output))
    with torch.no_grad():
        pool, logits = net(torch.zeros(1, 3, 75, 75, dtype=torch.uint8))   # black: both scalings give -1
    spatial = branch1x1[0].permute(0, 2, 3, 1)[..., :7].reshape(1, -1)   # ADM: spatial[..., :7], reshape([N, -1])
    out.update({"metrics.net.pool": f32(pool), "metrics.net.logits": f32(logits), "metrics.net.spatial": f32(spatial)})

    # pool-feature-like features (non-negative, 64-d) of two sets that overlap in part, and logits of 100 images
    rng = np.random.default_rng(801)
    real = np.abs(rng.standard_normal((250, 64))).astype(np.float32)
    fake = (np.abs(rng.standard_normal((300, 64))) * 1.15 + 0.03).astype(np.float32)
    logits = (2 * rng.standard_normal((100, 1008)) + 6 * np.eye(1008)[rng.integers(0, 20, 100)]).astype(np.float32)
    f64t = lambda a: torch.from_numpy(a).double()   # KID in float64, as ours (torch-fidelity keeps their dtype)
    kid = kid_features_to_metric(f64t(fake), f64t(real), kid_subsets=100, kid_subset_size=100, verbose=False)
    kid_small = kid_features_to_metric(f64t(fake[:40]), f64t(real), kid_subset_size=40, verbose=False)
    isc = isc_features_to_metric(torch.from_numpy(logits))          # 10 splits, shuffled by rng_seed 2020
    prc = prc_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), verbose=False)   # (generated, real)
    values = lambda m, *keys: f64([m[k] for k in keys])
    out.update({"metrics.real": f32(torch.from_numpy(real)), "metrics.fake": f32(torch.from_numpy(fake)),
                "metrics.logits": f32(torch.from_numpy(logits)),
                "metrics.kid": values(kid, "kernel_inception_distance_mean", "kernel_inception_distance_std"),
                "metrics.kid_small": values(kid_small, "kernel_inception_distance_mean",
                                            "kernel_inception_distance_std"),
                "metrics.is": values(isc, "inception_score_mean", "inception_score_std"),
                "metrics.prc": values(prc, "precision", "recall")})

    # sFID of two sets of mixed_6/conv-like activations (NHWC, post-ReLU; a 3 x 3 grid of 9 channels keeps them small)
    a = np.maximum(rng.standard_normal((200, 3, 3, 9)), 0).astype(np.float32)
    b = np.maximum(1.2 * rng.standard_normal((150, 3, 3, 9)) + 0.1, 0).astype(np.float32)
    out.update({"metrics.sfid.a": f32(torch.from_numpy(a)), "metrics.sfid.b": f32(torch.from_numpy(b)),
                "metrics.sfid.value": f64(adm_sfid(a, b))})
    print(f"  KID {kid}, small {kid_small}\n  IS {isc}\n  PRC {prc}\n  sFID {float(out['metrics.sfid.value']):.6f}")


def adm_sfid(spatial_1, spatial_2):
    """ADM's evaluator on two batches of mixed_6/conv activations (NHWC, float32 as its TF graph gives them):
    _create_feature_graph's spatial[..., :7], compute_activations' reshape([N, -1]), compute_statistics (np.mean of
    the float32 activations, np.cov) and FIDStatistics.frechet_distance, line for line."""
    from scipy import linalg
    stats = []
    for spatial in (spatial_1, spatial_2):
        spatial = spatial[..., :7]
        activations = spatial.reshape([spatial.shape[0], -1])
        stats.append((np.mean(activations, axis=0), np.cov(activations, rowvar=False)))
    (mu1, sigma1), (mu2, sigma2) = stats
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)     # scipy 1.16+ deprecates disp, unchanged otherwise
        covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    assert np.isfinite(covmean).all()             # ADM's eps fallback is pytorch-fid's (pinned in 6.): not needed here
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


# ----------------------------------------------------------------------------------------------------------

def keep_earlier(out, path):
    """Replace this run's tensors by those of the file `path` of the same name, after printing how far apart they
    are. Another CPU's kernels change the last bits of most values (and where sqrtm fails, see fid_references):
    keeping the earlier bytes lets a new group be added without rewriting the groups the tests already pin."""
    from safetensors.torch import load_file
    earlier = load_file(path)
    same, differ = [], []
    for k in sorted(earlier.keys() & out.keys()):
        a, b = out[k], earlier[k]
        if a.dtype != b.dtype or a.shape != b.shape:
            sys.exit(f"--keep {path}: {k} is {b.dtype} {tuple(b.shape)} there, {a.dtype} {tuple(a.shape)} here")
        (same if torch.equal(a, b) else differ).append(k)
    print(f"--keep {path}: {len(same)} tensors equal bit for bit, {len(differ)} differ (kept as they were):")
    for k in differ:
        d = (out[k].double() - earlier[k].double()).abs().max().item()
        largest = earlier[k].double().abs().max().item()
        print(f"  {k:<32} max |difference| {d:.3g}, {d / largest:.3g} of its largest value")
    for k in sorted(earlier.keys() - out.keys()):
        print(f"  {k}: no longer made, dropped")
    print(f"  new: {', '.join(sorted(out.keys() - earlier.keys())) or 'none'}")
    out.update({k: earlier[k] for k in same + differ})


def main(argv=None):
    p = argparse.ArgumentParser(description="regenerate tools/reference_values.safetensors (see the module docstring)")
    p.add_argument("--dit-repo", required=True, help="checkout of facebookresearch/DiT")
    p.add_argument("--finediffusion-repo", required=True, help="checkout of FineDiffusion/FineDiffusion")
    p.add_argument("--out", default=os.path.join(REPO, "tools", "reference_values.safetensors"))
    p.add_argument("--skip-source-check", action="store_true", help="accept other versions of the official files")
    p.add_argument("--keep", help="an earlier values file: its tensors are kept byte for byte where this run makes "
                                  "the same names (how far this run's values are from them is printed first)")
    args = p.parse_args(argv)
    if not args.skip_source_check:
        check_sources(dict(dit=args.dit_repo, finediffusion=args.finediffusion_repo))

    import diffusers
    import lpips
    import pytorch_fid
    import safetensors
    import scipy
    import timm
    import torch_fidelity
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    torch.manual_seed(0)
    models = load_module("dit_official_models", os.path.join(args.dit_repo, "models.py"))
    diffusion = load_module("dit_official_diffusion", os.path.join(args.dit_repo, "diffusion", "__init__.py"),
                            os.path.join(args.dit_repo, "diffusion"))
    try:
        import turtle  # noqa: F401  (the authors' models.py starts with an unused `from turtle import shape`)
    except ImportError:  # a Python built without tkinter: an empty stand-in is enough
        sys.modules["turtle"] = types.SimpleNamespace(shape=None)
    authors = load_module("finediffusion_authors_models", os.path.join(args.finediffusion_repo, "models.py"))

    out = {}
    print("1. DiT")
    dit = dit_references(models, out)
    fine = fine_references(authors, out)
    print("2. diffusion")
    diffusion_references(diffusion, dit, out)
    dpm_solver_references(dit, out)
    dpm_sde_references(dit, out)
    print("3.-4. VAE, end-to-end sampling")
    vae = vae_references(out)
    end_to_end_references(fine, vae, diffusion, out)
    cli_references(authors, diffusion, out)
    cli512_references(authors, diffusion, out)
    print("5.-6. FID")
    fid_references(out)
    print("7. LPIPS")
    lpips_references(out)
    print("8. KID, IS, precision/recall (torch-fidelity), sFID (ADM)")
    torch_fidelity_references(out)

    for k, v in out.items():
        assert v.dtype in (torch.float32, torch.float64, torch.int64), (k, v.dtype)
        assert torch.isfinite(v.double()).all(), k
    if args.keep:
        keep_earlier(out, args.keep)
    versions = dict(torch=torch.__version__, numpy=np.__version__, scipy=scipy.__version__,
                    diffusers=diffusers.__version__, pytorch_fid=pytorch_fid.__version__,
                    lpips=getattr(lpips, "__version__", "0.1.4"), safetensors=safetensors.__version__,
                    timm=timm.__version__, torch_fidelity=torch_fidelity.__version__)
    # One metadata entry: safetensors writes a metadata dict in hash order, which would break byte-identity.
    metadata = {"source": f"tools/make_references.py; facebookresearch/DiT {DIT_COMMIT}; FineDiffusion/FineDiffusion "
                          f"{FINEDIFFUSION_COMMIT}; " + ", ".join(f"{k} {v}" for k, v in versions.items())}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(out.items())}, args.out, metadata=metadata)
    with open(args.out, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print(f"wrote {args.out}: {len(out)} tensors, {os.path.getsize(args.out)} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()

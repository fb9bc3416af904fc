"""Generate images of one fine-grained class with fine-grained classifier-free guidance (paper §3.2.2).

    python sample.py --class-id 4021                                   # newest checkpoint under results/
    python sample.py --ckpt FineDiffusion-iNat.pt --vae pretrained/sd-vae-ft-ema --class-id 4021
    python sample.py --class-name "disc/striped" --guidance null --cfg-scale 4 --sampler ddim --steps 50

Each sampling step runs the DiT on [x_t; x_t] with labels [c; guide] and mixes the two predictions (eq. 1):
    eps = eps(x_t | guide) + w * (eps(x_t | c) - eps(x_t | guide)),
where the guide is the class's superclass row (`--guidance superclass`, the paper's), the null row
(`--guidance null`, standard CFG) or nothing (`--guidance none`: one plain conditional prediction).
Defaults are the paper's (§4.2): 250 DDPM steps, w = 4.0. Latent models decode through the SD VAE.
"""
import argparse
import os
import sys
from contextlib import nullcontext

import torch
from torchvision.utils import make_grid

from diffusion import create_diffusion
from model import LATENT_SCALE, VAE_URL, AutoencoderKL, CheckpointError, atomic_write, latest_checkpoint, load_model


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


def find_checkpoint(path=None):
    """--ckpt as given (a run folder means its newest checkpoint), else the newest under results/."""
    if path and not os.path.isdir(path):
        return path
    found = latest_checkpoint(path or "results")
    if found is None:
        raise UsageError(f"no checkpoint {'in ' + path if path else 'given and none under results/'}: train one "
                         "(python train.py --data toy, see README) or download the authors' FineDiffusion-iNat.pt "
                         "(https://finediffusion.github.io/) and pass --ckpt PATH")
    return found


def resolve_class(hierarchy, num_classes, class_id=None, class_name=None):
    """A class id from --class-id or --class-name, checked against the checkpoint's classes."""
    if class_name is not None:
        names = (hierarchy or {}).get("class_names")
        if not names:
            raise UsageError("this checkpoint carries no class names: use --class-id")
        exact = [i for i, n in enumerate(names) if n.lower() == class_name.lower()]
        matches = exact or [i for i, n in enumerate(names) if class_name.lower() in n.lower()]
        if len(matches) != 1:
            some = ", ".join(names[i] for i in matches[:5])
            raise UsageError(f"--class-name {class_name!r} matches {len(matches)} classes{': ' + some if some else ''}")
        return matches[0]
    if class_id is None or not 0 <= class_id < num_classes:
        raise UsageError(f"--class-id must be in [0, {num_classes}) for this checkpoint, got {class_id}")
    return class_id


def guide_labels(model, y, guidance):
    """Label-table rows of the guide half: superclass rows (eq. 1) or the null row (standard CFG)."""
    emb = model.y_embedder
    if guidance == "superclass":
        if not emb.num_superclasses:
            raise UsageError("this checkpoint has no superclass rows: use --guidance null")
        return emb.superclass_ids(y)
    if not emb.null_class:
        raise UsageError("this checkpoint has no null row (FineDiffusion tables are K+S rows): use --guidance superclass")
    return torch.full_like(y, emb.null_id)


@torch.no_grad()
def sample_images(model, y, guidance="superclass", cfg_scale=4.0, sampler="ddpm", steps=250, vae=None,
                  seed=0, device="cpu", precision="fp32", guide_all_channels=False, progress=True):
    """Images of classes y (N,) as uint8 (N, H, W, 3). The noise comes from `seed`, as DiT's sampler."""
    model = model.to(device).eval()
    y = torch.as_tensor(y, device=device)
    diffusion = create_diffusion(f"ddim{steps}" if sampler == "ddim" else str(steps), learn_sigma=model.learn_sigma)
    latent = int(model.pos_embed.shape[1] ** 0.5) * model.patch_size
    torch.manual_seed(seed)             # as DiT's sample.py: x_T, then each step's noise, from one stream
    z = torch.randn(len(y), model.in_channels, latent, latent, device=device)   # (n, C, h, w)
    guided = guidance != "none" and cfg_scale != 1.0
    if guided:
        z = torch.cat([z, z], dim=0)                          # (2n, C, h, w): [conditional; guide]
        kwargs = dict(y=torch.cat([y, guide_labels(model, y, guidance)]), cfg_scale=cfg_scale,
                      guide_channels=None if guide_all_channels else 3)
        net = model.forward_with_cfg
    else:
        kwargs, net = dict(y=y), model.forward
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype) if dtype else nullcontext()

    def eps_model(x, t, **kw):
        with autocast:
            return net(x, t, **kw).float()                    # the diffusion math stays in fp32

    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    x = loop(eps_model, z.shape, z, clip_denoised=False, model_kwargs=kwargs, progress=progress, device=device)
    x = x[: len(y)]                                            # drop the guide half
    if model.in_channels == 4:
        if vae is None:
            raise UsageError("a latent DiT needs the SD VAE to decode: pass --vae")
        with autocast:
            x = vae.to(device).decode(x / LATENT_SCALE).float()
    return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8)  # (N, H, W, 3)


def load_vae(path):
    if path is None:
        raise UsageError(f"this DiT works on SD-VAE latents: download config.json and diffusion_pytorch_model.safetensors "
                         f"from {VAE_URL} into a folder and pass it with --vae")
    try:
        return AutoencoderKL.from_pretrained(path).eval()
    except CheckpointError as e:
        raise UsageError(str(e)) from None


def save_png(images, path, nrow=4):
    """Atomic write of a grid of uint8 (N, H, W, 3) images."""
    from PIL import Image
    grid = make_grid(images.permute(0, 3, 1, 2), nrow=nrow, padding=2, pad_value=255)  # (3, H', W')
    atomic_write(path, lambda f: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, format="PNG"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--class-id", type=int, help="class to draw (label-table row in [0, K))")
    who.add_argument("--class-name", help="class to draw, by (part of) its name in the checkpoint's hierarchy")
    p.add_argument("--ckpt", help="checkpoint (ours, official DiT or the authors') or a run folder; "
                                  "default: the newest under results/")
    p.add_argument("--base", help="base checkpoint of a delta checkpoint, if not where training found it")
    p.add_argument("--vae", help="SD VAE folder or file (sd-vae-ft-ema / -mse), for latent models")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--guidance", choices=["superclass", "null", "none"], default="superclass")
    p.add_argument("--guide-all-channels", action="store_true",
                   help="guide all eps channels (the official release guides the first 3 only)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples/sample.png", help="PNG grid to write")
    p.add_argument("--per-sample-dir", help="also write one PNG per sample into this folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.num_samples < 1 or args.steps < 1:
        raise UsageError("--num-samples and --steps must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA GPU here; use --device cpu")
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        raise UsageError("--precision fp16 is for CUDA GPUs; on a CPU use fp32 or bf16")
    ckpt = find_checkpoint(args.ckpt)
    try:
        model, info = load_model(ckpt, base=args.base)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    hierarchy = info["hierarchy"]
    cls = resolve_class(hierarchy, model.y_embedder.num_classes, args.class_id, args.class_name)
    vae = load_vae(args.vae or (info["args"] or {}).get("vae")) if model.in_channels == 4 else None
    names = (hierarchy or {}).get("class_names")
    what = f"class {cls}" + (f" ({names[cls]})" if names else "")
    if hierarchy and args.guidance == "superclass":
        s = hierarchy["superclass_of"][cls]
        what += f", guided by superclass {s} ({hierarchy['superclass_names'][s]})"
    print(f"sampling {args.num_samples} x {what} from {ckpt}", file=sys.stderr)
    images = sample_images(model, [cls] * args.num_samples, args.guidance, args.cfg_scale, args.sampler, args.steps,
                           vae, args.seed, args.device, args.precision, args.guide_all_channels)
    save_png(images, args.out)
    if args.per_sample_dir:
        os.makedirs(args.per_sample_dir, exist_ok=True)
        for i, img in enumerate(images):
            save_png(img[None], os.path.join(args.per_sample_dir, f"{cls:05d}_{i:04d}.png"), nrow=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

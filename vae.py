"""The Stable Diffusion VAE (AutoencoderKL) that latent DiTs work in (LDM, Rombach et al. 2022).

DiT trains and samples on SD-VAE latents: `sd-vae-ft-ema` (or `-mse`) maps 3 x H x W images in [-1, 1] to
(4, H/8, W/8) diagonal Gaussians, latents scaled by 0.18215 to unit variance. A port, module for module and key for
key (module and attribute names as diffusers'), of diffusers' AutoencoderKL, so the published
`diffusion_pytorch_model.safetensors` (or `.bin`) loads without renaming; a separate published model, as LDM keeps
its autoencoder apart from the diffusion model. AutoencoderKL's docstring shows its use.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from hardening import PUBLISHED, UserError, file_sha256, find_file, load_strict, read_json, read_tensors, vae_settings

# SD-VAE latents times 0.18215 have unit variance (LDM, Rombach et al. 2022); DiT trains on the scaled latents. A
# VAE's config.json says its own (`scaling_factor`); this is the default where it does not.
LATENT_SCALE = 0.18215


class VAEResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice, plus a residual (1x1 conv when the width changes). No time embedding."""
    def __init__(self, cin, cout, groups=32, eps=1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps, affine=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):                                  # (B, cin, H, W)
        h = self.conv1(F.silu(self.norm1(x)))              # (B, cout, H, W)
        h = self.conv2(F.silu(self.norm2(h)))              # (dropout is 0 in the SD VAE)
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h     # output_scale_factor 1


class VAEAttention(nn.Module):
    """Single-head self-attention over the H*W positions, with linear q/k/v/out projections over channels."""
    def __init__(self, c, groups=32, eps=1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=eps, affine=True)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])    # a list so that the key is 'to_out.0' as in diffusers

    def forward(self, x):                                  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)          # (B, HW, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)                # (B, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v)                       # softmax(q k^T / sqrt(C)) v
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)         # (B, C, H, W)
        return x + h                                                      # residual, rescale factor 1


class VAEMidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""
    def __init__(self, c, groups):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnetBlock(c, c, groups), VAEResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([VAEAttention(c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class VAEResample(nn.Module):
    """down: asymmetric zero pad (right and bottom only), then a stride-2 3x3 conv: H x W -> H/2 x W/2 exactly.
    up: nearest-neighbour 2x, then a 3x3 conv."""
    def __init__(self, c, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0) if down else nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VAEBlock(nn.Sequential):
    """diffusers' DownEncoderBlock2D (down) or UpDecoderBlock2D, run in order: `n` resnets, then, if `resample` (all
    blocks but the last, which has no such keys at all), a VAEResample under diffusers' name, down- or upsamplers."""
    def __init__(self, cin, cout, n, groups, down, resample):
        super().__init__()
        self.resnets = nn.Sequential(*[VAEResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        if resample:
            self.add_module("downsamplers" if down else "upsamplers", nn.Sequential(VAEResample(cout, down)))


class VAEEncoder(nn.Module):
    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        chs = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.Sequential(*[
            VAEBlock(chs[max(i - 1, 0)], c, layers_per_block, groups, down=True, resample=i < len(chs) - 1)
            for i, c in enumerate(chs)])
        self.mid_block = VAEMidBlock(chs[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], out_channels, 3, padding=1)

    def forward(self, x):                                  # (B, 3, H, W)
        x = self.mid_block(self.down_blocks(self.conv_in(x)))    # the blocks halve H, W in all but the last
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2*latent, H/f, W/f)


class VAEDecoder(nn.Module):
    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        rev = list(reversed(block_out_channels))           # the decoder walks the widths back up: 512, 512, 256, 128
        self.conv_in = nn.Conv2d(in_channels, rev[0], 3, padding=1)
        self.mid_block = VAEMidBlock(rev[0], groups)
        self.up_blocks = nn.Sequential(*[
            VAEBlock(rev[max(i - 1, 0)], c, layers_per_block + 1, groups, down=False, resample=i < len(rev) - 1)
            for i, c in enumerate(rev)])
        self.conv_norm_out = nn.GroupNorm(groups, rev[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rev[-1], out_channels, 3, padding=1)

    def forward(self, z):                                  # (B, latent, h, w)
        x = self.up_blocks(self.mid_block(self.conv_in(z)))      # the blocks double H, W in all but the last
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 3, H, W)


# Old diffusers uploads (e.g. the .bin files) name the mid-block attention with its deprecated names.
_VAE_OLD_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_VAE_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_VAE_HELP = f"the SD VAE is published at {PUBLISHED['sd-vae-ft-ema']}"


def convert_vae_state_dict(sd):
    """Map deprecated attention names (query/key/value/proj_attn) to to_q/to_k/to_v/to_out.0, squeeze
    1x1-conv-shaped (C, C, 1, 1) projection weights to Linear (C, C), and cast floating tensors to float32."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if ".attentions." in k and len(parts) >= 2 and parts[-2] in _VAE_OLD_ATTN_NAMES:
            k = ".".join(parts[:-2] + [_VAE_OLD_ATTN_NAMES[parts[-2]], parts[-1]])
        if ".attentions." in k and k.endswith(".weight") and v.dim() == 4 and v.shape[2:] == (1, 1) \
                and any(f".{n}." in k for n in ("to_q", "to_k", "to_v", "to_out.0")):
            v = v[:, :, 0, 0]                              # conv1x1 weight == Linear weight
        out[k] = v.float() if v.is_floating_point() else v
    return out


def vae_weights_file(path):
    """The weights file of a VAE given as a file, a diffusers folder, or a pipeline folder with vae/."""
    named = os.path.basename(os.path.normpath(path))
    path = find_file(path, published=named if named in ("sd-vae-ft-ema", "sd-vae-ft-mse") else "sd-vae-ft-ema")
    for file in [path] + [os.path.join(d, name) for d in (path, os.path.join(path, "vae")) for name in _VAE_FILES]:
        if os.path.isfile(file):
            return file
    raise UserError(f"no {' or '.join(_VAE_FILES)} in {path}; {_VAE_HELP}")


class AutoencoderKL(nn.Module):
    """The Stable Diffusion VAE: 3 x H x W images in [-1, 1] <-> latent x H/8 x W/8 diagonal Gaussians.

    Latent scaling is the caller's job, as in Stable Diffusion and DiT, by the VAE's own `scaling_factor` (its
    config's; 0.18215 for the SD VAEs, 0.13025 for SDXL's):
        z = scaled_latent(*vae.encode(x), vae.scaling_factor)       # 0.18215 * (mean + sigma * eps)
        x = vae.decode(z / vae.scaling_factor)
    """
    def __init__(self, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                 layers_per_block=2, norm_num_groups=32, scaling_factor=LATENT_SCALE):
        super().__init__()
        self.config = dict(in_channels=in_channels, out_channels=out_channels, latent_channels=latent_channels,
                           block_out_channels=list(block_out_channels), layers_per_block=layers_per_block,
                           norm_num_groups=norm_num_groups, scaling_factor=scaling_factor)
        self.scaling_factor = scaling_factor
        self.weights_file = None                           # set by from_pretrained: the VAE's identity
        shape = block_out_channels, layers_per_block, norm_num_groups
        # the encoder predicts mean and log-variance, hence 2 * latent channels
        self.encoder = VAEEncoder(in_channels, 2 * latent_channels, *shape)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = VAEDecoder(latent_channels, out_channels, *shape)

    @classmethod
    def from_config(cls, config, source="VAE config"):
        """Build from a diffusers config.json dict (keys other than the constructor's are ignored, each field checked);
        under torch.device("meta") nothing is allocated, as from_pretrained builds it."""
        return cls(**vae_settings(config, source))

    def encode(self, x):                                   # (B, 3, H, W), in [-1, 1]
        moments = self.quant_conv(self.encoder(x))         # (B, 2*latent, H/8, W/8)
        mean, logvar = moments.chunk(2, dim=1)             # (B, latent, H/8, W/8) each
        return mean, logvar.clamp(-30.0, 20.0)             # clamp as diffusers/LDM, so exp() stays finite

    def decode(self, z):                                   # (B, latent, h, w) (already divided by the scale)
        return self.decoder(self.post_quant_conv(z))       # (B, 3, 8h, 8w), roughly in [-1, 1]

    def check_fits(self, in_channels, image_size):
        """Refuse, before any step, a VAE whose latents are not the DiT's: `in_channels` latents 8x smaller than its
        `image_size` px images (else: images of the wrong size, or a failure at decode after all the sampling steps)."""
        factor = 2 ** (len(self.config["block_out_channels"]) - 1)
        channels = self.config["latent_channels"]
        if channels != in_channels or factor != 8 or image_size % factor:
            raise UserError(f"the VAE {self.weights_file or ''} does not fit this DiT: it makes {channels}-channel "
                            f"latents {factor}x smaller than the image; the DiT takes {in_channels}-channel latents "
                            f"8x smaller than its {image_size} px images")

    def identity(self):
        """What checkpoints, latent caches and samples record of the VAE: its config (its latent scale included) and
        the sha256 of its weights."""
        return dict(sha256=file_sha256(self.weights_file) if self.weights_file else None, config=self.config)

    def load_vae_state_dict(self, sd, source="checkpoint"):
        """Strict load (old attention names accepted) with one-line errors naming the tensor."""
        sd = convert_vae_state_dict(sd)
        if any(k.startswith(("first_stage_model.", "encoder.down.", "decoder.up.")) for k in sd):
            raise UserError(f"{source}: this is an original CompVis/LDM-layout VAE, not the diffusers layout; "
                            + _VAE_HELP)
        try:
            load_strict(self, sd, source, assign=True)          # a VAE built on "meta" takes the file's tensors
        except UserError as e:
            raise UserError(f"{e} - is this an SD VAE in the diffusers layout, with its config.json?") from None
        return self

    @classmethod
    def from_pretrained(cls, path="sd-vae-ft-ema"):
        """The one VAE loader. `path`: a diffusers folder (config.json + diffusion_pytorch_model.safetensors or
        .bin; a pipeline folder's vae/ works too) or a weights file (a diffusers config.json beside it is used;
        none: the SD defaults), looked up as given, then under pretrained/. Never downloads."""
        file = vae_weights_file(path)
        config, cfg_path = {}, os.path.join(os.path.dirname(file), "config.json")
        if os.path.isfile(cfg_path):
            cfg = read_json(cfg_path, "VAE config")
            # beside a bare file, only take a config that is a VAE's (not, say, a training run's)
            if os.path.basename(file) in _VAE_FILES or not isinstance(cfg, dict) or \
                    cfg.get("_class_name") == "AutoencoderKL" or "latent_channels" in cfg:
                config = cfg
        sd = read_tensors(file)
        with torch.device("meta"):                          # sizes from the config cost nothing until they fit
            vae = cls.from_config(config, cfg_path)
        vae = vae.load_vae_state_dict(sd, source=file).eval()
        vae.weights_file = file
        return vae


def scaled_latent(mean, logvar, scale):
    """z = scale * (mean + exp(logvar / 2) * eps): one draw from the VAE posterior, scaled (0.18215 for the SD VAE)
    as DiT trains on it."""
    return scale * (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))


def latent_scale(identity):
    """The latent scale a VAE identity (AutoencoderKL.identity) records; 0.18215 where the record predates it."""
    return identity["config"].get("scaling_factor", LATENT_SCALE)


def same_vae(a, b):
    """Are two VAE identities the same VAE (weights and config, a record without a latent scale read as 0.18215)?"""
    fill = lambda v: dict(v, config=dict(v["config"], scaling_factor=latent_scale(v)))
    return fill(a) == fill(b)

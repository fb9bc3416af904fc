# Tests for the Stable Diffusion VAE and the safetensors reader (to be merged into test_all.py).
import json
import os

import pytest
import torch

from model import AutoencoderKL, CheckpointError, load_safetensors, sample_latent, save_safetensors

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, latent_channels=4)


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(**TINY).eval()


def write_folder(folder, state, fmt="safetensors", config=TINY):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "AutoencoderKL", "act_fn": "silu", **config}, f)  # extra keys are ignored
    if fmt == "safetensors":
        save_safetensors(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(state, os.path.join(folder, "diffusion_pytorch_model.bin"))
    return folder


def encode_mean(vae, seed=1):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        return vae.encode(x)[0]


def test_vae_tiny_encode_decode_shapes():
    vae = tiny_vae()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        assert mean.shape == logvar.shape == (1, 4, 16, 16)  # downscale 2^(len(blocks)-1) = 2
        assert logvar.min() >= -30 and logvar.max() <= 20
        z = sample_latent(mean, logvar, torch.Generator().manual_seed(0))
        assert z.shape == mean.shape
        assert vae.decode(z).shape == (1, 3, 32, 32)


def test_vae_sd_default_keys_and_parameter_count_match_published():
    with torch.device("meta"):  # the 84M-parameter model's structure without allocating it
        vae = AutoencoderKL()
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert len(shapes) == 248
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    published = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down_blocks.0.resnets.0.norm1.weight": (128,),
        "encoder.down_blocks.0.resnets.1.conv2.bias": (128,),
        "encoder.down_blocks.0.downsamplers.0.conv.weight": (128, 128, 3, 3),
        "encoder.down_blocks.1.resnets.0.conv1.weight": (256, 128, 3, 3),
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1),
        "encoder.down_blocks.2.resnets.0.conv_shortcut.bias": (512,),
        "encoder.down_blocks.2.downsamplers.0.conv.weight": (512, 512, 3, 3),
        "encoder.down_blocks.3.resnets.1.norm2.bias": (512,),
        "encoder.mid_block.resnets.0.conv1.weight": (512, 512, 3, 3),
        "encoder.mid_block.attentions.0.group_norm.weight": (512,),
        "encoder.mid_block.attentions.0.to_q.weight": (512, 512),
        "encoder.mid_block.attentions.0.to_k.bias": (512,),
        "encoder.mid_block.attentions.0.to_v.weight": (512, 512),
        "encoder.mid_block.attentions.0.to_out.0.weight": (512, 512),
        "encoder.mid_block.resnets.1.conv2.weight": (512, 512, 3, 3),
        "encoder.conv_norm_out.weight": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.mid_block.attentions.0.to_out.0.bias": (512,),
        "decoder.up_blocks.0.resnets.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up_blocks.0.upsamplers.0.conv.weight": (512, 512, 3, 3),
        "decoder.up_blocks.1.resnets.0.conv1.weight": (512, 512, 3, 3),
        "decoder.up_blocks.2.resnets.0.conv1.weight": (256, 512, 3, 3),
        "decoder.up_blocks.2.resnets.0.conv_shortcut.weight": (256, 512, 1, 1),
        "decoder.up_blocks.2.upsamplers.0.conv.bias": (256,),
        "decoder.up_blocks.3.resnets.0.conv_shortcut.weight": (128, 256, 1, 1),
        "decoder.up_blocks.3.resnets.2.norm1.weight": (128,),
        "decoder.conv_norm_out.bias": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for k, shape in published.items():
        assert shapes.get(k) == shape, k
    absent = ["encoder.down_blocks.3.downsamplers.0.conv.weight", "decoder.up_blocks.3.upsamplers.0.conv.weight",
              "encoder.down_blocks.0.resnets.0.conv_shortcut.weight", "decoder.up_blocks.0.resnets.0.conv_shortcut.weight",
              "encoder.mid_block.attentions.0.query.weight"]
    assert not any(k in shapes for k in absent)


def test_vae_safetensors_folder_roundtrip_gives_identical_encode(tmp_path):
    vae = tiny_vae()
    loaded = AutoencoderKL.from_pretrained(write_folder(tmp_path / "vae", vae.state_dict()))
    assert torch.equal(encode_mean(loaded), encode_mean(vae))


def test_vae_bin_folder_and_file_roundtrip_gives_identical_encode(tmp_path):
    vae = tiny_vae()
    folder = write_folder(tmp_path / "vae", vae.state_dict(), fmt="bin")
    for path in (folder, folder / "diffusion_pytorch_model.bin"):  # a bare file uses the config.json beside it
        assert torch.equal(encode_mean(AutoencoderKL.from_pretrained(path)), encode_mean(vae))


def test_vae_old_attention_names_with_conv_shapes_load_identically(tmp_path):
    vae = tiny_vae()
    old = {}
    for k, v in vae.state_dict().items():
        for new, dep in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k, v = k.replace(f".{new}.", f".{dep}."), (v[:, :, None, None] if v.dim() == 2 else v)
        old[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    assert old["encoder.mid_block.attentions.0.query.weight"].shape == (64, 64, 1, 1)
    loaded = AutoencoderKL.from_pretrained(write_folder(tmp_path / "vae", old, fmt="bin"))
    assert torch.equal(encode_mean(loaded), encode_mean(vae))


def test_safetensors_half_precision_roundtrip_is_exact(tmp_path):
    t = {"bf": torch.randn(3, 5).bfloat16(), "f16": torch.randn(7).half(), "i64": torch.arange(4),
         "u8": torch.arange(6, dtype=torch.uint8).view(2, 3), "scalar": torch.tensor(2.5, dtype=torch.float64)}
    save_safetensors(t, tmp_path / "t.safetensors", metadata={"format": "pt"})
    raw = open(tmp_path / "t.safetensors", "rb").read()
    assert (8 + int.from_bytes(raw[:8], "little")) % 8 == 0  # header padded to 8 bytes, as the format asks
    back = load_safetensors(tmp_path / "t.safetensors")
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k]), k


def test_vae_half_precision_weights_load_as_float32(tmp_path):
    vae = tiny_vae()
    half = {k: v.bfloat16() for k, v in vae.state_dict().items()}
    loaded = AutoencoderKL.from_pretrained(write_folder(tmp_path / "vae", half))
    w = loaded.encoder.conv_in.weight
    assert w.dtype == torch.float32 and torch.equal(w, vae.encoder.conv_in.weight.bfloat16().float())


def test_vae_shape_mismatch_error_names_key_and_both_shapes(tmp_path):
    sd = tiny_vae().state_dict()
    sd["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    with pytest.raises(CheckpointError, match=r"quant_conv\.weight.*\[8, 8, 3, 3\].*\[8, 8, 1, 1\]"):
        AutoencoderKL.from_pretrained(write_folder(tmp_path / "vae", sd))


def test_vae_missing_and_unexpected_keys_are_named(tmp_path):
    sd = tiny_vae().state_dict()
    del sd["decoder.conv_out.bias"]
    with pytest.raises(CheckpointError, match=r"missing tensor 'decoder\.conv_out\.bias'"):
        AutoencoderKL(**TINY).load_vae_state_dict(sd)
    sd = {**tiny_vae().state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'extra\.weight'"):
        AutoencoderKL(**TINY).load_vae_state_dict(sd)


class NotATensor:  # stands in for arbitrary code a malicious pickle could run
    pass


def test_vae_bin_with_pickled_object_is_refused(tmp_path):
    sd = {**tiny_vae().state_dict(), "payload": NotATensor()}
    folder = write_folder(tmp_path / "vae", sd, fmt="bin")
    with pytest.raises(CheckpointError, match="refusing"):
        AutoencoderKL.from_pretrained(folder)


def test_vae_missing_path_error_points_to_published_files(tmp_path):
    with pytest.raises(CheckpointError, match="sd-vae-ft-ema") as e:
        AutoencoderKL.from_pretrained(tmp_path / "no_such_vae")
    assert "no_such_vae" in str(e.value) and "\n" not in str(e.value)


def test_vae_from_config_ignores_other_keys():
    vae = AutoencoderKL.from_config({"_class_name": "AutoencoderKL", "sample_size": 256, "act_fn": "silu", **TINY,
                                     "scaling_factor": 0.13025})
    assert vae.scaling_factor == 0.13025 and len(vae.encoder.down_blocks) == 2

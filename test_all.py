"""The FineDiffusion test suite: a specification of behaviour, one idea per test.

    python -m pytest -q test_all.py

Everything runs on a CPU in minutes: tiny DiTs (DiT-T), tiny VAEs, the built-in toy data, few steps.
No weights are downloaded: loading code is tested on files the tests write in the published layouts.
"""
import argparse
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from diffusion import create_diffusion, space_timesteps  # noqa: E402
from model import (DiT_models, CheckpointError, build_model, dit_config_from_state, is_trainable,  # noqa: E402
                   load_model, load_pretrained, set_trainable, count_table2)


def run_script(*args, cwd=HERE, timeout=600):
    """Run one of the project's scripts as a user would; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *words):
    """A user mistake: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w.lower() in err.lower(), err


def tiny_dit(**kw):
    """A DiT-T/2 over 16x16 pixels: 16 classes in 4 superclasses."""
    kw = {**dict(input_size=16, in_channels=3, num_classes=16, num_superclasses=4,
                 superclass_of=[c // 4 for c in range(16)], null_class=False, norm_affine=True), **kw}
    torch.manual_seed(0)
    return DiT_models["DiT-T/2"](**kw)


def randomize(model, seed=1):
    """Break adaLN-Zero's zero init, so outputs depend on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


# ------------------------------------------------------------------------------------------------------------
# model.py — parameter counts (paper Table 2) and trainable masks
# ------------------------------------------------------------------------------------------------------------

def test_table2_counts_match_the_paper():
    counts = {m: (trainable, total) for m, trainable, total in count_table2()}
    full = counts["full"][1]
    assert round(full / 1e6, 1) == 685.2 and counts["full"][0] == full
    assert round(counts["bitfit"][0] / 1e6, 2) == 12.01
    assert round(counts["difffit"][0] / 1e6, 2) == 12.14
    assert round(counts["finediffusion"][0] / 1e6, 2) == 12.15
    assert round(100 * counts["finediffusion"][0] / full, 2) == 1.77


def test_official_dit_xl2_has_the_published_parameter_count_and_keys():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    expected = {"pos_embed": (1, 256, 1152), "x_embedder.proj.weight": (1152, 4, 2, 2),
                "t_embedder.mlp.0.weight": (1152, 256), "t_embedder.mlp.2.weight": (1152, 1152),
                "y_embedder.embedding_table.weight": (1001, 1152), "blocks.27.attn.qkv.weight": (3456, 1152),
                "blocks.0.attn.proj.bias": (1152,), "blocks.0.mlp.fc1.weight": (4608, 1152),
                "blocks.0.mlp.fc2.weight": (1152, 4608), "blocks.0.adaLN_modulation.1.weight": (6912, 1152),
                "final_layer.linear.weight": (32, 1152), "final_layer.adaLN_modulation.1.weight": (2304, 1152)}
    for k, shape in expected.items():
        assert tuple(state[k].shape) == shape, k
    assert not any(".norm" in k for k in state)              # the official DiT has no LayerNorm affine


@pytest.mark.parametrize("method", ["full", "bitfit", "difffit", "finediffusion"])
def test_trainable_mask_is_exactly_what_the_method_names(method):
    model = build_model("DiT-T/2", 16, 16, 4, method, pixel_space=True)
    set_trainable(model, method)
    for name, p in model.named_parameters():
        kind = ("fixed" if name == "pos_embed" else "table" if name == "y_embedder.embedding_table.weight"
                else "norm" if ".norm" in name else "gate" if "gamma" in name
                else "bias" if name.endswith(".bias") else "weight")
        allowed = dict(full={"table", "norm", "gate", "bias", "weight"}, bitfit={"table", "bias"},
                       difffit={"table", "norm", "gate", "bias"}, finediffusion={"table", "norm", "bias"})[method]
        assert p.requires_grad == (kind in allowed), (method, name)


def test_finediffusion_table_has_subclass_and_superclass_rows_and_no_null():
    model = build_model("DiT-T/2", 16, 16, 4, "finediffusion", pixel_space=True)
    assert model.y_embedder.embedding_table.weight.shape[0] == 16 + 4
    assert build_model("DiT-T/2", 16, 16, 4, "bitfit", pixel_space=True).y_embedder.embedding_table.weight.shape[0] == 17


def test_difffit_gates_start_at_one():
    model = build_model("DiT-T/2", 16, 16, 4, "difffit", pixel_space=True)
    assert all(b.gamma1.item() == 1.0 and b.gamma2.item() == 1.0 for b in model.blocks)


# ------------------------------------------------------------------------------------------------------------
# model.py — forward passes and guidance
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DiT_models))
def test_forward_shape_for_every_config(name):
    patch = int(name.split("/")[1])
    with torch.device("meta"):
        model = DiT_models[name](input_size=32, num_classes=10)
        out = model(torch.zeros(2, 4, 32, 32), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert tuple(out.shape) == (2, 8, 32, 32)
    assert model.x_embedder.proj.kernel_size == (patch, patch)


def test_tiny_forward_runs_on_real_tensors():
    model = tiny_dit().eval()
    out = model(torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999]), torch.tensor([0, 5, 19]))
    assert out.shape == (3, 6, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("guidance", ["superclass", "null"])
@pytest.mark.parametrize("guide_channels", [3, None])
def test_forward_with_cfg_equals_equation_1_from_two_plain_forwards(guidance, guide_channels):
    model = randomize(tiny_dit(null_class=True)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 10])
    y = torch.tensor([1, 9])
    y_guide = model.y_embedder.superclass_ids(y) if guidance == "superclass" else torch.full_like(y, model.y_embedder.null_id)
    w = 4.0
    with torch.no_grad():
        cond, guide = model(x, t, y), model(x, t, y_guide)
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_guide]), w, guide_channels)
    g = 3                                  # a pixel model has 3 eps channels: both settings guide all of them
    expected = guide[:, :g] + w * (cond[:, :g] - guide[:, :g])
    torch.testing.assert_close(out[:2, :g], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[2:, :g], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:2, g:], cond[:, g:], rtol=1e-4, atol=1e-5)   # variance channels: conditional


def test_cfg_guides_only_first_three_channels_of_a_latent_model_by_default():
    model = randomize(DiT_models["DiT-T/4"](input_size=8, num_classes=4)).eval()
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.tensor([2])
    null = torch.tensor([4])
    with torch.no_grad():
        cond, unc = model(x, t, y), model(x, t, null)
        official = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 3.0)
        every = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 3.0, None)
    torch.testing.assert_close(official[:1, 3], cond[:, 3])                          # 4th eps channel unguided
    torch.testing.assert_close(every[:1, 3], unc[:, 3] + 3.0 * (cond[:, 3] - unc[:, 3]), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# model.py — TieredEmbedder
# ------------------------------------------------------------------------------------------------------------

def test_superclass_substitution_rate_matches_superclass_prob():
    emb = tiny_dit(superclass_prob=0.1).y_embedder
    torch.manual_seed(0)
    y = torch.randint(0, 16, (200_000,))
    out = emb.substitute(y)
    swapped = out != y
    assert abs(swapped.float().mean().item() - 0.1) < 0.005
    assert torch.equal(out[swapped], 16 + y[swapped] // 4)     # to the row of its own superclass


def test_null_substitution_rate_matches_null_prob():
    emb = tiny_dit(num_superclasses=0, superclass_of=None, null_class=True, null_prob=0.2).y_embedder
    torch.manual_seed(0)
    out = emb.substitute(torch.randint(0, 16, (100_000,)))
    assert abs((out == 16).float().mean().item() - 0.2) < 0.005


def test_eval_mode_never_substitutes_labels():
    model = tiny_dit(superclass_prob=1.0).eval()
    y = torch.arange(16)
    direct = model.y_embedder.embedding_table(y)
    assert torch.equal(model.y_embedder(y, train=model.training), direct)


def test_default_probabilities_follow_which_rows_exist():
    assert tiny_dit().y_embedder.superclass_prob == 0.1 and tiny_dit().y_embedder.null_prob == 0.0
    official = DiT_models["DiT-T/2"](input_size=16, num_classes=10).y_embedder
    assert official.null_prob == 0.1 and official.superclass_prob == 0.0


# ------------------------------------------------------------------------------------------------------------
# model.py — checkpoints
# ------------------------------------------------------------------------------------------------------------

def official_like(tmp_path, name="DiT-T/2", layout="official"):
    """A checkpoint file in a published layout, random weights.

    official: bare state dict, K+1 rows, no LayerNorm affine (as DiT-XL-2-256x256.pt).
    authors: {"model","ema","opt","args": argparse.Namespace}, K+S rows, LayerNorm affine (FineDiffusion-iNat.pt).
    """
    if layout == "official":
        model = randomize(DiT_models[name](input_size=16, num_classes=10))
        path = tmp_path / "DiT-official.pt"
        torch.save(model.state_dict(), path)
    else:
        model = randomize(tiny_dit())
        path = tmp_path / "FineDiffusion-authors.pt"
        args = argparse.Namespace(model=name, image_size=128, num_classes=16, epochs=1)
        torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": args}, path)
    return model, path


def test_loads_official_layout_into_a_finediffusion_model_reinitialising_the_table(tmp_path):
    base, path = official_like(tmp_path)
    model = DiT_models["DiT-T/2"](input_size=16, num_classes=30, num_superclasses=3,
                                  superclass_of=[c % 3 for c in range(30)], null_class=False, norm_affine=True)
    report = load_pretrained(model, str(path))
    assert report["reinitialised"] and "y_embedder.embedding_table.weight" in report["reinitialised"][0]
    assert "blocks.0.norm1.weight" in report["identity"]
    assert torch.equal(model.blocks[1].attn.qkv.weight, base.blocks[1].attn.qkv.weight)
    assert torch.equal(model.blocks[0].norm1.weight, torch.ones(128))


def test_loads_authors_layout_with_namespace_args(tmp_path):
    src, path = official_like(tmp_path, layout="authors")
    model = tiny_dit()
    report = load_pretrained(model, str(path))
    assert not report["reinitialised"] and not report["identity"]
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_load_model_infers_the_configuration_from_tensor_shapes(tmp_path):
    src, path = official_like(tmp_path, layout="official")
    model, info = load_model(str(path))
    cfg = dit_config_from_state(src.state_dict())
    assert cfg["name"] == "DiT-T/2" and cfg["input_size"] == 16 and not cfg["norm_affine"]
    assert model.y_embedder.null_class and model.y_embedder.num_classes == 10
    x, t, y = torch.randn(1, 4, 16, 16), torch.tensor([3]), torch.tensor([7])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), src.eval()(x, t, y))


def test_mismatched_tensor_is_a_named_error(tmp_path):
    model = tiny_dit()
    state = model.state_dict()
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(7, 128)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.fc1\.weight.*\(7, 128\).*\(512, 128\)"):
        load_pretrained(tiny_dit(), state)


def test_checkpoint_missing_a_tensor_is_a_named_error():
    state = tiny_dit().state_dict()
    del state["blocks.2.attn.proj.weight"]
    with pytest.raises(CheckpointError, match=r"blocks\.2\.attn\.proj\.weight"):
        load_pretrained(tiny_dit(), state)


class Payload:
    """Not a tensor: a pickle holding this must be refused (weights_only=True)."""

    def __reduce__(self):
        return (print, ("this code ran while loading a checkpoint",))


def test_pickle_with_non_tensor_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": tiny_dit().state_dict(), "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="refusing"):
        load_pretrained(tiny_dit(), str(path))


def test_missing_published_checkpoint_names_where_it_is_published(tmp_path):
    with pytest.raises(CheckpointError, match="dl.fbaipublicfiles.com/DiT"):
        load_pretrained(tiny_dit(), str(tmp_path / "DiT-XL-2-256x256.pt"))


# ------------------------------------------------------------------------------------------------------------
# diffusion.py
# ------------------------------------------------------------------------------------------------------------

def test_linear_schedule_spans_1e4_to_002():
    d = create_diffusion()
    assert d.num_timesteps == 1000
    np.testing.assert_allclose(d.betas[[0, -1]], [1e-4, 0.02], rtol=1e-9)


def test_q_sample_has_the_closed_form_mean_and_variance():
    d = create_diffusion()
    torch.manual_seed(0)
    x0 = torch.full((20000, 1), 0.7)
    for step in [0, 300, 999]:
        t = torch.full((20000,), step)
        x_t = d.q_sample(x0, t)
        abar = d.alphas_cumprod[step]
        assert abs(x_t.mean().item() - math.sqrt(abar) * 0.7) < 0.02
        assert abs(x_t.var().item() - (1 - abar)) < 0.03


def test_posterior_mean_and_variance_match_the_closed_form():
    d = create_diffusion()
    x0, xt, t = torch.randn(5, 2), torch.randn(5, 2), torch.tensor([1, 10, 100, 500, 999])
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    for i, s in enumerate(t.tolist()):
        b, abar, abar_prev = d.betas[s], d.alphas_cumprod[s], d.alphas_cumprod[s - 1]
        mu = (math.sqrt(abar_prev) * b / (1 - abar)) * x0[i] + (math.sqrt(1 - b) * (1 - abar_prev) / (1 - abar)) * xt[i]
        torch.testing.assert_close(mean[i], mu.float(), rtol=1e-5, atol=1e-6)
        assert abs(var[i, 0].item() - (1 - abar_prev) / (1 - abar) * b) < 1e-9
        assert abs(logvar[i, 0].item() - math.log((1 - abar_prev) / (1 - abar) * b)) < 1e-5


def test_respacing_keeps_the_right_timesteps():
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    kept = sorted(space_timesteps(1000, "250"))
    assert len(kept) == 250 and kept[:4] == [0, 4, 8, 12] and kept[-1] == 999
    assert sorted(space_timesteps(100, "10,5")) == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 50, 62, 74, 87, 99]


def test_respacing_preserves_alphas_cumprod_at_kept_steps():
    full, spaced = create_diffusion(), create_diffusion("250")
    np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timestep_map], rtol=1e-12)


def test_respaced_sampler_calls_the_model_with_original_timesteps():
    seen = []

    def model(x, t):
        seen.append(t[0].item())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    create_diffusion("ddim10").ddim_sample_loop(model, (1, 1, 2, 2), device="cpu")
    assert seen == list(range(900, -1, -100))


def test_ddim_with_eta_zero_is_deterministic_given_x_T():
    model = randomize(tiny_dit()).eval()
    d = create_diffusion("ddim5")
    z = torch.randn(2, 3, 16, 16)
    kw = dict(y=torch.tensor([1, 2]))
    torch.manual_seed(0)
    a = d.ddim_sample_loop(model, z.shape, z.clone(), model_kwargs=kw)
    torch.manual_seed(123)                                      # eta = 0: the per-step noise must not matter
    b = d.ddim_sample_loop(model, z.shape, z.clone(), model_kwargs=kw)
    assert torch.equal(a, b)


def test_fixed_seed_reproduces_ddpm_samples():
    model = randomize(tiny_dit()).eval()
    d = create_diffusion("8")
    kw = dict(y=torch.tensor([3, 7]))
    runs = []
    for seed in [5, 5, 6]:
        torch.manual_seed(seed)
        runs.append(d.p_sample_loop(model, (2, 3, 16, 16), model_kwargs=kw))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_each_ddpm_step_draws_exactly_one_randn_like():
    calls = []
    d = create_diffusion("4")
    model = lambda x, t: torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])
    real = torch.randn_like
    try:
        torch.randn_like = lambda x, *a, **k: calls.append(tuple(x.shape)) or real(x, *a, **k)
        d.p_sample_loop(model, (2, 1, 2, 2), noise=torch.zeros(2, 1, 2, 2))
    finally:
        torch.randn_like = real
    assert calls == [(2, 1, 2, 2)] * 4


def test_training_loss_is_mse_plus_vb_with_the_mean_detached():
    model = randomize(tiny_dit()).train()
    model.y_embedder.superclass_prob = 0.0
    d = create_diffusion()
    x0, t, noise = torch.randn(2, 3, 16, 16).clamp(-1, 1), torch.tensor([0, 400]), torch.randn(2, 3, 16, 16)
    terms = d.training_losses(model, x0, t, dict(y=torch.tensor([0, 1])), noise=noise)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    terms["vb"].sum().backward()                               # the bound alone: no gradient through eps
    w = model.final_layer.linear.weight.grad.view(2, 2, 6, 128)  # (p, p, C_out, D) rows of the final linear
    assert w[:, :, :3].abs().sum() == 0 and w[:, :, 3:].abs().sum() > 0

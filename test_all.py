"""The FineDiffusion test suite: a specification of behaviour, one idea per test.

    python -m pytest -q test_all.py

Everything runs on a CPU in minutes: tiny DiTs (DiT-T), tiny VAEs, the built-in toy data, few steps.
No weights are downloaded: loading code is tested on files the tests write in the published layouts.
In-process work uses one thread: on a shared 2-core machine, OpenMP threads fighting another process
slow small ops down by 10x or more.
"""
import argparse
import contextlib
import csv
import errno
import functools
import glob
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import alexnet
from torchvision.models.inception import Inception3

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402
sys.path.insert(0, os.path.join(HERE, "tools"))
import gpu_check  # noqa: E402
import hardening  # noqa: E402
import data  # noqa: E402
import diffusion as diffusion_module  # noqa: E402
import evaluate  # noqa: E402
import fid_inception  # noqa: E402
import figures  # noqa: E402
import model as model_module  # noqa: E402
import sample as sample_module  # noqa: E402
import toy as toy_module  # noqa: E402
import train  # noqa: E402
import vae as vae_module  # noqa: E402
from diffusion import create_diffusion, space_timesteps  # noqa: E402
from evaluate import (LPIPS, compute_stats, feature_stats, fid_table, frechet_distance, load_inception, open_images,  # noqa: E402
                      lpips_diversity, sample_pairs)
from fid_inception import FIDInceptionV3, inception_features  # noqa: E402
from hardening import UserError  # noqa: E402
from model import (DiT_models, build_model, count_table2, dit_config_from_state, is_trainable, load_model,  # noqa: E402
                   load_pretrained, set_trainable)
from hardening import load_safetensors  # noqa: E402
from vae import AutoencoderKL  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_script(*args, env=None, cwd=HERE, timeout=600):
    """Run one of the project's scripts as a user would."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_main(module, *argv, capsys):
    """A script's command line run in this process, as run_cli runs it (seconds faster than run_script), reported
    as run_script reports it."""
    capsys.readouterr()
    code = hardening.run_cli(lambda: module.main([str(a) for a in argv]))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


def assert_one_line_error(proc, *words):
    """A user mistake: exit code 2, one line `error: ...` naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for w in words:
        assert w.lower() in err.lower(), err


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as .safetensors, per the format's spec: u64 little-endian header length, a JSON header
    (dtype tag, shape, data offsets; padded with spaces to 8 bytes), then the raw little-endian bytes."""
    tags = {torch.float64: ("F64", "<f8"), torch.float32: ("F32", "<f4"), torch.float16: ("F16", "<f2"),
            torch.bfloat16: ("BF16", "<i2"), torch.int64: ("I64", "<i8"), torch.uint8: ("U8", "u1")}
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        tag, np_dtype = tags[t.dtype]
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().astype(np_dtype).tobytes()
        header[name] = {"dtype": tag, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(b"".join([len(head).to_bytes(8, "little"), head, *chunks]))


def write_tiny_vae(folder, seed=0, **config):
    """An SD-layout VAE, 8x downscale as the real one but 32 channels wide (unless `config` says otherwise),
    saved as published: config.json + diffusion_pytorch_model.safetensors."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1), **config})
    os.makedirs(folder, exist_ok=True)
    save_safetensors(vae.state_dict(), os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(_class_name="AutoencoderKL", **vae.config), f)
    return vae


def tiny_dit(**kw):
    """A DiT-T/2 over 16x16 pixels: 16 classes in 4 superclasses."""
    kw = {**dict(input_size=16, in_channels=3, num_classes=16, num_superclasses=4,
                 hierarchy=TOY_HIERARCHY, null_class=False, norm_affine=True), **kw}
    torch.manual_seed(0)
    return DiT_models["DiT-T/2"](**kw)


def hierarchy_of(superclass_of):
    """A hierarchy with made-up names over the given superclass_of."""
    return model_module.make_hierarchy([f"class{k}" for k in range(len(superclass_of))],
                                           [f"super{s}" for s in range(max(superclass_of) + 1)], superclass_of)


def randomize(model, seed=1):
    """Break adaLN-Zero's zero init, so outputs depend on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def seeded_state(template, skip=("pos_embed",)):
    """Weights that any implementation can rebuild from the published tensor names and shapes alone.

    Tensor `name` is drawn from a generator seeded with crc32(name): the reference script
    (tools/make_references.py) loads the same tensors into the official DiT, diffusers, pytorch-fid and
    lpips, so the fixtures carry only inputs and outputs, never weights. Scales keep activations O(1) through
    deep ReLU nets: weights ~ N(0, 2/fan_in) (He), norm scales ~ 1 + N(0, 0.1^2), BatchNorm variances in
    [0.5, 1.5], biases and other vectors ~ N(0, 0.1^2). `skip`: tensors each implementation computes itself
    (DiT's fixed sin-cos positions).
    """
    import zlib
    state = {}
    for name, like in template.items():
        if name in skip:
            continue
        if not like.is_floating_point():                    # BatchNorm's num_batches_tracked
            state[name] = like.clone()
            continue
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        draw = torch.randn(like.shape, generator=g, dtype=torch.float64)
        is_scale = like.ndim == 1 and name.endswith("weight") and ("norm" in name or ".bn." in name)
        if name.endswith("running_var"):
            value = 0.5 + torch.rand(like.shape, generator=g, dtype=torch.float64)
        elif is_scale:
            value = 1 + 0.1 * draw
        elif like.ndim == 1:
            value = 0.1 * draw
        else:
            value = draw * math.sqrt(2 / like[0].numel())
        state[name] = value.to(like.dtype)
    return state


# ------------------------------------------------------------------------------------------------------------
# The layout of the code
# ------------------------------------------------------------------------------------------------------------

def reading_guide():
    """The README's reading guide -> [(question, [(module, function, starts a new path)])], in the row's order."""
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    rows = []
    for line in readme[readme.index("## Reading guide"):readme.index("## Benchmarks")].splitlines():
        cells = line.split("|")
        if line.startswith("| ") and len(cells) > 3 and "`" in cells[2]:
            steps = [(module, name, bool(then)) for module, names in re.findall(r"`(\w+)\.py`: ([^;|]*)", cells[2])
                     for then, name in re.findall(r"(then )?`([\w.]+)`", names)]
            rows.append((cells[1].strip(), steps))
    return rows


def guide_function(module, name):
    import importlib
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)                  # AttributeError: the guide names what is not there
    return inspect.unwrap(obj)


# Called by the machinery, not by name: a module's forward (module(x)), a dataset's __getitem__ (a DataLoader).
IMPLICIT = ("forward", "__getitem__", "__call__")


def test_the_reading_guide_answers_nine_questions_in_two_files_and_six_functions_a_row():
    rows = reading_guide()
    assert len(rows) == 9, [q for q, _ in rows]
    for question, steps in rows:
        assert 1 <= len({m for m, _, _ in steps}) <= 2 and 1 <= len(steps) <= 6, question
        assert not steps[0][2], question                      # a row starts where its path starts


def test_each_function_the_reading_guide_names_is_called_by_one_named_before_it():
    """The guide is complete, not only true: along a row every function is called (or handed on) by one the row
    names before it, so no step of the path is left out; `then` starts the row's one other path (a checkpoint is
    written by one process and read by another)."""
    for question, steps in reading_guide():
        import ast
        import textwrap
        named_before = set()                 # every name the functions named so far use (calls, references)
        assert sum(then for _, _, then in steps) <= 1, question
        for k, (module, name, then) in enumerate(steps):
            short = name.split(".")[-1]
            assert k == 0 or then or short in named_before or short in IMPLICIT, \
                f"{question}: nothing named before {module}.{name} calls it"
            tree = ast.parse(textwrap.dedent(inspect.getsource(guide_function(module, name))))
            named_before |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
            named_before |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}


def test_the_imports_form_a_tree_with_the_helpers_then_model_and_diffusion_at_the_bottom():
    import ast
    layer = {"hardening": 0, "diffusion": 0, "model": 1, "vae": 1, "fid_inception": 1, "sample": 2, "toy": 3,
             "data": 4, "figures": 5, "train": 5, "evaluate": 6, "bench": 7}
    for name, level in layer.items():
        tree = ast.parse(open(os.path.join(HERE, f"{name}.py")).read())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert all(layer[m] < level for m in imported & layer.keys()), (name, imported & layer.keys())


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
    y_guide = model.y_embedder.tier_ids(y) if guidance == "superclass" else torch.full_like(y, model.y_embedder.null_id)
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
    emb = tiny_dit(num_superclasses=0, hierarchy=None, null_class=True, null_prob=0.2).y_embedder
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
                                  hierarchy=hierarchy_of([c % 3 for c in range(30)]), null_class=False,
                                  norm_affine=True)
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
    with pytest.raises(UserError, match=r"blocks\.1\.mlp\.fc1\.weight.*\[7, 128\].*\[512, 128\]"):
        load_pretrained(tiny_dit(), state)


def test_checkpoint_missing_a_tensor_is_a_named_error():
    state = tiny_dit().state_dict()
    del state["blocks.2.attn.proj.weight"]
    with pytest.raises(UserError, match=r"blocks\.2\.attn\.proj\.weight"):
        load_pretrained(tiny_dit(), state)


class Payload:
    """Not a tensor: a pickle holding this must be refused (weights_only=True)."""

    def __reduce__(self):
        return (print, ("this code ran while loading a checkpoint",))


def test_pickle_with_non_tensor_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": tiny_dit().state_dict(), "x": Payload()}, path)
    with pytest.raises(UserError, match="refusing"):
        load_pretrained(tiny_dit(), str(path))


def test_missing_published_checkpoint_names_where_it_is_published(tmp_path):
    with pytest.raises(UserError, match="dl.fbaipublicfiles.com/DiT"):
        load_pretrained(tiny_dit(), str(tmp_path / "DiT-XL-2-256x256.pt"))


# ------------------------------------------------------------------------------------------------------------
# diffusion.py
# ------------------------------------------------------------------------------------------------------------

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


def test_each_dpm_solver_sde_step_draws_exactly_one_randn_like():
    """DiT's rule for the random stream, kept by the SDE sampler: x_T, then one randn_like(x) per step (the last
    one too, though the step to sigma = 0 multiplies it by 0), so a seed fixes the samples as with DDPM."""
    calls = []
    model = lambda x, t: torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])
    real = torch.randn_like
    try:
        torch.randn_like = lambda x, *a, **k: calls.append(tuple(x.shape)) or real(x, *a, **k)
        create_diffusion().dpm_solver_sample_loop(model, (2, 1, 2, 2), noise=torch.zeros(2, 1, 2, 2), steps=5, sde=True)
    finally:
        torch.randn_like = real
    assert calls == [(2, 1, 2, 2)] * 5


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


# ------------------------------------------------------------------------------------------------------------
# Closed forms: diffusion on Gaussian data, the schedule and posterior, embeddings, FID, the centre crop
# ------------------------------------------------------------------------------------------------------------

def linear_abar():
    """abar_t = prod_{s<=t} (1 - beta_s) of DDPM's linear schedule (Ho et al. 2020, §4: beta 1e-4 ... 0.02)."""
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


def gaussian_optimal_eps(mu, s2, var_value=None):
    """The best possible eps-model for data x_0 ~ N(mu, s2) in every dimension.

    x_t = sqrt(a) x_0 + sqrt(1 - a) eps (DDPM eq. 4) is then jointly Gaussian with eps, so
    E[eps | x_t] = Cov(eps, x_t) / Var(x_t) (x_t - E x_t) = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s2 + 1 - a).
    The model is called with the original (not respaced) step, so a is read from the 1000-step schedule.
    `var_value`: the learned-range channel (IDDPM eq. 15: v = -1 posterior variance, +1 beta_t).
    """
    abar = torch.from_numpy(linear_abar())

    def model(x, t):
        a = abar[t].view(-1, *[1] * (x.ndim - 1))
        eps = (torch.sqrt(1 - a) * (x.double() - torch.sqrt(a) * mu) / (a * s2 + 1 - a)).float()
        return eps if var_value is None else torch.cat([eps, torch.full_like(eps, var_value)], dim=1)
    return model


def exact_x_T(mu, s2, shape, step=999, stratified=False):
    """Draws of q(x_T) = N(sqrt(abar_T) mu, abar_T s2 + 1 - abar_T) for Gaussian data (so the chain starts exact).
    stratified: the normal quantiles at (k + 1/2)/n instead of random draws (a deterministic, even sample)."""
    a = linear_abar()[step]
    n = int(np.prod(shape))
    z = (torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n) if stratified
         else torch.randn(n, dtype=torch.float64))
    return (math.sqrt(a) * mu + math.sqrt(a * s2 + 1 - a) * z).float().view(shape)


def kept_schedule(kept):
    """abar, abar_prev and beta of the chain that visits only the steps `kept` (IDDPM §4: respacing keeps abar;
    beta_i = 1 - abar_i / abar_{previous kept step})."""
    a = linear_abar()[np.asarray(sorted(kept))]
    a_prev = np.append(1.0, a[:-1])
    return a, a_prev, 1 - a / a_prev


def test_ddpm_with_optimal_eps_and_variance_beta_t_samples_unit_variance_gaussian_data_exactly():
    """DDPM §3.2: sigma_t^2 = beta_t is the optimal reverse variance for x_0 ~ N(0, I) (any mean, as we derive).

    With the exact eps, the DDPM mean mu_theta = c1 E[x_0|x_t] + c2 x_t (eq. 7, 11) is E[x_{t-1} | x_t], and
    Var(x_{t-1} | x_t) = beta~_t + c1^2 Var(x_0 | x_t) = beta~_t + c1^2 s2 (1 - a) / (a s2 + 1 - a);
    for s2 = 1 this is beta~_t + beta_t^2 abar_prev / (1 - a) = beta_t exactly. So every step of a (respaced)
    chain maps q(x_t) onto q(x_{t-1}), and the last step (no noise) returns E[x_0 | x_t0], whose variance is
    s2 * abar_0 s2 / (abar_0 s2 + 1 - abar_0) = 1 - 1e-4. (The small variance, beta~_t, is exact only for a
    point mass; for N(mu, 1) it loses 15% of the variance in 50 steps, which a swapped interpolation shows.)
    """
    torch.manual_seed(0)
    mu, s2, n = 0.5, 1.0, 250_000
    d = create_diffusion("50")
    shape = (n // 4, 1, 2, 2)
    out = d.p_sample_loop(gaussian_optimal_eps(mu, s2, var_value=1.0), shape, exact_x_T(mu, s2, shape)).double()
    a0 = linear_abar()[0]
    var = s2 * a0 * s2 / (a0 * s2 + 1 - a0)
    assert abs(out.mean().item() - mu) < 6 * math.sqrt(s2 / n)
    assert abs(out.var().item() - var) < 6 * var * math.sqrt(2 / (n - 1))


def ddpm_output_variance(kept, s2, log_var):
    """Var(x_0) of DDPM sampling for N(mu, s2) data with the exact eps, from an exact x_T: each step is the affine
    map x_{t-1} - sqrt(abar_prev) mu = (c1 k + c2)(x_t - sqrt(abar) mu) + sigma z with E[x_0|x_t] - mu =
    k (x_t - sqrt(abar) mu), k = sqrt(abar) s2 / (abar s2 + 1 - abar), c1, c2 of DDPM eq. 7; no noise at t = 0."""
    a, a_prev, beta = kept_schedule(kept)
    var = a[-1] * s2 + 1 - a[-1]
    for i in range(len(a) - 1, -1, -1):
        k = math.sqrt(a[i]) * s2 / (a[i] * s2 + 1 - a[i])
        c1 = beta[i] * math.sqrt(a_prev[i]) / (1 - a[i])
        c2 = (1 - a_prev[i]) * math.sqrt(1 - beta[i]) / (1 - a[i])
        var = (c1 * k + c2) ** 2 * var + (math.exp(log_var[i]) if i > 0 else 0.0)
    return var


@pytest.mark.parametrize("v", [-1.0, 0.0, 1.0])
def test_ddpm_output_variance_follows_the_gaussian_recursion_across_the_learned_range(v):
    """IDDPM eq. 15: log sigma^2 = (v+1)/2 log beta_t + (1-v)/2 log beta~_t (beta~ clipped to beta~_1 at t = 0).

    For N(mu, s2) data with s2 != 1 no choice is exact (see above), but the sampler's law is still known:
    a linear Gaussian recursion (ddpm_output_variance). v = -1, 0, +1 give Var(x_0) = 0.196, 0.226, 0.268 for
    s2 = 0.25 in 50 steps, so the test tells the ends and the midpoint apart; the mean is mu for every v.
    """
    torch.manual_seed(0)
    mu, s2, n = -0.3, 0.25, 200_000
    d = create_diffusion("50")
    a, a_prev, beta = kept_schedule(d.timestep_map)
    post = beta * (1 - a_prev) / (1 - a)
    log_var = (v + 1) / 2 * np.log(beta) + (1 - v) / 2 * np.log(np.append(post[1], post[1:]))
    expected = ddpm_output_variance(d.timestep_map, s2, log_var)
    shape = (n // 4, 1, 2, 2)
    out = d.p_sample_loop(gaussian_optimal_eps(mu, s2, var_value=v), shape, exact_x_T(mu, s2, shape)).double()
    assert abs(out.mean().item() - mu) < 6 * math.sqrt(s2 / n)
    assert abs(out.var().item() - expected) < 6 * expected * math.sqrt(2 / (n - 1))


@pytest.mark.parametrize("respacing", ["ddim50", ""])
def test_ddim_with_optimal_eps_is_the_closed_form_affine_map_of_x_T(respacing):
    """DDIM eq. 12 with eta = 0: x_{t-1} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat.

    For N(mu, s2) data, with u_t = x_t - sqrt(abar_t) mu, the exact eps gives eps_hat = sqrt(1 - a) u_t / v_t and
    x0_hat = mu + sqrt(a) s2 u_t / v_t (v_t = a s2 + 1 - a), so u_{t-1} = f_t u_t with
    f_t = (sqrt(abar_prev abar) s2 + sqrt((1 - abar_prev)(1 - abar))) / v_t, and x_0 = mu + (prod f_t) u_T.
    By Cauchy-Schwarz f_t^2 <= v_{t-1} / v_t: the discrete map only approaches the probability-flow ODE, which
    keeps q(x_t) (Song et al. 2021): here 50 steps keep 89.3% of the data's variance, 1000 steps 99.4%.
    float32 round-off grows with the step count: ~1.5e-6 after 50 steps, ~1.5e-5 after 1000.
    """
    mu, s2 = 0.5, 0.25
    d = create_diffusion(respacing)
    kept = range(0, 1000, 20) if respacing else range(1000)
    a, a_prev, _ = kept_schedule(kept)
    f = (np.sqrt(a_prev * a) * s2 + np.sqrt((1 - a_prev) * (1 - a))) / (a * s2 + 1 - a)
    x_T = exact_x_T(mu, s2, (1000, 1, 2, 2), step=kept[-1], stratified=True)
    out = d.ddim_sample_loop(gaussian_optimal_eps(mu, s2, var_value=0.0), x_T.shape, x_T.clone())
    expected = mu + np.prod(f) * (x_T.double() - math.sqrt(a[-1]) * mu)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5 if respacing else 1e-4)
    if not respacing:                                     # near the ODE limit: the data's marginal, to 1%
        assert abs(out.double().var().item() - s2) < 0.01 * s2


def ode_solution(mu, s2, x_T, step):
    """The probability-flow ODE (Song et al. 2021) from x_T at step 999 to step `step` (-1: sigma = 0, abar = 1) for
    N(mu, s2) data. It keeps q(x_t) = N(sqrt(abar_t) mu, v_t), v_t = abar_t s2 + 1 - abar_t, and is affine, so
    x_t - sqrt(abar_t) mu = (x_T - sqrt(abar_T) mu) sqrt(v_t / v_T); at sigma = 0, x_0 = mu + (...) s / sqrt(v_T)."""
    a_T, a = linear_abar()[999], (1.0 if step < 0 else linear_abar()[step])
    return math.sqrt(a) * mu + (x_T.double() - math.sqrt(a_T) * mu) * math.sqrt((a * s2 + 1 - a) / (a_T * s2 + 1 - a_T))


def test_dpm_solver_with_optimal_eps_lands_near_the_ode_solution_of_gaussian_data():
    """DPM-Solver++(2M) at 25 steps, with the exact eps of N(mu, s2) data, ends within 3% (2.4%) of the ODE's x_0
    (relative to x_0 - mu). DPM-Solver++(1) (= DDIM: first order at every step) misses by 11%, 1/r for the 2M
    correction's 1/(2r) by 9%, r inverted by 6%, a constant r = 1 by 5%. Most of the 2.4% is the last step, the
    jump from t = 40 to sigma = 0 that returns the data prediction x_theta (as diffusers' final sigma 0)."""
    mu, s2 = 0.5, 0.25
    x_T = exact_x_T(mu, s2, (1000, 1, 2, 2), stratified=True)
    out = create_diffusion().dpm_solver_sample_loop(gaussian_optimal_eps(mu, s2, var_value=0.0), x_T.shape, x_T.clone(),
                                                    steps=25)
    expected = ode_solution(mu, s2, x_T, step=-1)
    error = ((out.double() - expected).abs().max() / (expected - mu).abs().max()).item()
    assert error < 0.03, error


def test_dpm_solver_error_falls_at_second_order_as_the_steps_double():
    """DPM-Solver++ is second order in the step h of lambda = log(alpha_t / sigma_t) (Lu et al. 2022). Linspace
    timesteps halve every h as the steps double where lambda is smooth in t, e.g. up to t = 500 (a step of both
    the 20- and 40-step schedules): the state the solver brings there is 3.76x closer to the ODE's (second order:
    4x; first order 2x). (Its final sample converges less cleanly: near t = 0, lambda ~ -log(t) / 2, so the last
    steps' h does not shrink, and the final jump to sigma = 0 errs by O(sigma_t^2) of its start.)"""
    mu, s2 = 0.5, 0.25
    eps, seen = gaussian_optimal_eps(mu, s2, var_value=0.0), {}

    def model(x, t):
        seen[int(t[0])] = x.double()
        return eps(x, t)
    x_T = exact_x_T(mu, s2, (100, 1, 2, 2), stratified=True)
    errors = []
    for steps in (20, 40):
        create_diffusion().dpm_solver_sample_loop(model, x_T.shape, x_T.clone(), steps=steps)
        errors.append((seen[500] - ode_solution(mu, s2, x_T, step=500)).abs().max().item())
    assert 3.5 < errors[0] / errors[1] < 4.5, errors


def test_dpm_solver_sde_with_the_exact_x0_keeps_the_marginal_variance_of_gaussian_data():
    """The reverse diffusion SDE keeps every marginal of the forward process (Anderson 1982; Song et al. 2021): for
    data N(0, s2), q(x_t) = N(0, alpha_t^2 s2 + sigma_t^2), and the exact data prediction is
    D(x_t) = alpha_t s2 / (alpha_t^2 s2 + sigma_t^2) x_t (what gaussian_optimal_eps's eps gives). DPM-Solver++(2M)
    SDE driven by it from an exact x_T must keep that variance at every step it visits, measured over n draws to
    6 standard errors of a sample variance (sqrt(2 / n) of it). The discrete update's own deviation is below
    that: at most 0.07% at 200 steps for s2 = 9, by the exact variance recursion of this linear update (near
    t = 0, where h is large, it grows with fewer steps: 2.9% at 25 steps; 9% for s2 = 1). First order at every
    step misses by 2.8%, the ODE's e^{-h} for the SDE's e^{-2h} in the noise coefficient by far more."""
    s2, n, steps = 9.0, 400_000, 200
    eps, variances = gaussian_optimal_eps(0.0, s2, var_value=0.0), {}

    def model(x, t):
        variances[int(t[0])] = x.double().var().item()       # the marginal at step t, before the step from it
        return eps(x, t)
    torch.manual_seed(0)
    x_T = exact_x_T(0.0, s2, (n // 4, 1, 2, 2))              # (N, C, H, W): q(x_999) exactly
    create_diffusion().dpm_solver_sample_loop(model, x_T.shape, x_T, steps=steps, sde=True)
    abar = linear_abar()
    assert len(variances) == steps
    for t, var in variances.items():
        expected = abar[t] * s2 + 1 - abar[t]
        assert abs(var / expected - 1) < 6 * math.sqrt(2 / n), (t, var, expected)


def test_linear_schedule_is_np_linspace_at_every_step_and_abar_its_cumprod():
    """DDPM §4: beta_t linear from 1e-4 to 0.02 over T = 1000 steps; abar_t = prod_s (1 - beta_s) (eq. 4).
    Supersedes test_linear_schedule_spans_1e4_to_002 (ends only: a squared-linear schedule passed it)."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    squared = np.linspace(1e-4 ** 0.5, 0.02 ** 0.5, 1000) ** 2       # same ends, other interior
    assert np.max(np.abs(squared - betas) / betas) > 0.1               # (so the check below can tell them apart)
    d = create_diffusion()
    np.testing.assert_allclose(d.betas, betas, rtol=1e-9, atol=0)
    np.testing.assert_allclose(d.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12, atol=0)


@pytest.mark.parametrize("respacing", ["", "250"])
def test_q_posterior_follows_ddpm_eq7_at_every_step_with_the_log_variance_clipped_at_t0(respacing):
    """DDPM eq. 6-7: q(x_{t-1}|x_t, x_0) = N(c1 x_0 + c2 x_t, beta~_t), c1 = beta_t sqrt(abar_prev)/(1 - abar_t),
    c2 = sqrt(alpha_t)(1 - abar_prev)/(1 - abar_t), beta~_t = beta_t (1 - abar_prev)/(1 - abar_t). beta~_0 = 0, so
    its log is clipped to log beta~_1 (IDDPM §3.1). On a respaced chain ("250") all of it holds with the respaced
    betas 1 - abar_i / abar_prev_kept. Supersedes test_posterior_mean_and_variance_match_the_closed_form
    (5 steps, t >= 1, full chain only)."""
    d = create_diffusion(respacing)
    a, a_prev, beta = kept_schedule(d.timestep_map)
    assert len(a) == (int(respacing) if respacing else 1000)
    np.testing.assert_allclose(d.betas, beta, rtol=1e-9, atol=0)
    n = len(a)
    post = beta * (1 - a_prev) / (1 - a)
    c1 = beta * np.sqrt(a_prev) / (1 - a)
    c2 = np.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, torch.arange(n))
    c1, c2 = torch.from_numpy(c1)[:, None], torch.from_numpy(c2)[:, None]
    torch.testing.assert_close(mean.double(), c1 * x0.double() + c2 * xt.double(), rtol=1e-5, atol=1e-6)
    assert post[0] == 0
    np.testing.assert_allclose(var[:, 0].double().numpy(), post, rtol=1e-6, atol=0)
    np.testing.assert_allclose(log_var[:, 0].double().numpy(), np.log(np.append(post[1], post[1:])),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("dim", [256, 33])
def test_timestep_embedding_is_cos_then_sin_of_t_times_geometric_frequencies(dim):
    """The official DiT's (and ADM's) sinusoidal embedding: [cos(t f_i), sin(t f_i)], f_i = exp(-ln(10^4) i/half),
    i < half = dim // 2, cosines first; an odd dim gets one zero column at the end."""
    from model import TimestepEmbedder
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    ts = np.array([0.0, 1.0, 999.0])
    emb = TimestepEmbedder.timestep_embedding(torch.tensor(ts), dim).double().numpy()
    assert emb.shape == (3, dim)
    expected = np.concatenate([np.cos(np.outer(ts, freqs)), np.sin(np.outer(ts, freqs)),
                               np.zeros((3, dim % 2))], axis=1)
    assert np.array_equal(emb[0], np.r_[np.ones(half), np.zeros(dim - half)])   # t = 0: cos 0, sin 0, padding
    # float32 frequencies times t = 999 leave ~1e-4 rad; a swap or a half-1 denominator is off by O(1)
    np.testing.assert_allclose(emb, expected, rtol=0, atol=2e-4)


def sincos_1d(pos, dim):
    """MAE/DiT 1-D code of a position: [sin(p w_k), cos(p w_k)], w_k = 1 / 10000^(k / (dim/2)), k < dim/2."""
    w = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2))
    return np.concatenate([np.sin(pos * w), np.cos(pos * w)])


def test_2d_sincos_pos_embed_codes_the_column_then_the_row_of_each_row_major_token():
    """The official DiT's get_2d_sincos_pos_embed: tokens row-major (as PatchEmbed's flatten); the first D/2
    channels encode the column (its emb_h comes from meshgrid(w, h)[0]), the last D/2 the row."""
    from model import get_2d_sincos_pos_embed
    dim, grid = 16, 3
    emb = get_2d_sincos_pos_embed(dim, grid)
    assert emb.shape == (grid * grid, dim)
    for i in range(grid):                                   # row
        for j in range(grid):                               # column
            expected = np.concatenate([sincos_1d(j, dim // 2), sincos_1d(i, dim // 2)])
            np.testing.assert_allclose(emb[i * grid + j], expected, rtol=0, atol=1e-12)


def test_dit_pos_embed_is_the_fixed_sincos_table_and_no_tuning_method_trains_it():
    from model import get_2d_sincos_pos_embed
    model = tiny_dit()                                      # 16 px, patch 2: an 8 x 8 grid of 128-d tokens
    table = np.stack([np.concatenate([sincos_1d(j, 64), sincos_1d(i, 64)]) for i in range(8) for j in range(8)])
    assert model.pos_embed.shape == (1, 64, 128)
    np.testing.assert_allclose(model.pos_embed[0].double().numpy(), table, rtol=0, atol=1e-6)
    np.testing.assert_allclose(get_2d_sincos_pos_embed(128, 8), table, rtol=0, atol=1e-12)
    for method in ["full", "bitfit", "difffit", "finediffusion"]:
        set_trainable(model, method)
        assert not model.pos_embed.requires_grad, method
    before = model.pos_embed.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(torch.randn(2, 3, 16, 16), torch.tensor([3, 500]), torch.tensor([1, 5])).square().mean()
    loss.backward()
    opt.step()
    assert torch.equal(model.pos_embed, before)


def psd_sqrt(m):
    """Symmetric PSD square root from an eigendecomposition (an independent route from scipy's sqrtm)."""
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_equals_the_closed_form_for_non_commuting_covariances():
    """Frechet distance of Gaussians (Dowson & Landau 1982; FID, Heusel et al. 2017):
    ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2. With S1 S2 != S2 S1 this is not
    tr S1^1/2 S2^1/2, so the test tells the two apart (the existing diagonal test cannot)."""
    rng = np.random.default_rng(0)
    dim = 6
    q1, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    q2, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    s1 = q1 @ np.diag(np.geomspace(0.05, 20.0, dim)) @ q1.T
    s2 = q2 @ np.diag(np.geomspace(10.0, 0.02, dim)) @ q2.T
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    assert np.abs(s1 @ s2 - s2 @ s1).max() > 1.0
    r1 = psd_sqrt(s1)
    truth = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(psd_sqrt(r1 @ s2 @ r1))
    wrong = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(r1 @ psd_sqrt(s2))
    assert abs(wrong - truth) > 1.0                          # the separate-roots formula is far off here
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(truth, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)


def test_feature_stats_is_the_sample_mean_and_the_scatter_matrix_over_n_minus_1():
    """Unbiased covariance, sum_k (x_k - m)(x_k - m)^T / (N - 1), written out (not np.cov, the code's own route).
    Supersedes test_feature_stats_is_mean_and_unbiased_covariance."""
    x = np.random.default_rng(3).standard_normal((30, 4)) * [1, 2, 3, 4] + [5, 0, -1, 2]
    m = x.sum(0) / 30
    scatter = sum(np.outer(r - m, r - m) for r in x)
    mu, sigma = feature_stats(x)
    np.testing.assert_allclose(mu, m, rtol=1e-12)
    np.testing.assert_allclose(sigma, scatter / 29, rtol=1e-12)    # / 30 would be 3.4% off


def coordinate_image(width, height):
    """RGB image whose pixel (row, col) holds (10 col, 10 row, 7): its content says where it came from."""
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))
    return np.stack([10 * cols, 10 * rows, np.full_like(cols, 7)], axis=-1).astype(np.uint8)   # H x W x 3


@pytest.mark.parametrize("width, height", [(20, 12), (21, 12), (12, 20), (12, 12)])
def test_center_crop_arr_keeps_the_centre_of_an_image_already_at_size(width, height):
    """ADM's center_crop_arr: an image whose short side is already image_size is not resized, and the crop starts
    at ((W - size) // 2, (H - size) // 2): columns 4..15 of a 20- or 21-wide image (floor), never the top-left."""
    size = 12
    arr = coordinate_image(width, height)
    out = np.array(data.center_crop_arr(Image.fromarray(arr), size))
    x0, y0 = (width - size) // 2, (height - size) // 2
    assert out.shape == (size, size, 3)
    assert np.array_equal(out, arr[y0:y0 + size, x0:x0 + size])


def test_center_crop_arr_box_halves_a_large_image_exactly_then_crops_its_centre():
    """ADM: box-halve while the short side is >= 2 x image_size. A 96 x 48 image of 4 x 4 constant blocks halves
    exactly twice (48 >= 24, then 24 >= 24) to the 24 x 12 image of block values, which is already at size (no
    bicubic step), so the output is block columns 6..17. The blocks carry a checkerboard: one bicubic 4x step,
    or halving only once (> for >=), blends neighbours by ~70 levels."""
    rows, cols = np.meshgrid(np.arange(12), np.arange(24), indexing="ij")
    blocks = np.stack([10 * cols, 10 * rows, 250 * ((rows + cols) % 2)], axis=-1).astype(np.uint8)  # 12 x 24 x 3
    image = Image.fromarray(blocks.repeat(4, axis=0).repeat(4, axis=1))                            # 96 x 48
    assert np.array_equal(np.array(data.center_crop_arr(image, 12)), blocks[:, 6:18])


def test_center_crop_arr_box_halves_then_resizes_a_large_image_to_a_square():
    """100 x 52 at size 12: box-halved twice (52 -> 26 -> 13, stopping below 2 x 12), bicubic to 23 x 12, centre
    crop. A flat colour survives every step unchanged."""
    out = data.center_crop_arr(Image.new("RGB", (100, 52), (200, 30, 90)), 12)
    assert out.size == (12, 12)
    assert np.array_equal(np.unique(np.array(out).reshape(-1, 3), axis=0), [[200, 30, 90]])


def test_q_sample_with_given_noise_is_exactly_sqrt_abar_x0_plus_sqrt_one_minus_abar_eps():
    """DDPM eq. 4, elementwise, at t = 0 ... 999, abar from np.linspace; without noise it draws torch.randn_like.
    Complements test_q_sample_has_the_closed_form_mean_and_variance (statistical, abar read from the code)."""
    d = create_diffusion()
    steps = [0, 1, 250, 500, 998, 999]
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(len(steps), 2, 3, 3, generator=g), torch.randn(len(steps), 2, 3, 3, generator=g)
    a = torch.from_numpy(linear_abar()[steps]).view(-1, 1, 1, 1)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()
    torch.testing.assert_close(d.q_sample(x0, torch.tensor(steps), eps).double(), expected, rtol=1e-6, atol=1e-6)
    torch.manual_seed(5)
    drawn = d.q_sample(x0, torch.tensor(steps))
    torch.manual_seed(5)
    torch.testing.assert_close(drawn, d.q_sample(x0, torch.tensor(steps), torch.randn_like(x0)), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------
# Reference values: the official DiT, the authors' FineDiffusion, diffusers, pytorch-fid, lpips
# ------------------------------------------------------------------------------------------------------------
# tools/reference_values.safetensors holds inputs and the reference implementations' outputs for small models whose
# weights both sides draw with seeded_state; tools/make_references.py wrote it (its docstring: versions,
# commits, command line). Tolerances absorb other CPU kernels (rtol 1e-5 for one forward pass, looser for
# sampling loops that compound round-off) and still fail on any one-line numeric change.

REFERENCE_VALUES = os.path.join(HERE, "tools", "reference_values.safetensors")
REF_DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4)
REF_VAE_CONFIG = {  # diffusers' config.json of the reference script's small AutoencoderKL
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", "act_fn": "silu", "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"], "force_upcast": True, "in_channels": 3,
    "latent_channels": 4, "latents_mean": None, "latents_std": None, "layers_per_block": 1,
    "mid_block_add_attention": True, "norm_num_groups": 8, "out_channels": 3, "sample_size": 16,
    "scaling_factor": 0.18215, "shift_factor": None, "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "use_post_quant_conv": True, "use_quant_conv": True}
CLI_VAE_CONFIG = {  # diffusers' config.json of the VAE of the reference script's "cli" group: 8x, as the SD VAE
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", "act_fn": "silu", "block_out_channels": [32] * 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "latent_channels": 4,
    "latents_mean": None, "latents_std": None, "layers_per_block": 1, "mid_block_add_attention": True,
    "norm_num_groups": 8, "out_channels": 3, "sample_size": 64, "scaling_factor": 0.18215, "shift_factor": None,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": True, "use_quant_conv": True}


@pytest.fixture(scope="module")
def reference():
    """{name: tensor} of tools/reference_values.safetensors, read with our own .safetensors reader."""
    return load_safetensors(REFERENCE_VALUES)


def assert_matches(actual, expected, rel, msg=None):
    """Equal to a reference up to `rel` of each value plus `rel` of the tensor's largest value (an element that
    cancels to near zero carries the round-off of its operands, not of itself)."""
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()), msg=msg)


def assert_pixels_match(images, uint8, decoded, rel, msg=None):
    """(N, H, W, 3) uint8 `images` equal to the reference's pixels `uint8`, DiT's trunc(clamp(127.5 x + 128)) of its
    (N, 3, H, W) floats `decoded`, wherever floats within `rel` (assert_matches' tolerance) of the reference's
    cannot cross an integer level; there, one level apart at most."""
    level = torch.clamp(127.5 * decoded + 128.0, 0, 255).permute(0, 2, 3, 1)
    slack = 127.5 * rel * (decoded.abs() + decoded.abs().max()).permute(0, 2, 3, 1)  # the float tolerance, in levels
    at_edge = (level - level.round()).abs() <= slack
    assert images.shape == uint8.shape, msg
    assert torch.equal(images.long()[~at_edge], uint8.long()[~at_edge]), msg
    assert ((images.long() - uint8.long()).abs() <= 1).all(), msg


def seeded_dit(**kw):
    """A DiT of the reference configuration with seeded weights (its sin-cos positions are its own)."""
    from model import DiT
    model = DiT(**REF_DIT, **kw)
    missing, unexpected = model.load_state_dict(seeded_state(model.state_dict()), strict=False)
    assert missing == ["pos_embed"] and not unexpected
    return model.eval()


def official_small_dit():
    """The official DiT layout: 10 classes and a null row, no LayerNorm affine."""
    return seeded_dit(num_classes=10, null_class=True)


def authors_fine_dit():
    """The authors' FineDiffusion layout: 10,000 iNat21 subclass rows + 11 superclass rows, LayerNorm affine."""
    return seeded_dit(num_classes=10000, num_superclasses=11, hierarchy=model_module.inat21_hierarchy(),
                      null_class=False, norm_affine=True)


def seeded_vae(folder, logvar_shift=None, config=REF_VAE_CONFIG):
    """diffusers' AutoencoderKL of `config` (the small one, or CLI_VAE_CONFIG's) with seeded weights, written in the
    published layout (config.json + diffusion_pytorch_model.safetensors) and loaded back as users load the SD VAE."""
    state = seeded_state(AutoencoderKL.from_config(config).state_dict(), skip=())
    if logvar_shift is not None:  # the reference script's clamp case: quant_conv.bias[4:8] += shift
        state["quant_conv.bias"] = state["quant_conv.bias"] + torch.tensor([0.0] * 4 + list(logvar_shift))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    save_safetensors(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    return AutoencoderKL.from_pretrained(folder)


# ---- DiT ----------------------------------------------------------------------------------------------------

def test_sincos_positions_equal_the_official_dit(reference):
    from model import get_2d_sincos_pos_embed
    expected = reference["dit.pos_embed"]                                       # (16, 64) float64
    torch.testing.assert_close(torch.from_numpy(get_2d_sincos_pos_embed(64, 4)), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(official_small_dit().pos_embed[0], expected.float(), rtol=0, atol=1e-7)


def test_timestep_embedding_equals_the_official_dit(reference):
    from model import TimestepEmbedder
    t = reference["dit.t_emb.t"]
    out = TimestepEmbedder.timestep_embedding(t, 256)
    # Both sides round the argument t * freq to float32, and exp's last bit differs between CPUs: the reference may
    # sit one or two float32 ulps of the argument away, which moves cos and sin by as much (t = 999: up to 1e-4).
    freqs = 10000.0 ** (-torch.arange(128, dtype=torch.float64) / 128)
    args = torch.cat([t[:, None] * freqs] * 2, dim=-1)                                  # (N, 256)
    assert ((out - reference["dit.t_emb.out"]).abs() <= 1e-6 + 2 * args * 2.0 ** -23).all()


def test_dit_forward_equals_the_official_dit(reference):
    r = {k[len("dit.forward."):]: v for k, v in reference.items() if k.startswith("dit.forward.")}
    with torch.no_grad():
        out = official_small_dit()(r["x"], r["t"], r["y"])
    assert_matches(out, r["out"], 1e-5)


def test_dit_forward_with_cfg_equals_the_official_dit(reference):
    r = {k[len("dit.cfg."):]: v for k, v in reference.items() if k.startswith("dit.cfg.")}
    with torch.no_grad():
        out = official_small_dit().forward_with_cfg(r["x"], r["t"], r["y"], 4.0)   # guides eps channels 0-2
    assert_matches(out, r["out"], 1e-5)


def test_superclass_guidance_equals_the_authors_finediffusion_dit(reference):
    r = {k[len("fine.cfg."):]: v for k, v in reference.items() if k.startswith("fine.cfg.")}
    model = authors_fine_dit()
    classes, guide = r["y"].chunk(2)
    assert torch.equal(model.y_embedder.tier_ids(classes), guide)          # the authors' iNat21 map
    with torch.no_grad():
        out = model.forward_with_cfg(r["x"], r["t"], r["y"], 4.0)
    assert_matches(out, r["out"], 1e-5)


# ---- Gaussian diffusion --------------------------------------------------------------------------------------

def test_schedule_and_respacing_equal_the_official_diffusion(reference):
    d = create_diffusion("")
    torch.testing.assert_close(torch.from_numpy(d.betas), reference["diff.betas"], rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.from_numpy(d.alphas_cumprod), reference["diff.alphas_cumprod"], rtol=1e-12, atol=0)
    for respacing in ("250", "10", "ddim10"):
        kept = torch.from_numpy(np.asarray(create_diffusion(respacing).timestep_map, dtype=np.int64))
        assert torch.equal(kept, reference[f"diff.timestep_map.{respacing}"]), respacing


def test_training_losses_equal_the_official_diffusion(reference):
    r = {k[len("diff.train."):]: v for k, v in reference.items() if k.startswith("diff.train.")}
    with torch.no_grad():
        terms = create_diffusion("").training_losses(official_small_dit(), r["x_start"], r["t"],
                                                     model_kwargs=dict(y=r["y"]), noise=r["noise"])
    for k in ("loss", "mse", "vb"):                                              # t = 0 and 999 among them
        assert_matches(terms[k], r[k], 1e-5, msg=k)


def test_p_mean_variance_equals_the_official_diffusion(reference):
    r = {k[len("diff.pmv."):]: v for k, v in reference.items() if k.startswith("diff.pmv.")}
    with torch.no_grad():
        d = create_diffusion("250")
        out = d.p_mean_variance(d.call_model(official_small_dit(), r["x"], r["t"], dict(y=r["y"])), r["x"], r["t"])
    for k in ("mean", "log_variance", "pred_xstart"):
        assert_matches(out[k], r[k], 1e-5, msg=k)


def test_one_ddpm_step_equals_the_official_diffusion(reference):
    r = {k[len("diff.p_sample."):]: v for k, v in reference.items() if k.startswith("diff.p_sample.")}
    model = official_small_dit()
    torch.manual_seed(int(r["seed"]))                                           # the step's randn_like noise
    with torch.no_grad():
        out = create_diffusion("").p_sample(model, r["x"], r["t"], model_kwargs=dict(y=r["y"]))
    assert_matches(out, r["sample"], 1e-5)


def test_ddpm_sampling_with_cfg_equals_the_official_diffusion(reference):
    r = {k[len("diff.ddpm10."):]: v for k, v in reference.items() if k.startswith("diff.ddpm10.")}
    model, z = official_small_dit(), torch.cat([r["z"], r["z"]])
    torch.manual_seed(int(r["seed"]))                                           # each step's randn_like noise
    samples = create_diffusion("10").p_sample_loop(model.forward_with_cfg, z.shape, z,
                                                   model_kwargs=dict(y=r["y"], cfg_scale=4.0), device="cpu")
    assert_matches(samples, r["samples"], 1e-4)


def test_ddim_sampling_equals_the_official_diffusion(reference):
    r = {k[len("diff.ddim10."):]: v for k, v in reference.items() if k.startswith("diff.ddim10.")}
    samples = create_diffusion("ddim10").ddim_sample_loop(official_small_dit(), r["z"].shape, r["z"],
                                                          model_kwargs=dict(y=r["y"]), device="cpu")
    assert_matches(samples, r["samples"], 1e-4)


def test_dpm_solver_timesteps_equal_diffusers(reference):
    d = create_diffusion("")
    for steps in (10, 15, 20, 25, 50):                  # linspace(0, 999, steps + 1), rounded, reversed, 0 dropped
        assert torch.equal(torch.from_numpy(d.dpm_solver_timesteps(steps)), reference[f"dpm.timesteps.{steps}"]), steps


def test_dpm_solver_equals_diffusers(reference):
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, linspace, final sigma 0) driving the official
    small DiT's eps: 10 steps with CFG on [z; z] and 25 plain steps."""
    d, model = create_diffusion(""), official_small_dit()
    r = {k[len("dpm.cfg10."):]: v for k, v in reference.items() if k.startswith("dpm.cfg10.")}
    z = torch.cat([r["z"], r["z"]])
    samples = d.dpm_solver_sample_loop(model.forward_with_cfg, z.shape, z, steps=10,
                                       model_kwargs=dict(y=r["y"], cfg_scale=4.0), device="cpu")
    assert_matches(samples, r["samples"], 1e-4, msg="10 steps with CFG")
    r = {k[len("dpm.plain25."):]: v for k, v in reference.items() if k.startswith("dpm.plain25.")}
    samples = d.dpm_solver_sample_loop(model, r["z"].shape, r["z"], steps=25, model_kwargs=dict(y=r["y"]), device="cpu")
    assert_matches(samples, r["samples"], 1e-4, msg="25 steps")


def test_dpm_solver_sde_timesteps_equal_diffusers(reference):
    for steps in (1, 2, 3, 10, 25, 50):                 # the ODE's: linspace, rounded, reversed, 0 dropped
        timesteps = sample_module.Sampler("dpm++2m-sde", steps).timesteps
        assert torch.equal(torch.from_numpy(timesteps), reference[f"dpmsde.timesteps.{steps}"]), steps


@pytest.mark.parametrize("run", ["cfg1", "cfg2", "cfg3", "cfg10", "cfg25", "cfg50", "plain20"])
def test_dpm_solver_sde_equals_diffusers(reference, run):
    """diffusers' DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++" (order 2, midpoint, linspace,
    final sigma 0), driving the official small DiT's eps with variance_noise = one randn_like(x) a step, from the
    stream seeded before x_T: sample.py's dpm++2m-sde, given the same seed, draws the same x_T and the same noise,
    so it must land on the same samples. With CFG on [z; z] at 1 (first order only), 2, 3, 10, 25 and 50 steps,
    and 20 plain steps."""
    r = {k[len(f"dpmsde.{run}."):]: v for k, v in reference.items() if k.startswith(f"dpmsde.{run}.")}
    model, steps = official_small_dit(), int(re.sub(r"\D", "", run))          # "cfg25" -> 25
    loop = sample_module.Sampler("dpm++2m-sde", steps).loop()
    torch.manual_seed(int(r["seed"]))
    z = torch.randn(2, 4, 8, 8)                                                 # (N, C, H, W): x_T
    assert torch.equal(z, r["z"])
    if run.startswith("cfg"):
        x, net, kw = torch.cat([z, z]), model.forward_with_cfg, dict(y=r["y"], cfg_scale=4.0)   # (2N, C, H, W)
    else:
        x, net, kw = z, model, dict(y=r["y"])
    samples = loop(net, x.shape, x, model_kwargs=kw, device="cpu")
    assert_matches(samples, r["samples"], 1e-4)


# ---- Sampling: the authors' flow, end to end -----------------------------------------------------------------

def test_sample_images_equal_the_authors_sampling_flow(reference, tmp_path):
    import sample
    r = {k[len("e2e."):]: v for k, v in reference.items() if k.startswith("e2e.")}
    vae, decoded_by_vae = seeded_vae(tmp_path / "vae"), []
    decode = vae.decode                            # keep what the VAE is given and returns (the floats before uint8)
    vae.decode = lambda z: decoded_by_vae.append((z, decode(z))) or decoded_by_vae[-1][1]
    model = authors_fine_dit()
    images = sample.sample_images(model, r["classes"], sample.guide_labels(model, r["classes"], "superclass"), 4.0,
                                  sample.Sampler("ddpm", 10), vae=vae, seed=int(r["seed"]), progress=False)
    (z, decoded), = decoded_by_vae
    assert_matches(z, r["latents"] / 0.18215, 1e-4)   # the conditional half, scaled
    assert_matches(decoded, r["decoded"], 1e-4)
    assert images.dtype == torch.uint8
    assert torch.equal(images, torch.clamp(127.5 * decoded + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8))
    assert_pixels_match(images, r["uint8"], r["decoded"], 1e-4)


def test_cli_group_guide_rows_equal_the_authors_superclass_rows_of_the_builtin_inat21_table(reference):
    """The reference's "cli" group (the authors' sampling flow, one class per run) was guided by the label rows
    the authors' token_drop gave its classes, one of each iNat21 superclass: K + superclass(c) by the built-in
    table, so sample.py guides the same rows of the same checkpoint."""
    classes, guide = reference["cli.classes"].tolist(), reference["cli.guide_rows"].tolist()
    superclass_of = data.inat21_superclass_of(10000)
    assert sorted(superclass_of[c] for c in classes) == list(range(11))
    assert guide == [10000 + superclass_of[c] for c in classes]


def test_sample_py_on_the_authors_file_draws_the_authors_pixels_for_a_class_of_every_superclass(
        reference, tmp_path, monkeypatch, capsys, label_lookups):
    """The "cli" group: the authors' own sampling flow (their DiT, token_drop's guide rows, DiT's p_sample_loop,
    diffusers' VAE) for one class of each iNat21 superclass, 2 samples, seed 0, 10 DDPM steps, w = 4. Here the same
    weights go into a file saved as the authors save theirs ({"model", "ema", "opt", "args"}, 10,000 + 11 rows, no
    hierarchy inside) and `python sample.py` must read it and draw the same pixels."""
    monkeypatch.chdir(tmp_path)
    r = {k[len("cli."):]: v for k, v in reference.items() if k.startswith("cli.")}
    dit = DiT_models["DiT-T/2"](input_size=8, num_classes=10000, num_superclasses=11, null_class=False,
                                norm_affine=True)
    missing, _ = dit.load_state_dict(seeded_state(dit.state_dict()), strict=False)   # its own sin-cos positions
    assert missing == ["pos_embed"]
    torch.save({"model": dit.state_dict(), "ema": dit.state_dict(), "opt": {},
                "args": argparse.Namespace(model="DiT-XL/2")}, "FineDiffusion-iNat.pt")
    seeded_vae("sd-vae-ft-ema", config=CLI_VAE_CONFIG)
    for c, row, uint8, decoded in zip(r["classes"].tolist(), r["guide_rows"].tolist(), r["uint8"], r["decoded"]):
        label_lookups.clear()
        proc = run_main(sample_module, "--class-id", c, "--ckpt", "FineDiffusion-iNat.pt", "--vae", "sd-vae-ft-ema",
                        "--num-samples", 2, "--steps", 10, "--seed", 0, "--per-sample-dir", f"each{c}",
                        "--out", "grid.png", capsys=capsys)
        assert proc.returncode == 0, proc.stderr
        _, guide = guide_halves(label_lookups)
        assert (guide == row).all() and f"superclass row {row} " in proc.stderr
        images = torch.stack([torch.from_numpy(np.array(Image.open(f"each{c}/{c:05d}_{i:04d}.png"))) for i in range(2)])
        assert_pixels_match(images, uint8, decoded, 1e-4, msg=c)


def test_sample_py_on_a_file_in_the_authors_512_layout_draws_the_authors_pixels(reference, tmp_path, monkeypatch,
                                                                                 capsys, label_lookups):
    """The "cli512" group: the authors' sampling flow at --image-size 512 (their sample.py changes only the latent size,
    to 64 x 64) for one class, 2 samples, seed 0, 10 DDPM steps, w = 4. The same weights at 64 x 64 latents (a 512 px
    position table) go into a file saved as the authors save FineDiffusion-iNat-512.pt, and the VAE into
    pretrained/sd-vae-ft-mse, their sample.py's default: `python sample.py` must find both, guide from the authors' row,
    and draw the same latents and pixels (every 8th row and column of the 512 x 512 images is pinned)."""
    monkeypatch.chdir(tmp_path)
    r = {k[len("cli512."):]: v for k, v in reference.items() if k.startswith("cli512.")}
    dit = DiT_models["DiT-T/2"](input_size=64, num_classes=10000, num_superclasses=11, null_class=False,
                                norm_affine=True)
    missing, _ = dit.load_state_dict(seeded_state(dit.state_dict()), strict=False)   # its own sin-cos positions
    assert missing == ["pos_embed"] and dit.pos_embed.shape == (1, 32 * 32, 128)
    os.makedirs("pretrained")
    torch.save({"model": dit.state_dict(), "ema": dit.state_dict(), "opt": {},
                "args": argparse.Namespace(model="DiT-XL/2", image_size=512, num_classes=10000)},
               "pretrained/FineDiffusion-iNat-512.pt")
    seeded_vae("pretrained/sd-vae-ft-mse", config=CLI_VAE_CONFIG)
    decode, latents = AutoencoderKL.decode, []
    monkeypatch.setattr(AutoencoderKL, "decode", lambda self, z: latents.append(z) or decode(self, z))
    (c,), (row,) = r["classes"].tolist(), r["guide_rows"].tolist()
    proc = run_main(sample_module, "--class-id", c, "--ckpt", "FineDiffusion-iNat-512.pt", "--num-samples", 2,
                    "--steps", 10, "--seed", 0, "--per-sample-dir", "each", "--out", "grid.png", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    _, guide = guide_halves(label_lookups)
    assert len(label_lookups) == 10 and (guide == row).all() and f"superclass row {row} (Birds)" in proc.stderr
    assert "decoded by pretrained/sd-vae-ft-mse/" in proc.stderr
    (z,) = latents
    assert_matches(z, r["latents"] / 0.18215, 1e-4)
    images = torch.stack([torch.from_numpy(np.array(Image.open(f"each/{c:05d}_{i:04d}.png"))) for i in range(2)])
    assert images.shape == (2, 512, 512, 3)
    assert_pixels_match(images[:, ::8, ::8], r["uint8"], r["decoded"], 1e-4)


# ---- SD VAE ---------------------------------------------------------------------------------------------------

def test_vae_encode_equals_diffusers(reference, tmp_path):
    vae = seeded_vae(tmp_path / "vae")
    with torch.no_grad():
        mean, logvar = vae.encode(reference["vae.x"])
    assert_matches(mean, reference["vae.encode.mean"], 1e-5)
    assert_matches(logvar, reference["vae.encode.logvar"], 1e-5)


def test_vae_decode_equals_diffusers(reference, tmp_path):
    vae = seeded_vae(tmp_path / "vae")
    with torch.no_grad():
        out = vae.decode(reference["vae.z"])
    assert_matches(out, reference["vae.decode.out"], 1e-5)


def test_vae_logvar_clamp_equals_diffusers(reference, tmp_path):
    vae = seeded_vae(tmp_path / "vae", logvar_shift=(21.0, -29.0, 0.0, 0.0))   # some log-variances past 20 / -30
    with torch.no_grad():
        mean, logvar = vae.encode(reference["vae.x"])
    expected = reference["vae.clamp.logvar"]
    assert (expected == 20).any() and (expected == -30).any()
    assert_matches(mean, reference["vae.clamp.mean"], 1e-5)
    assert_matches(logvar, expected, 1e-5)


# ---- FID --------------------------------------------------------------------------------------------------------

def test_fid_inception_features_equal_pytorch_fid(reference, tmp_path):
    path = tmp_path / fid_inception.FID_WEIGHTS                  # seeded weights in the published file layout
    torch.save(seeded_state(FIDInceptionV3().state_dict()), path)
    with torch.no_grad():
        features = load_inception(path)(reference["fid.images"])
    assert_matches(features, reference["fid.features"], 1e-5)


@pytest.mark.parametrize("case", ["full", "lowrank", "singular"])
def test_frechet_distance_equals_pytorch_fid(reference, case):
    from scipy import linalg
    r = {k[len(f"fid.fd.{case}."):]: v.numpy() for k, v in reference.items() if k.startswith(f"fid.fd.{case}.")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = frechet_distance(r["mu1"], r["sigma1"], r["mu2"], r["sigma2"])
        # "singular": pytorch-fid's sqrtm(sigma1 sigma2) was non-finite, so its eps-offset fallback gave the value.
        # Whether sqrtm fails hinges on round-off; where this machine's scipy disagrees with the reference's, the
        # fallback's effect (about 2e-4 relative) is all that may differ.
        same_path = bool(r["fallback"]) != bool(np.isfinite(linalg.sqrtm(r["sigma1"] @ r["sigma2"])).all())
    assert value == pytest.approx(float(r["value"]), rel=1e-8 if same_path else 1e-3)


# ---- LPIPS ------------------------------------------------------------------------------------------------------

def test_lpips_equals_the_lpips_package(reference, tmp_path):
    alexnet_path, lin_path = tmp_path / evaluate.ALEXNET_WEIGHTS, tmp_path / evaluate.LPIPS_LIN_WEIGHTS
    trunk = {k: v for k, v in alexnet().state_dict().items() if k.startswith("features.")}   # published key names
    torch.save(seeded_state(trunk), alexnet_path)
    heads = {f"lin{i}.model.1.weight": torch.zeros(1, c, 1, 1) for i, c in enumerate(LPIPS.channels)}
    torch.save(seeded_state(heads), lin_path)
    with torch.no_grad():
        distance = LPIPS.from_pretrained(alexnet_path, lin_path)(reference["lpips.x"], reference["lpips.y"])
    assert_matches(distance, reference["lpips.distance"], 1e-5)


# ---- KID, IS, precision/recall (torch-fidelity), sFID (ADM's evaluator) ----------------------------------------

def test_inception_logits_and_spatial_features_equal_torch_fidelitys(reference, tmp_path):
    """torch-fidelity's InceptionV3, the same weights, a black image (its scaling and pytorch-fid's agree there): its
    pool features, the logits its IS reads ("logits_unbiased": no fc bias) and Mixed_6d.branch1x1's first 7 channels in
    NHWC order (ADM's mixed_6/conv[..., :7]) equal what our one pass gives. rtol 1e-5: one forward pass, as
    fid.features."""
    path = tmp_path / fid_inception.FID_WEIGHTS
    torch.save(seeded_state(FIDInceptionV3().state_dict()), path)
    with torch.no_grad():
        outputs = load_inception(path).forward_all(torch.zeros(1, 3, 75, 75))
    for ours, name in zip(outputs, ("pool", "logits", "spatial")):
        assert_matches(ours, reference[f"metrics.net.{name}"], 1e-5, msg=name)


def test_kid_equals_torch_fidelity(reference):
    """Both in float64 on the same subsets: only the order of the kernel sums differs (rel 1e-9 is 1e3 times that
    round-off, which the cancellation between the sums amplifies)."""
    fake, real = reference["metrics.fake"].numpy(), reference["metrics.real"].numpy()
    *kid, m = fid_inception.kernel_inception_distance(fake, real, subset_size=100)
    assert m == 100 and kid == pytest.approx(reference["metrics.kid"].tolist(), rel=1e-9)
    *kid, m = fid_inception.kernel_inception_distance(fake[:40], real)      # 40 < 1000 images: subsets of all 40
    assert m == 40 and kid == pytest.approx(reference["metrics.kid_small"].tolist(), rel=1e-9)


def test_inception_score_equals_torch_fidelity(reference):
    """The same shuffle and splits, float64 softmax: rel 1e-9."""
    score = fid_inception.inception_score(reference["metrics.logits"].numpy())
    assert list(score) == pytest.approx(reference["metrics.is"].tolist(), rel=1e-9)


def test_precision_and_recall_equal_torch_fidelity(reference):
    """Shares of 300 generated and 250 real features, distances in float32 as torch-fidelity's: equal here; another
    CPU's kernels may tip a feature at a round-off tie, so one feature (1/250) is allowed. Rows in batches of at most
    64 x 300 distances (64 or 76 rows), torch-fidelity's all at once: the batching changes nothing."""
    real, fake = reference["metrics.real"], reference["metrics.fake"]
    precision_recall = fid_inception.precision_recall(real, fake, max_distances=64 * 300)
    assert list(precision_recall) == pytest.approx(reference["metrics.prc"].tolist(), abs=1 / 250)


def test_sfid_equals_adms_evaluator(reference):
    """ADM's activations are NHWC; ours come out of Mixed_6d as NCHW. ADM takes the mean of float32 activations in
    float32, we in float64: rel 1e-5."""
    a, b = (fid_inception.spatial_features(reference[f"metrics.sfid.{k}"].permute(0, 3, 1, 2)) for k in "ab")
    value = frechet_distance(*feature_stats(a.numpy()), *feature_stats(b.numpy()))
    assert value == pytest.approx(float(reference["metrics.sfid.value"]), rel=1e-5)


# ------------------------------------------------------------------------------------------------------------
# sample.py
# ------------------------------------------------------------------------------------------------------------

TOY_HIERARCHY = dict(class_names=[f"shape{c // 4}/tint{c % 4}" for c in range(16)],
                     superclass_names=[f"shape{s}" for s in range(4)], superclass_of=[c // 4 for c in range(16)])


def write_our_checkpoint(path, hierarchy=TOY_HIERARCHY):
    """A checkpoint in train.py's format (full tensors), pixel-space FineDiffusion DiT-T/4 at 16 px."""
    config = dict(name="DiT-T/4", image_size=16, num_classes=len(hierarchy["class_names"]),
                  num_superclasses=len(hierarchy["superclass_names"]), method="finediffusion", pixel_space=True)
    model = randomize(build_model(**config, hierarchy=hierarchy))
    torch.save(dict(model=model.state_dict(), ema=model.state_dict(), config=config, hierarchy=hierarchy,
                    args=dict(data="toy"), step=1, base=None), path)
    return model


def png_size(path):
    from PIL import Image
    with Image.open(path) as im:
        return im.size


def test_sample_script_writes_a_grid_from_our_checkpoint(tmp_path):
    write_our_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "grid.png"
    proc = run_script("sample.py", "--ckpt", str(tmp_path / "ckpt.pt"), "--class-id", "5", "--num-samples", "2",
                      "--steps", "3", "--out", str(out), "--per-sample-dir", str(tmp_path / "each"))
    assert proc.returncode == 0, proc.stderr
    assert png_size(out) == (2 * 128 + 3 * 2, 128 + 2 * 2)         # 16 px shown 8x; make_grid: 2 a row, 2 px padding
    assert png_size(tmp_path / "each" / "00005_0000.png") == (16, 16)  # each sample at its own size
    assert "16 px samples shown 8x larger (nearest neighbour)" in proc.stdout
    assert sorted(os.listdir(tmp_path / "each")) == ["00005_0000.png", "00005_0001.png"]
    assert "superclass row 17 (shape1)" in proc.stderr


def test_sample_script_decodes_latents_with_a_published_layout_vae(tmp_path):
    torch.manual_seed(0)
    dit = randomize(DiT_models["DiT-T/4"](input_size=8, num_classes=10))     # official layout: K + null
    torch.save(dit.state_dict(), tmp_path / "dit.pt")
    write_tiny_vae(tmp_path / "vae")
    out = tmp_path / "s.png"
    proc = run_script("sample.py", "--ckpt", str(tmp_path / "dit.pt"), "--vae", str(tmp_path / "vae"), "--class-id",
                      "3", "--guidance", "null", "--num-samples", "1", "--sampler", "ddim", "--steps", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert png_size(out) == (128, 128)                               # 8x8 latents, 8x VAE: 64 px, shown 2x


def test_class_name_resolves_through_the_checkpoint_hierarchy():
    from hardening import resolve_class, UserError
    assert resolve_class(TOY_HIERARCHY, 16, class_name="shape2/tint3") == 11
    with pytest.raises(UserError, match="matches 4 classes"):
        resolve_class(TOY_HIERARCHY, 16, class_name="shape2")


def test_sample_images_are_reproducible_and_guidance_changes_them(tmp_path):
    from sample import Sampler, guide_labels, sample_images
    model = write_our_checkpoint(tmp_path / "c.pt").eval()
    guide = guide_labels(model, [1, 2], "superclass")
    a = sample_images(model, [1, 2], guide, 4.0, Sampler("ddpm", 3), seed=7, progress=False)
    b = sample_images(model, [1, 2], guide, 4.0, Sampler("ddpm", 3), seed=7, progress=False)
    c = sample_images(model, [1, 2], None, 4.0, Sampler("ddpm", 3), seed=7, progress=False)
    assert a.shape == (2, 16, 16, 3) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_script_samples_with_dpm_solver_in_a_guidance_interval(tmp_path):
    write_our_checkpoint(tmp_path / "ckpt.pt")
    proc = run_script("sample.py", "--ckpt", str(tmp_path / "ckpt.pt"), "--class-id", "5", "--num-samples", "2",
                      "--sampler", "dpm++2m", "--steps", "3", "--guidance-interval", "200", "700",
                      "--out", tmp_path / "g.png")
    assert proc.returncode == 0, proc.stderr
    assert png_size(tmp_path / "g.png") == (2 * 128 + 3 * 2, 128 + 2 * 2)
    assert "eq. 1 at 2 of them" in proc.stderr                        # timesteps 999, 666, 333


def test_sample_script_samples_with_dpm_solver_sde(tmp_path, capsys):
    write_our_checkpoint(tmp_path / "ckpt.pt")
    proc = run_main(sample_module, "--ckpt", tmp_path / "ckpt.pt", "--class-id", "5", "--num-samples", "2",
                    "--sampler", "dpm++2m-sde", "--steps", "3", "--out", tmp_path / "s.png", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert png_size(tmp_path / "s.png") == (2 * 128 + 3 * 2, 128 + 2 * 2)


def network_batches(model, run):
    """[(t, batch size)] of every DiT forward pass while `run()` samples."""
    calls, forward = [], model.forward
    model.forward = lambda x, t, y: calls.append((int(t[0]), len(x))) or forward(x, t, y)
    try:
        run()
    finally:
        del model.forward
    return calls


def test_steps_default_to_each_samplers_own_count():
    parse = lambda *argv: sample_module.sampler_of(sample_module.parse_args(["--class-id", "1", *argv]))
    samplers = ("ddpm", "ddim", "dpm++2m", "dpm++2m-sde")
    assert [len(parse("--sampler", s).timesteps) for s in samplers] == [250, 50, 20, 20]
    assert len(parse("--sampler", "dpm++2m", "--steps", "12").timesteps) == 12


def test_guidance_interval_runs_the_dit_on_the_conditional_half_outside_it(tmp_path):
    from sample import Sampler, guide_labels, sample_images
    model = write_our_checkpoint(tmp_path / "c.pt").eval()
    guide = guide_labels(model, [1, 2], "superclass")
    calls = network_batches(model, lambda: sample_images(model, [1, 2], guide, 4.0, Sampler("ddim", 10, (500, 700)),
                                                         progress=False))
    assert calls == [(t, 4 if 500 <= t <= 700 else 2) for t in range(900, -1, -100)]   # both bounds included


def test_guidance_interval_over_every_step_equals_guidance_at_every_step(tmp_path):
    from sample import Sampler, guide_labels, sample_images
    model = write_our_checkpoint(tmp_path / "c.pt").eval()
    guide = guide_labels(model, [1, 2], "superclass")
    everywhere = sample_images(model, [1, 2], guide, 4.0, Sampler("ddpm", 5), seed=3, progress=False)
    interval = sample_images(model, [1, 2], guide, 4.0, Sampler("ddpm", 5, (0, 999)), seed=3, progress=False)
    assert torch.equal(everywhere, interval)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_guidance_interval_without_a_step_equals_no_guidance_for_a_deterministic_sampler(tmp_path, sampler):
    """Outside the interval the conditional half's eps is eps(x_t | c) exactly, so an interval that holds no step
    (ddim10 and dpm++2m 10 step at multiples of 100, and 999) is --guidance none. (DDPM's noise is drawn over the
    whole [x_t; x_t] batch, so there the random stream differs.)"""
    from sample import Sampler, guide_labels, sample_images
    model = write_our_checkpoint(tmp_path / "c.pt").eval()
    guide = guide_labels(model, [1, 2], "superclass")
    unguided = sample_images(model, [1, 2], None, 4.0, Sampler(sampler, 10), seed=3, progress=False)
    empty = sample_images(model, [1, 2], guide, 4.0, Sampler(sampler, 10, (101, 199)), seed=3, progress=False)
    guided = sample_images(model, [1, 2], guide, 4.0, Sampler(sampler, 10), seed=3, progress=False)
    assert torch.equal(unguided, empty) and not torch.equal(unguided, guided)


def test_sample_script_names_the_missing_vae(tmp_path):
    torch.save(DiT_models["DiT-T/4"](input_size=8, num_classes=10).state_dict(), tmp_path / "dit.pt")
    proc = run_script("sample.py", "--ckpt", str(tmp_path / "dit.pt"), "--vae", str(tmp_path / "nowhere"), "--class-id", "1")
    assert_one_line_error(proc, "sd-vae-ft-ema")
    proc = run_script(os.path.join(HERE, "sample.py"), "--ckpt", str(tmp_path / "dit.pt"), "--class-id", "1", cwd=tmp_path)
    assert_one_line_error(proc, "sd-vae-ft-ema", "pretrained/", "huggingface.co")


# ------------------------------------------------------------------------------------------------------------
# Wiring, end to end: published checkpoint files through the commands users run, asserting on what reaches the DiT
# ------------------------------------------------------------------------------------------------------------
# Each file is saved as its publisher saves it: the authors' FineDiffusion-iNat.pt ({"model", "ema", "opt", "args"},
# 10,000 + 11 label rows, LayerNorm affine, no hierarchy inside), the official DiT-XL-2-256x256.pt (a bare state dict,
# 1,000 + 1 rows) and ours (a delta checkpoint of train.py). The expected guide rows come from the authors' own
# subclass -> superclass table (AUTHORS_INAT21_RANGES, data transcribed from their sample.py), never from the code.

# The authors' superclass rows, in the order of their label table.
AUTHORS_SUPERCLASS_NAMES = ["Plants", "Insects", "Birds", "Fungi", "Reptiles", "Mammals", "Ray-finned Fishes",
                            "Amphibians", "Mollusks", "Arachnids", "Animalia"]
# One iNat21 class inside each of the 11 superclass ranges (Animalia: an id outside every range).
CLASS_OF_EACH_SUPERCLASS = [7000, 1908, 4021, 5476, 5000, 4700, 2800, 3000, 5300, 100, 170]


def authors_superclass(c):
    """The authors' superclass of iNat21 class c: the range that holds it, else Animalia (10)."""
    return next((s for s, (first, last) in AUTHORS_INAT21_RANGES.items() if first <= c <= last), 10)


def test_one_class_of_each_superclass_range_is_listed():
    assert sorted(authors_superclass(c) for c in CLASS_OF_EACH_SUPERCLASS) == list(range(11))


@pytest.fixture(scope="module")
def published_files(tmp_path_factory):
    """pretrained/ as users fill it: FineDiffusion-iNat.pt in the authors' layout, DiT-XL-2-256x256.pt in the
    official one (both DiT-T/2 on 8x8 latents, random weights) and two 8x SD-layout VAEs, sd-vae-ft-ema/ and
    sd-vae-ft-mse/ (the one the authors' sample.py decodes their files with)."""
    root = tmp_path_factory.mktemp("published")
    os.makedirs(root / "pretrained")
    authors = randomize(DiT_models["DiT-T/2"](input_size=8, num_classes=10000, num_superclasses=11,
                                              null_class=False, norm_affine=True))
    torch.save({"model": authors.state_dict(), "ema": authors.state_dict(), "opt": {},
                "args": argparse.Namespace(model="DiT-XL/2", image_size=256, num_classes=10000)},
               root / "pretrained" / "FineDiffusion-iNat.pt")
    official = randomize(DiT_models["DiT-T/2"](input_size=8, num_classes=1000))
    torch.save(official.state_dict(), root / "pretrained" / "DiT-XL-2-256x256.pt")
    write_tiny_vae(root / "pretrained" / "sd-vae-ft-ema")
    write_tiny_vae(root / "pretrained" / "sd-vae-ft-mse", seed=1)
    return root


def guide_halves(label_lookups):
    """(conditional labels, guide rows) of every guided DiT call: the table rows of each half of its batch."""
    halves = [rows.chunk(2) for _, rows in label_lookups]
    return torch.cat([c for c, _ in halves]), torch.cat([g for _, g in halves])


def test_the_authors_file_loads_with_each_class_mapped_to_the_authors_superclass_row(published_files):
    model, info = load_model(str(published_files / "pretrained" / "FineDiffusion-iNat.pt"))
    classes = torch.tensor([4021, 100, 2800, 170, 9999] + CLASS_OF_EACH_SUPERCLASS)
    expected = [10000 + authors_superclass(c) for c in classes.tolist()]
    assert model.y_embedder.tier_ids(classes).tolist() == expected
    assert model.hierarchy["superclass_names"] == AUTHORS_SUPERCLASS_NAMES


def test_sample_py_guides_a_class_of_every_superclass_of_the_authors_file_from_its_row_and_says_which(
        published_files, monkeypatch, capsys, label_lookups):
    monkeypatch.chdir(published_files)
    for c in CLASS_OF_EACH_SUPERCLASS:
        label_lookups.clear()
        proc = run_main(sample_module, "--class-id", c, "--ckpt", "FineDiffusion-iNat.pt", "--num-samples", 2,
                        "--steps", 2, "--out", "samples/s.png", capsys=capsys)   # found under pretrained/
        assert proc.returncode == 0, proc.stderr
        conditional, guide = guide_halves(label_lookups)
        row = 10000 + authors_superclass(c)
        assert len(label_lookups) == 2 and (conditional == c).all() and (guide == row).all()
        name = AUTHORS_SUPERCLASS_NAMES[authors_superclass(c)]
        assert f"class {c} ({c:05d}), guided by superclass row {row} ({name}), w = 4" in proc.stderr
        assert "from pretrained/FineDiffusion-iNat.pt, decoded by pretrained/sd-vae-ft-mse" in proc.stderr


def test_grid_guides_a_class_of_every_superclass_of_the_authors_file_from_its_row(published_files, monkeypatch,
                                                                                    capsys, label_lookups):
    monkeypatch.chdir(published_files)
    proc = run_main(evaluate, "grid", "--ckpt", "FineDiffusion-iNat.pt", "--class-ids", *CLASS_OF_EACH_SUPERCLASS,
                    "--steps", 2, "--out", "fig5.png", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    conditional, guide = guide_halves(label_lookups)
    rows = torch.tensor([10000 + authors_superclass(c) for c in CLASS_OF_EACH_SUPERCLASS])
    assert torch.equal(conditional, torch.tensor(CLASS_OF_EACH_SUPERCLASS).repeat(2))
    assert torch.equal(guide, rows.repeat(2))
    with open("fig5.csv") as f:
        recorded = [int(r["guide_row"]) for r in csv.DictReader(f)]
    assert recorded == rows.tolist()


def test_generate_guides_every_class_it_draws_from_the_authors_file_from_its_row_and_hashes_that_file(
        published_files, monkeypatch, capsys, label_lookups):
    monkeypatch.chdir(published_files)
    proc = run_main(evaluate, "generate", "--ckpt", "FineDiffusion-iNat.pt", "--num-samples", 100, "--steps", 2,
                    "--batch-size", 50, "--out", "gen", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    conditional, guide = guide_halves(label_lookups)
    assert {authors_superclass(c) for c in conditional.tolist()} == set(range(11))   # 100 classes, every range
    assert guide.tolist() == [10000 + authors_superclass(c) for c in conditional.tolist()]
    with open("gen/samples.json") as f:
        manifest = json.load(f)
    with open("pretrained/FineDiffusion-iNat.pt", "rb") as f:
        assert manifest["made_by"]["ckpt_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert manifest["hierarchy"]["superclass_names"] == AUTHORS_SUPERCLASS_NAMES


def test_generate_decodes_the_latents_of_the_authors_file_with_the_vae_to_its_image_size(published_files, monkeypatch,
                                                                                           capsys):
    monkeypatch.chdir(published_files)
    proc = run_main(evaluate, "generate", "--ckpt", "FineDiffusion-iNat.pt", "--num-samples", 2, "--steps", 2,
                    "--out", "gen-size", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    with open("gen-size/samples.json") as f:
        names = [name for name, _ in json.load(f)["images"]]
    assert {png_size(os.path.join("gen-size", name)) for name in names} == {(64, 64)}   # 8x8 latents, 8x VAE


@pytest.mark.parametrize("command", ["sample", "grid", "generate"])
def test_the_official_file_is_guided_from_its_null_row(published_files, monkeypatch, capsys, label_lookups, command):
    monkeypatch.chdir(published_files)
    argv = dict(sample=(sample_module, "--class-id", 7, "--num-samples", 2, "--out", "s.png"),
                grid=(evaluate, "grid", "--class-ids", 7, 8, "--out", "g.png"),
                generate=(evaluate, "generate", "--num-samples", 2, "--out", "gen-official"))[command]
    proc = run_main(*argv, "--ckpt", "DiT-XL-2-256x256.pt", "--guidance", "null", "--steps", 2, capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    _, guide = guide_halves(label_lookups)
    assert len(guide) and (guide == 1000).all()


@pytest.fixture(scope="module")
def our_delta(tmp_path_factory):
    """A FineDiffusion run of train.py on the toy data from a base trained on toy-base: a delta checkpoint (its tuned tensors, the
    base's path and sha256, the hierarchy it was trained with)."""
    root = tmp_path_factory.mktemp("ours")
    base = run_train(*TINY_TRAIN, "--data", "toy-base", "--init", "none", "--global-batch-size", "4", "--max-steps", "1",
                     "--run-dir", root / "base")["final_ckpt"]
    run_train(*TINY_TRAIN, "--init", base, "--tune", "finediffusion", "--global-batch-size", "4", "--max-steps", "1",
              "--run-dir", root / "fine")
    return root / "fine"


@pytest.mark.parametrize("command", ["sample", "grid", "generate"])
def test_our_delta_checkpoint_is_guided_from_the_superclass_rows_of_the_hierarchy_it_was_trained_with(
        our_delta, tmp_path, capsys, label_lookups, command):
    superclass_of = toy_module.ToyDataset("toy", images_per_class=1).superclass_of   # the toy data's own hierarchy
    argv = dict(sample=(sample_module, "--class-id", 9, "--num-samples", 2, "--out", tmp_path / "s.png"),
                grid=(evaluate, "grid", "--class-ids", 0, 5, 10, 15, "--out", tmp_path / "g.png"),   # 4 families
                generate=(evaluate, "generate", "--per-class", 1, "--out", tmp_path / "gen"))[command]
    proc = run_main(*argv, "--ckpt", our_delta, "--steps", 2, capsys=capsys)          # a run folder: its newest
    assert proc.returncode == 0, proc.stderr
    conditional, guide = guide_halves(label_lookups)
    assert guide.tolist() == [len(superclass_of) + superclass_of[c] for c in conditional.tolist()]
    assert len(set(guide.tolist())) == {"sample": 1, "grid": 4, "generate": 8}[command]


def test_the_console_names_the_guide_row_the_dit_receives_even_when_it_is_not_the_intended_one(
        published_files, monkeypatch, capsys, label_lookups):
    """Whatever picks the rows, the line reports the row used: here a (deliberately) wrong superclass map."""
    monkeypatch.chdir(published_files)
    monkeypatch.setattr(model_module.TieredEmbedder, "tier_ids", lambda self, y, rank: self.num_classes + 3 + 0 * y)
    proc = run_main(sample_module, "--class-id", 4021, "--ckpt", "FineDiffusion-iNat.pt", "--num-samples", 1,
                    "--steps", 2, "--out", "s.png", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    _, guide = guide_halves(label_lookups)
    assert (guide == 10003).all() and "guided by superclass row 10003 (Fungi)" in proc.stderr


def test_the_vae_follows_the_publisher_sd_vae_ft_mse_for_the_authors_files_sd_vae_ft_ema_for_the_official_dit(
        published_files, monkeypatch, capsys):
    monkeypatch.chdir(published_files)
    for ckpt, guidance, vae in (("FineDiffusion-iNat.pt", "superclass", "sd-vae-ft-mse"),
                                ("DiT-XL-2-256x256.pt", "null", "sd-vae-ft-ema")):
        proc = run_main(sample_module, "--class-id", 7, "--ckpt", ckpt, "--guidance", guidance, "--num-samples", 1,
                        "--steps", 2, "--out", "v.png", capsys=capsys)
        assert proc.returncode == 0 and f"decoded by pretrained/{vae}/" in proc.stderr, proc.stderr
        assert ("the authors' sample.py decodes with sd-vae-ft-mse" in proc.stderr) == (vae == "sd-vae-ft-mse")


def test_the_authors_file_without_sd_vae_ft_mse_names_where_it_is_published(published_files, tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.chdir(tmp_path)
    os.makedirs("pretrained")
    shutil.copy(published_files / "pretrained" / "FineDiffusion-iNat.pt", "pretrained")
    shutil.copytree(published_files / "pretrained" / "sd-vae-ft-ema", "pretrained/sd-vae-ft-ema")
    proc = run_main(sample_module, "--class-id", 7, "--ckpt", "FineDiffusion-iNat.pt", "--steps", 2, capsys=capsys)
    assert_one_line_error(proc, "looked in sd-vae-ft-mse, pretrained/sd-vae-ft-mse",
                          "https://huggingface.co/stabilityai/sd-vae-ft-mse")


# VegFru as its download lays it out (https://github.com/ustc-vim/vegfru): veg200_images/ (200 vegetable subclasses)
# and fru92_images/ (92 fruit subclasses) of image folders, and vegfru_list/ with, for each split, vegfru_<split>.txt
# (`<image path> <subclass 0..291>`) and supvegfru_<split>.txt (the same images, `<image path> <superclass 0..24>`).
# Some folder names are VegFru's own, the rest made up; the subclass -> superclass map is the test's, not in id order,
# and each supvegfru list is shuffled against its vegfru list (they pair by image path, not by line).
VEGFRU_OWN_NAMES = {0: "Chinese_artichoke", 7: "houttuynia_cordata", 12: "kalimeris", 200: "banana", 204: "carambola",
                    231: "grape_white", 240: "green_dates", 283: "sugarcane"}
VEGFRU_NAMES = [VEGFRU_OWN_NAMES.get(k, f"vegetable_{k:03d}" if k < 200 else f"fruit_{k - 200:02d}")
                for k in range(292)]
VEGFRU_SUPERCLASS = [(7 * k) % 15 if k < 200 else 15 + (3 * k) % 10 for k in range(292)]  # 15 veg, 10 fruit sup-classes
VEGFRU_IMAGES = {"train": 2, "val": 1, "test": 1}                                          # images a subclass per split


def vegfru_image(k, split, i):
    """Image i of subclass k in a split, named as VegFru names them (v_<sup>_<sub>_<n>.jpg, f_... for fruit)."""
    s, first = VEGFRU_SUPERCLASS[k], {"train": 1, "val": 3, "test": 4}[split]
    tree, prefix, s = ("veg200_images", "v", s + 1) if k < 200 else ("fru92_images", "f", s - 14)
    return f"{tree}/{VEGFRU_NAMES[k]}/{prefix}_{s:02d}_{VEGFRU_SUPERCLASS[:k].count(VEGFRU_SUPERCLASS[k]) + 1:02d}_" \
           f"{first + i:04d}.jpg"


@pytest.fixture(scope="module")
def vegfru_root(tmp_path_factory):
    """VegFru's layout with its 292 + 25 classes, 20 x 16 px images, each superclass s in its own red (8 s)."""
    root = tmp_path_factory.mktemp("vegfru")
    os.makedirs(root / "vegfru_list")
    rng = np.random.default_rng(0)
    for split, n in VEGFRU_IMAGES.items():
        lines = [(vegfru_image(k, split, i), k) for k in range(292) for i in range(n)]
        for path, k in lines:
            write_image(str(root / path), (8 * VEGFRU_SUPERCLASS[k], (5 * k) % 256, 60 * n), (20, 16))
        (root / "vegfru_list" / f"vegfru_{split}.txt").write_text("".join(f"{p} {k}\n" for p, k in lines))
        shuffled = [lines[i] for i in rng.permutation(len(lines))]
        (root / "vegfru_list" / f"supvegfru_{split}.txt").write_text(
            "".join(f"{p} {VEGFRU_SUPERCLASS[k]}\n" for p, k in shuffled))
    return root


def test_data_py_info_on_vegfru_counts_the_subclasses_and_images_of_each_superclass_of_the_lists(vegfru_root, capsys):
    proc = run_main(data, "info", "--data", "vegfru", "--data-path", vegfru_root, "--split", "val", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "vegfru val: 292 images, 292 classes, 25 superclasses"
    for s, line in enumerate(lines[1:]):
        n = VEGFRU_SUPERCLASS.count(s)
        assert line.split() == [str(s), "sup-class", str(s), str(n), "classes", str(n), "images"]


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_vegfru_split_yields_its_lists_images_with_their_subclass_and_one_hierarchy_for_all_splits(vegfru_root,
                                                                                                       split):
    dataset = data.build_dataset("vegfru", str(vegfru_root), 16, split=split, flip=False)
    assert dataset.class_names == VEGFRU_NAMES and dataset.superclass_of == VEGFRU_SUPERCLASS
    assert dataset.superclass_names == [f"sup-class {s}" for s in range(25)]
    listed = [(vegfru_image(k, split, i), k) for k in range(292) for i in range(VEGFRU_IMAGES[split])]
    assert [(os.fsdecode(f), y) for f, y in zip(dataset.files, dataset.targets)] == listed
    for index in (0, len(dataset) - 1):                     # the image itself: superclass s is red 8 s
        image, label = dataset[index]
        red = round(float((image[0].mean() + 1) * 127.5))
        assert label == listed[index][1] and abs(red - 8 * VEGFRU_SUPERCLASS[label]) <= 2


def test_train_py_on_vegfru_swaps_each_label_for_the_superclass_row_its_lists_give(vegfru_root, tmp_path,
                                                                                     label_lookups):
    write_tiny_vae(tmp_path / "vae")
    out = run_train("--data", "vegfru", "--data-path", vegfru_root, "--vae", tmp_path / "vae", "--init", "none",
                    "--tune", "finediffusion", "--model", "DiT-T/4", "--image-size", "32", "--num-workers", "0", "--global-batch-size", "16",
                    "--max-steps", "3", "--superclass-prob", "0.5", "--log-every", "1", "--run-dir", tmp_path / "run")
    y = torch.cat([given for given, _ in label_lookups])
    rows = torch.cat([looked_up for _, looked_up in label_lookups])
    swapped = rows >= 292
    assert len(y) == 48 and 0 < int(swapped.sum()) < 48
    assert rows[swapped].tolist() == [292 + VEGFRU_SUPERCLASS[c] for c in y[swapped].tolist()]
    assert torch.equal(rows[~swapped], y[~swapped])
    ckpt = torch.load(out["final_ckpt"], weights_only=True)
    assert ckpt["hierarchy"]["class_names"] == VEGFRU_NAMES and ckpt["hierarchy"]["superclass_of"] == VEGFRU_SUPERCLASS
    assert ckpt["ema"]["y_embedder.embedding_table.weight"].shape[0] == 292 + 25


def test_evaluate_stats_of_vegfru_test_describe_each_superclass_of_the_lists(vegfru_root, tmp_path, monkeypatch,
                                                                               capsys):
    monkeypatch.setattr(evaluate, "load_inception", lambda path=None: MeanColour())
    proc = stats_cli("--data", "vegfru", "--data-path", vegfru_root, "--split", "test", "--image-size", 16, "--out",
                     tmp_path / "vegfru_test.npz", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    stats = np.load(tmp_path / "vegfru_test.npz")
    assert evaluate.stats_hierarchy(stats)["superclass_of"] == VEGFRU_SUPERCLASS and int(stats["count"]) == 292
    for s in range(25):
        assert int(stats[f"count_{s}"]) == VEGFRU_SUPERCLASS.count(s)
        assert abs(float(stats[f"mu_{s}"][0]) - 8 * s / 255) < 3 / 255          # the red of superclass s alone


@pytest.fixture(scope="module")
def authors_vegfru(tmp_path_factory):
    """pretrained/ with FineDiffusion-VegFru.pt as the authors save it (292 + 25 rows, LayerNorm affine, no null row,
    nothing that says which subclass is under which superclass) and sd-vae-ft-mse/."""
    root = tmp_path_factory.mktemp("authors-vegfru")
    os.makedirs(root / "pretrained")
    dit = randomize(DiT_models["DiT-T/2"](input_size=8, num_classes=292, num_superclasses=25, null_class=False,
                                          norm_affine=True))
    torch.save({"model": dit.state_dict(), "ema": dit.state_dict(), "opt": {},
                "args": argparse.Namespace(model="DiT-XL/2", image_size=256, num_classes=292, num_super_classes=25)},
               root / "pretrained" / "FineDiffusion-VegFru.pt")
    write_tiny_vae(root / "pretrained" / "sd-vae-ft-mse")
    return root


def test_sample_py_guides_the_authors_vegfru_file_from_the_superclass_row_vegfrus_lists_give(
        authors_vegfru, vegfru_root, monkeypatch, capsys, label_lookups):
    monkeypatch.chdir(authors_vegfru)
    for who in (["--class-id", 0], ["--class-id", 7], ["--class-id", 151], ["--class-name", "banana"],
                ["--class-id", 283], ["--class-id", 291]):
        label_lookups.clear()
        proc = run_main(sample_module, *who, "--ckpt", "FineDiffusion-VegFru.pt", "--data-path", vegfru_root,
                        "--num-samples", 2, "--steps", 2, "--out", "s.png", capsys=capsys)
        assert proc.returncode == 0, proc.stderr
        c = who[1] if who[0] == "--class-id" else 200
        s = VEGFRU_SUPERCLASS[c]
        conditional, guide = guide_halves(label_lookups)
        assert len(label_lookups) == 2 and (conditional == c).all() and (guide == 292 + s).all()
        assert f"class {c} ({VEGFRU_NAMES[c]}), guided by superclass row {292 + s} (sup-class {s}), w = 4" in proc.stderr
        assert "from pretrained/FineDiffusion-VegFru.pt, decoded by pretrained/sd-vae-ft-mse/" in proc.stderr


def test_evaluate_generate_guides_the_authors_vegfru_file_from_the_superclass_rows_of_data_paths_lists(
        authors_vegfru, vegfru_root, monkeypatch, capsys, label_lookups):
    """Table 1 on VegFru: every class drawn is guided from its own superclass row, and the manifest keeps the lists'
    hierarchy (what the per-superclass FIDs are grouped by)."""
    monkeypatch.chdir(authors_vegfru)
    proc = run_main(evaluate, "generate", "--ckpt", "FineDiffusion-VegFru.pt", "--data-path", vegfru_root,
                    "--num-samples", 25, "--steps", 2, "--batch-size", 25, "--out", "gen", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    conditional, guide = guide_halves(label_lookups)
    assert len(set(VEGFRU_SUPERCLASS[c] for c in conditional.tolist())) > 10
    assert guide.tolist() == [292 + VEGFRU_SUPERCLASS[c] for c in conditional.tolist()]
    with open("gen/samples.json") as f:
        assert json.load(f)["hierarchy"]["superclass_of"] == list(VEGFRU_SUPERCLASS)


def test_grid_reads_vegfrus_lists_at_the_default_root_of_data_vegfru(authors_vegfru, vegfru_root, tmp_path,
                                                                    monkeypatch, capsys, label_lookups):
    """--data vegfru without --data-path: data/vegfru gives the real row and the file's superclasses alike."""
    monkeypatch.chdir(tmp_path)
    os.symlink(authors_vegfru / "pretrained", "pretrained")
    os.makedirs("data")
    os.symlink(vegfru_root, os.path.join("data", "vegfru"))
    proc = run_main(evaluate, "grid", "--ckpt", "FineDiffusion-VegFru.pt", "--class-ids", 3, 200, "--data", "vegfru",
                    "--steps", 2, "--out", "g.png", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    conditional, guide = guide_halves(label_lookups)
    assert sorted(set(conditional.tolist())) == [3, 200]
    assert guide.tolist() == [292 + VEGFRU_SUPERCLASS[c] for c in conditional.tolist()]


@pytest.mark.parametrize("command", ["generate", "grid"])
def test_generate_and_grid_refuse_the_authors_vegfru_file_in_one_line_without_vegfrus_lists(
        command, authors_vegfru, monkeypatch, capsys):
    monkeypatch.chdir(authors_vegfru)
    argv = dict(generate=["--num-samples", 2, "--out", "gen-no-lists"], grid=["--class-ids", 3, "--out", "g.png"])
    proc = run_main(evaluate, command, "--ckpt", "FineDiffusion-VegFru.pt", "--steps", 2, *argv[command],
                    capsys=capsys)
    assert_one_line_error(proc, "25 superclass rows", "--data-path", "vegfru_list/")
    assert not os.path.exists("gen-no-lists") and not os.path.exists("g.png")


def test_data_path_is_read_for_the_authors_vegfru_file_alone(published_files, tmp_path, monkeypatch, capsys):
    """The iNat21 file knows its superclasses: a --data-path without VegFru's lists (an iNat21 root) is not read."""
    monkeypatch.chdir(published_files)
    proc = run_main(sample_module, "--class-id", 4021, "--ckpt", "FineDiffusion-iNat.pt", "--data-path", tmp_path,
                    "--num-samples", 1, "--steps", 2, "--out", "s.png", capsys=capsys)
    assert proc.returncode == 0, proc.stderr


def test_sample_py_refuses_the_authors_vegfru_file_in_one_line_without_vegfrus_lists(authors_vegfru, tmp_path,
                                                                                       monkeypatch, capsys):
    monkeypatch.chdir(authors_vegfru)
    argv = [sample_module, "--class-id", 7, "--ckpt", "FineDiffusion-VegFru.pt", "--steps", 2, "--out", "s.png"]
    assert_one_line_error(run_main(*argv, capsys=capsys), "FineDiffusion-VegFru.pt", "25 superclass rows",
                          "--data-path", "vegfru_list/")
    assert_one_line_error(run_main(*argv, "--data-path", tmp_path, capsys=capsys), str(tmp_path),
                          "no vegfru_list/vegfru_train.txt", "supvegfru_{train,val,test}.txt")
    proc = run_main(*argv, "--guidance", "none", "--num-samples", 1, capsys=capsys)     # no guide: no lists needed
    assert proc.returncode == 0 and "class 7, unguided" in proc.stderr, proc.stderr


@pytest.mark.parametrize("damage, words", [
    (lambda d: os.remove(d / "supvegfru_val.txt"), ["supvegfru_val.txt"]),
    (lambda d: append(d / "vegfru_val.txt", "veg200_images/carrot/v_01_99_0001.jpg 3\n"),
     ["vegfru_val.txt:293", "veg200_images/carrot/v_01_99_0001.jpg", "no line in supvegfru_val.txt"]),
    (lambda d: append(d / "vegfru_test.txt", "veg200_images/v_01_99_0001.jpg 3\n"), ["vegfru_test.txt:293", "expected"]),
    (lambda d: append(d / "vegfru_test.txt", "veg200_images/x/v_1.jpg 3 extra\n"), ["vegfru_test.txt:293", "expected"]),
    (lambda d: [append(d / f"{p}vegfru_test.txt", f"veg200_images/x/v_1.jpg {n}\n") for p, n in (("", 0), ("sup", 0))],
     ["vegfru_test.txt:293", "subclass 0", "folder x"]),
    (lambda d: [append(d / f"{p}vegfru_test.txt", f"{vegfru_image(0, 'train', 0)[:-5]}9.jpg {n}\n")
                for p, n in (("", 0), ("sup", 1))], ["vegfru_test.txt:293", "subclass 0", "superclass 1"]),
    (lambda d: [append(d / f"{p}vegfru_test.txt", f"veg200_images/x/v_1.jpg {n}\n") for p, n in (("", 300), ("sup", 0))],
     ["subclass 292", "of 0 ... 300"]),
])
def test_vegfru_lists_that_do_not_agree_are_refused_in_one_line_naming_the_line(vegfru_root, tmp_path, capsys, damage,
                                                                                 words):
    shutil.copytree(vegfru_root / "vegfru_list", tmp_path / "vegfru_list")
    damage(tmp_path / "vegfru_list")
    proc = run_main(data, "info", "--data", "vegfru", "--data-path", tmp_path, "--split", "train", capsys=capsys)
    assert_one_line_error(proc, *words)


def append(path, text):
    with open(path, "a") as f:
        f.write(text)


# ------------------------------------------------------------------------------------------------------------
# model.py — the SD VAE and .safetensors
# ------------------------------------------------------------------------------------------------------------

TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, latent_channels=4)


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE).eval()


def write_folder(folder, state, fmt="safetensors", config=TINY_VAE):
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
        z = vae_module.scaled_latent(mean, logvar, vae.scaling_factor) / vae.scaling_factor
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
    with pytest.raises(UserError, match=r"quant_conv\.weight.*\[8, 8, 3, 3\].*\[8, 8, 1, 1\]"):
        AutoencoderKL.from_pretrained(write_folder(tmp_path / "vae", sd))


def test_vae_missing_and_unexpected_keys_are_named(tmp_path):
    sd = tiny_vae().state_dict()
    del sd["decoder.conv_out.bias"]
    with pytest.raises(UserError, match=r"missing tensor 'decoder\.conv_out\.bias'"):
        AutoencoderKL(**TINY_VAE).load_vae_state_dict(sd)
    sd = {**tiny_vae().state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(UserError, match=r"unexpected tensor 'extra\.weight'"):
        AutoencoderKL(**TINY_VAE).load_vae_state_dict(sd)


class NotATensor:  # stands in for arbitrary code a malicious pickle could run
    pass


def test_vae_bin_with_pickled_object_is_refused(tmp_path):
    sd = {**tiny_vae().state_dict(), "payload": NotATensor()}
    folder = write_folder(tmp_path / "vae", sd, fmt="bin")
    with pytest.raises(UserError, match="refusing"):
        AutoencoderKL.from_pretrained(folder)


def test_vae_missing_path_error_points_to_published_files(tmp_path):
    with pytest.raises(UserError, match="sd-vae-ft-ema") as e:
        AutoencoderKL.from_pretrained(tmp_path / "no_such_vae")
    assert "no_such_vae" in str(e.value) and "\n" not in str(e.value)


def test_vae_from_config_ignores_other_keys_and_takes_its_latent_scale():
    vae = AutoencoderKL.from_config({"_class_name": "AutoencoderKL", "sample_size": 256, "act_fn": "silu", **TINY_VAE,
                                     "scaling_factor": 0.13025})
    assert vae.config["block_out_channels"] == [32, 64] and len(vae.encoder.down_blocks) == 2
    assert vae.scaling_factor == vae.config["scaling_factor"] == 0.13025          # SDXL's, from its config
    assert AutoencoderKL.from_config(TINY_VAE).scaling_factor == 0.18215          # the SD VAE's, where none is said


# ------------------------------------------------------------------------------------------------------------
# data.py
# ------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------
# fixtures written by the tests
# ---------------------------------------------------------------------------------------------------------------

INAT_FOLDERS = {  # folder name -> (json supercategory, json name)
    "00004_Animalia_Arthropoda_Arachnida_Araneae_Araneidae_Araneus_diadematus": ("Arachnids", "Araneus diadematus"),
    "00200_Animalia_Arthropoda_Insecta_Lepidoptera_Nymphalidae_Danaus_plexippus": ("Insects", "Danaus plexippus"),
    "03500_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax": ("Birds", "Corvus corax"),
    "06000_Plantae_Tracheophyta_Magnoliopsida_Rosales_Rosaceae_Rosa_canina": ("Plants", "Rosa canina"),
}


def write_image(path, color=(200, 30, 30), size=(40, 30), fmt="JPEG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)


def make_inat21(root, with_json=True):
    for k, folder in enumerate(sorted(INAT_FOLDERS)):
        for j in range(2):
            write_image(os.path.join(root, "train_mini", folder, f"img{j}.jpg"), (40 * k, 100, 20 * j))
    if with_json:
        categories = [dict(id=int(f[:5]), name=name, supercategory=sup, kingdom=f.split("_")[1], image_dir_name=f)
                      for f, (sup, name) in INAT_FOLDERS.items()]
        with open(os.path.join(root, "train_mini.json"), "w") as f:
            json.dump(dict(categories=categories, images=[], annotations=[]), f)
    return root


class StandInVAE(torch.nn.Module):
    """Deterministic stand-in for AutoencoderKL.encode: one fixed stride-8 conv -> (mean, logvar), 4 channels each.
    Records the batch size of every encode call."""

    def __init__(self, seed=0):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.1)
            self.conv.bias.zero_()
        self.batch_sizes = []

    def encode(self, x):
        self.batch_sizes.append(len(x))
        mean, logvar = self.conv(x).chunk(2, dim=1)
        return mean, logvar.clamp(-4.0, 1.0)

    def identity(self):
        return dict(sha256="stand-in", config={})


class FailingVAE(StandInVAE):
    """Raises on its n-th encode call: an interrupted cache run."""

    def __init__(self, fail_at):
        super().__init__()
        self.fail_at = fail_at

    def encode(self, x):
        if len(self.batch_sizes) + 1 == self.fail_at:
            raise RuntimeError("simulated interruption")
        return super().encode(x)


def small_toy(image_size=16):
    return toy_module.ToyDataset("toy", image_size=image_size, images_per_class=1, flip=False)  # 32 images


def cache_meta(vae="stand-in-0"):
    return dict(data="toy", data_path=None, split="train", vae=vae)


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache"))
    dataset, vae = small_toy(), StandInVAE()
    data.build_latent_cache(dataset, vae, out, batch_size=5, num_workers=0, meta=cache_meta(), progress=False)
    return out, dataset, vae


# ---------------------------------------------------------------------------------------------------------------
# iNat21
# ---------------------------------------------------------------------------------------------------------------

# The authors' subclass -> superclass map, transcribed from their sample.py (FineDiffusion/FineDiffusion,
# commit a59fdba): every id is Animalia (10) except these inclusive ranges.
AUTHORS_INAT21_RANGES = {0: (5729, 9999), 1: (175, 2700), 2: (3111, 4596), 3: (5388, 5728), 4: (4859, 5171),
                         5: (4613, 4858), 6: (2756, 2938), 7: (2939, 3108), 8: (5219, 5387), 9: (4, 156)}


def test_inat21_builtin_table_equals_the_authors_map_at_every_id():
    expected = np.full(10000, 10)
    for superclass, (first, last) in AUTHORS_INAT21_RANGES.items():
        expected[first:last + 1] = superclass
    assert data.inat21_superclass_of(10000) == expected.tolist()
    assert data.INAT21_SUPERCLASSES == ["Plants", "Insects", "Birds", "Fungi", "Reptiles", "Mammals",
                                        "Ray-finned Fishes", "Amphibians", "Mollusks", "Arachnids", "Animalia"]


def test_inat21_builtin_table_boundaries():
    sup = data.inat21_superclass_of(10000)
    name = lambda k: data.INAT21_SUPERCLASSES[sup[k]]
    assert len(sup) == 10000
    assert [name(k) for k in (3, 4, 156, 157, 174, 175, 2700, 2701)] == [
        "Animalia", "Arachnids", "Arachnids", "Animalia", "Animalia", "Insects", "Insects", "Animalia"]
    assert [name(k) for k in (3111, 4596, 4613, 5171, 5388, 5728, 5729, 9999)] == [
        "Birds", "Birds", "Mammals", "Reptiles", "Fungi", "Fungi", "Plants", "Plants"]
    assert data.INAT21_SUPERCLASSES.index("Plants") == 0 and data.INAT21_SUPERCLASSES.index("Animalia") == 10


def test_inat21_hierarchy_from_folders_and_json(tmp_path):
    ds = data.build_dataset("inat21", make_inat21(str(tmp_path)), image_size=16, split="train_mini")
    folders = sorted(INAT_FOLDERS)
    assert [os.fsdecode(os.path.dirname(f)) for f in ds.files[::2]] == folders and len(ds) == 8 and ds.targets == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ds.class_names == [INAT_FOLDERS[f][1] for f in folders]
    assert ds.superclass_names == data.INAT21_SUPERCLASSES and ds.num_superclasses == 11
    assert [ds.superclass_names[s] for s in ds.superclass_of] == [INAT_FOLDERS[f][0] for f in folders]
    assert json.loads(json.dumps(ds.hierarchy())) == dict(class_names=ds.class_names,
                                                          superclass_names=ds.superclass_names,
                                                          superclass_of=ds.superclass_of)
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y == 0


def test_inat21_supercategory_comes_from_json(tmp_path):
    root = make_inat21(str(tmp_path))
    with open(os.path.join(root, "train_mini.json")) as f:
        meta = json.load(f)
    meta["categories"][0]["supercategory"] = "Mollusks"  # the table says Arachnids for id 4: the json must win
    with open(os.path.join(root, "train_mini.json"), "w") as f:
        json.dump(meta, f)
    ds = data.build_dataset("inat21", root, image_size=16, split="train_mini")
    assert ds.superclass_names[ds.superclass_of[0]] == "Mollusks"


def test_inat21_without_json_uses_builtin_table(tmp_path):
    ds = data.build_dataset("inat21", make_inat21(str(tmp_path), with_json=False), image_size=16, split="train_mini")
    assert [ds.superclass_names[s] for s in ds.superclass_of] == ["Arachnids", "Insects", "Birds", "Plants"]
    assert ds.class_names == ["Araneus diadematus", "Danaus plexippus", "Corvus corax", "Rosa canina"]


def test_missing_or_empty_data_path_raises_data_error(tmp_path):
    with pytest.raises(UserError, match="visipedia/inat_comp"):
        data.build_dataset("inat21", str(tmp_path / "nowhere"), split="train_mini")
    (tmp_path / "train_mini").mkdir()
    with pytest.raises(UserError, match="train_mini"):
        data.build_dataset("inat21", str(tmp_path), split="train_mini")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty.*no superclass folders"):
        data.build_dataset("folder", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="data/folder is not a directory"):
        data.build_dataset("folder", None)


# ---------------------------------------------------------------------------------------------------------------
# folder layouts
# ---------------------------------------------------------------------------------------------------------------

def test_two_level_folder_hierarchy(tmp_path):
    for sup, cls, n in [("melon", "cantaloupe", 2), ("citrus", "lemon", 1), ("citrus", "orange", 2),
                        ("melon", "watermelon", 1)]:
        for j in range(n):
            write_image(str(tmp_path / sup / cls / f"{j}.png"), fmt="PNG")
    ds = data.build_dataset("folder", str(tmp_path), image_size=16)
    assert ds.superclass_names == ["citrus", "melon"]
    assert ds.class_names == ["lemon", "orange", "cantaloupe", "watermelon"]  # sorted (superclass, class)
    assert ds.superclass_of == [0, 0, 1, 1]
    assert ds.targets == [0, 1, 1, 2, 2, 3] and len(ds) == 6


def test_image_datasets_give_images_in_minus_one_to_one(tmp_path):
    """DiT's preprocessing: ToTensor then Normalize(0.5, 0.5), so black is -1 and white is +1 exactly."""
    write_image(str(tmp_path / "dark" / "black" / "0.png"), (0, 0, 0), fmt="PNG")
    write_image(str(tmp_path / "light" / "white" / "0.png"), (255, 255, 255), fmt="PNG")
    ds = data.build_dataset("folder", str(tmp_path), image_size=16, flip=False)
    black, white = ds[0][0], ds[1][0]
    assert black.shape == (3, 16, 16) and torch.all(black == -1.0) and torch.all(white == 1.0)


def test_flat_folder_with_csv_hierarchy(tmp_path):
    for cls in ["lemon", "cantaloupe", "orange"]:
        write_image(str(tmp_path / "images" / cls / "a.jpg"))
    csv_path = tmp_path / "hierarchy.csv"
    csv_path.write_text("class,superclass\nlemon,citrus\norange,citrus\ncantaloupe,melon\nwatermelon,melon\n")
    ds = data.build_dataset("folder", str(tmp_path / "images"), image_size=16, hierarchy_csv=str(csv_path))
    assert ds.superclass_names == ["citrus", "melon"]
    assert ds.class_names == ["lemon", "orange", "cantaloupe", "watermelon"]  # same ids as the two-level tree
    assert ds.superclass_of == [0, 0, 1, 1]
    assert sorted(ds.targets) == [0, 1, 2]


def test_unreadable_images_are_skipped_with_a_warning(tmp_path):
    write_image(str(tmp_path / "sup" / "cls" / "0_good.jpg"), size=(64, 48))
    bad = tmp_path / "sup" / "cls" / "1_random.jpg"
    bad.write_bytes(np.random.default_rng(0).bytes(500))
    full = tmp_path / "full.jpg"
    write_image(str(full), size=(64, 48))
    truncated = tmp_path / "sup" / "cls" / "2_truncated.jpg"
    truncated.write_bytes(full.read_bytes()[:300])
    full.unlink()
    ds = data.build_dataset("folder", str(tmp_path), image_size=16)
    assert len(ds) == 3
    for index, name in [(2, "2_truncated.jpg"), (1, "1_random.jpg")]:  # each call warns about its own file
        with pytest.warns(UserWarning, match=name):
            x, y = ds[index]  # the next readable item (index 0, wrapping around) takes its place
        assert x.shape == (3, 16, 16) and y == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file already known bad is skipped silently
        ds[1]


def test_center_crop_arr_gives_a_square_of_image_size():
    for size in [(500, 300), (300, 500), (64, 64), (17, 40)]:
        out = data.center_crop_arr(Image.new("RGB", size, (1, 2, 3)), 32)
        assert out.size == (32, 32)
    x = data.dit_preprocess(Image.new("RGB", (100, 70), (255, 0, 128)), 32, flip=False)
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1 and x[0].mean() == 1.0


# ---------------------------------------------------------------------------------------------------------------
# image files in every Pillow mode: data.read_rgb, the one reader
# ---------------------------------------------------------------------------------------------------------------
# Each row saves an image in one Pillow mode, made from 8-bit values drawn first, and the 8-bit RGB values it
# must read as. Wider modes carry those values scaled up (16-bit: x 257, plus noise that rounding must remove;
# float: / 255); alpha, whatever it is, must be dropped; a palette's colours are read through its transparency.

RGB8 = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)  # H x W x 3
GRAY8 = RGB8[..., 1]  # H x W
ALPHA8 = np.random.default_rng(1).integers(0, 256, (6, 5), dtype=np.uint8)  # H x W
PALETTE = np.random.default_rng(2).integers(0, 256, (4, 3), dtype=np.uint8)  # 4 colours x RGB
INDICES = np.random.default_rng(3).integers(0, 4, (6, 5)).astype(np.uint8)  # H x W, into PALETTE
GRAY16 = (GRAY8.astype(np.int64) * 257 + np.random.default_rng(4).integers(-128, 129, (6, 5))).clip(0, 65535)  # rounds to GRAY8


def gray_rgb(gray):
    return np.repeat(np.asarray(gray)[..., None], 3, axis=-1)  # H x W -> H x W x 3


def palette_image(mode, **info):
    image = Image.fromarray(INDICES, "P") if mode == "P" else Image.merge("PA", [Image.fromarray(INDICES),
                                                                                Image.fromarray(ALPHA8)])
    image.putpalette(PALETTE.tobytes())
    image.info.update(info)
    return image


def jfif_ycbcr():
    """RGB8 as full-range YCbCr (JPEG's equations, rounded to 8 bits) and the RGB those 8-bit values decode to."""
    r, g, b = np.moveaxis(RGB8.astype(np.float64), -1, 0)  # H x W each
    ycc = np.rint(np.stack([0.299 * r + 0.587 * g + 0.114 * b, 128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
                            128 + 0.5 * r - 0.418688 * g - 0.081312 * b], axis=-1)).clip(0, 255)  # H x W x 3
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    return Image.fromarray(ycc.astype(np.uint8), "YCbCr"), np.rint(rgb).clip(0, 255)


MODE_FILES = {  # row: (mode Pillow opens the file in, file suffix, () -> (image to save, RGB it must read as))
    "1": ("1", "png", lambda: (Image.fromarray(GRAY8 >= 128), gray_rgb(np.where(GRAY8 >= 128, 255, 0)))),
    "L": ("L", "png", lambda: (Image.fromarray(GRAY8), gray_rgb(GRAY8))),
    "LA": ("LA", "png", lambda: (Image.fromarray(np.dstack([GRAY8, ALPHA8]), "LA"), gray_rgb(GRAY8))),
    "RGB": ("RGB", "png", lambda: (Image.fromarray(RGB8), RGB8)),
    "RGBA": ("RGBA", "png", lambda: (Image.fromarray(np.dstack([RGB8, ALPHA8]), "RGBA"), RGB8)),
    "P with a transparent colour": ("P", "png", lambda: (palette_image("P", transparency=2), PALETTE[INDICES])),
    "P with alpha per colour": ("P", "png", lambda: (palette_image("P", transparency=bytes([0, 128, 255, 64])),
                                                     PALETTE[INDICES])),
    "PA": ("PA", "tif", lambda: (palette_image("PA"), PALETTE[INDICES])),
    "CMYK": ("CMYK", "tif", lambda: (Image.fromarray(np.dstack([255 - RGB8, np.zeros_like(GRAY8)]), "CMYK"), RGB8)),
    "YCbCr": ("YCbCr", "tif", jfif_ycbcr),
    "I;16 PNG": ("I;16", "png", lambda: (Image.fromarray(GRAY16.astype(np.uint16)), gray_rgb(GRAY8))),
    "I;16 TIFF": ("I;16", "tif", lambda: (Image.frombytes("I;16L", (5, 6), GRAY16.astype("<u2").tobytes()),
                                          gray_rgb(GRAY8))),
    "I;16B": ("I;16B", "tif", lambda: (Image.frombytes("I;16B", (5, 6), GRAY16.astype(">u2").tobytes()),
                                       gray_rgb(GRAY8))),
    "I": ("I", "tif", lambda: (Image.fromarray(GRAY16.astype(np.int32)), gray_rgb(GRAY8))),
    "F": ("F", "tif", lambda: (Image.fromarray((GRAY8 / 255).astype(np.float32)), gray_rgb(GRAY8))),
}


@pytest.mark.parametrize("row", MODE_FILES)
def test_an_image_in_any_pillow_mode_reads_as_its_8bit_rgb_values_without_a_warning(tmp_path, row):
    mode, suffix, make = MODE_FILES[row]
    image, expected = make()
    path = tmp_path / f"image.{suffix}"
    image.save(path)
    with Image.open(path) as on_disk:
        assert on_disk.mode == mode  # the row tests the mode it names
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Pillow warning would be one more line on the user's stderr
        rgb = data.read_rgb(str(path))
    assert rgb.mode == "RGB" and rgb.size == (5, 6)
    assert np.abs(np.asarray(rgb, dtype=np.int64) - expected).max() <= 1


@pytest.mark.parametrize("mode, values", [("F", (GRAY8 * 1.0).astype(np.float32)), ("I", -GRAY16.astype(np.int32))])
def test_an_image_whose_values_have_no_known_scale_is_one_error_naming_the_file_and_its_mode(tmp_path, mode, values):
    """F is read as [0, 1] and I as 16-bit: a float image in [0, 255] or negative integers are refused, not guessed."""
    path = tmp_path / "image.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(UserError) as refused:
        data.read_rgb(str(path))
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and str(path) in message and f"mode {mode}" in message


def test_a_16bit_png_reads_as_its_8bit_original_in_training_statistics_and_evaluation(tmp_path):
    """One reader everywhere: a dataset item (training, the latent cache), dataset_images (reference statistics)
    and read_png (generate folders, unlabelled folders)."""
    gray = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    folder = tmp_path / "plants" / "oak"
    folder.mkdir(parents=True)
    Image.fromarray(gray).save(folder / "a_8bit.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "b_16bit.png")
    dataset = data.build_dataset("folder", str(tmp_path), image_size=8, flip=False)
    assert torch.equal(dataset[0][0], dataset[1][0])
    source = evaluate.dataset_images(dataset, "real")
    assert torch.equal(source[0][0], source[1][0])
    assert np.array_equal(evaluate.read_png(str(folder / "a_8bit.png")), evaluate.read_png(str(folder / "b_16bit.png")))


def test_preview_rows_show_each_readable_image_of_their_class_once(tmp_path, capsys):
    """A broken file is left out of its row: training's stand-in (the next readable item) would show twice."""
    reds = [(120 + 40 * i, 10, 10) for i in range(3)]
    (tmp_path / "A" / "a1").mkdir(parents=True)
    (tmp_path / "A" / "a1" / "0_broken.png").write_bytes(b"not a png")
    for i, colour in enumerate(reds):
        write_image(str(tmp_path / "A" / "a1" / f"{i + 1}.png"), colour, (8, 8), fmt="PNG")
    for i in range(3):
        write_image(str(tmp_path / "B" / "b1" / f"{i}.png"), (10, 10, 120 + 40 * i), (8, 8), fmt="PNG")
    with pytest.warns(UserWarning, match="0_broken.png"):
        proc = run_main(data, "preview", "--data", "folder", "--data-path", tmp_path, "--image-size", "8",
                        "--per-class", "3", "--out", tmp_path / "preview.png", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    sheet = np.asarray(Image.open(tmp_path / "preview.png"))  # 2 rows x 3 images of 8 x 8
    assert [tuple(sheet[4, 8 * j + 4]) for j in range(3)] == reds


# ---------------------------------------------------------------------------------------------------------------
# toy
# ---------------------------------------------------------------------------------------------------------------

def test_toy_is_deterministic_per_seed():
    a, b, c = (toy_module.ToyDataset("toy", images_per_class=4, seed=s, flip=False) for s in (0, 0, 1))
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    rng = np.random.default_rng([0, 0, 5, 3])  # (seed, split train, class 5, instance 3) = item 5*4+3
    assert np.array_equal(toy_module.render_toy([a.looks[5]], [rng], 32)[0], a.images[5 * 4 + 3])


def test_the_fine_grained_toy_set_holds_only_looks_the_base_set_never_shows():
    base, fine = toy_module.toy_dataset("toy-base"), toy_module.toy_dataset("toy")
    seen = {(f, p) for f, p, _ in base.looks}
    unseen = {(f, p) for f, p, _ in fine.looks}
    assert not seen & unseen and len(seen) == 32 and len(unseen) == 16        # no class the base saw
    assert {t for _, _, t in base.looks} == {t for _, _, t in fine.looks} == {0, 1}  # tints it was asked for
    assert {f for f, _ in unseen} <= {f for f, _ in seen} and {p for _, p in unseen} <= {p for _, p in seen}
    assert not set(fine.class_names) & set(base.class_names)
    assert fine.superclass_names == base.superclass_names == toy_module.TOY_SHAPES   # the families it knows
    assert np.bincount(fine.targets).tolist() == [50] * 32                     # as iNat21-mini


def test_toy_subclasses_differ_and_share_their_family_look():
    ds = toy_module.ToyDataset("toy", images_per_class=64, flip=False)
    means = ds.images.reshape(32, 64, -1).astype(np.float64).mean(1)  # class-mean image, (32, 32*32*3)
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)  # (32, 32)
    same_family = np.equal.outer(np.arange(32) // 4, np.arange(32) // 4)
    off_diag = ~np.eye(32, dtype=bool)
    assert dist[off_diag].min() > 100  # every class differs from every other
    assert dist[same_family & off_diag].mean() < dist[~same_family].mean()  # siblings look alike
    assert ds.class_names[:4] == ["disc/plain/pale", "disc/plain/deep", "disc/eyed/pale", "disc/eyed/deep"]


def test_a_pale_toy_species_is_lighter_and_less_saturated_than_its_deep_twin():
    import colorsys
    ds = toy_module.ToyDataset("toy", images_per_class=16, flip=False)

    def saturation_and_value(c):      # the median over images of the mean over the coloured (shape) pixels
        sv = []
        for image in ds.images[np.asarray(ds.targets) == c] / 255.0:                    # (32, 32, 3) each
            hsv = np.array([colorsys.rgb_to_hsv(*p) for p in image.reshape(-1, 3)])
            sv.append(hsv[hsv[:, 1] > 0.25, 1:].mean(0))                         # the background is nearly grey
        return np.median(sv, axis=0)
    for pale in range(0, 32, 2):                                                # (pale, deep) pairs
        (s_pale, v_pale), (s_deep, v_deep) = saturation_and_value(pale), saturation_and_value(pale + 1)
        assert s_deep > s_pale + 0.25 and v_pale > v_deep + 0.05, ds.class_names[pale]


def test_toy_items_are_float_images_in_range():
    ds = data.build_dataset("toy", image_size=32)
    assert len(ds) == 32 * 50 and ds.num_classes == 32 and ds.num_superclasses == 8
    x, y = ds[1000]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y == 1000 // 50
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0


def test_the_fine_grained_toy_set_is_a_fixed_set_of_images_whatever_the_training_seed():
    a, b = (data.build_dataset("toy", image_size=16, flip=False, seed=s) for s in (0, 1))
    assert np.array_equal(a.images, b.images)


# ---------------------------------------------------------------------------------------------------------------
# latent cache
# ---------------------------------------------------------------------------------------------------------------

def test_cache_moments_match_a_direct_encode(toy_cache):
    out, dataset, vae = toy_cache
    moments = np.load(os.path.join(out, "moments.npy"))  # N x 2 x 8 x 2 x 2
    labels = np.load(os.path.join(out, "labels.npy"))
    assert moments.shape == (32, 2, 8, 2, 2) and moments.dtype == np.float16
    assert labels.tolist() == dataset.targets
    for i in (0, 7, 11):
        with torch.no_grad():
            mean, logvar = vae.encode(dataset[i][0][None])
        np.testing.assert_allclose(moments[i, 0], torch.cat([mean, logvar], 1)[0].numpy(), rtol=2e-3, atol=2e-3)


def test_cache_mirror_entries_match_encoding_the_flipped_image(toy_cache):
    out, dataset, vae = toy_cache
    moments = np.load(os.path.join(out, "moments.npy"))
    with torch.no_grad():
        mean, logvar = vae.encode(dataset[3][0].flip(-1)[None])
    np.testing.assert_allclose(moments[3, 1], torch.cat([mean, logvar], 1)[0].numpy(), rtol=2e-3, atol=2e-3)
    assert not np.allclose(moments[3, 0], moments[3, 1])


def test_cache_meta_records_the_job(toy_cache):
    out, dataset, _ = toy_cache
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    assert meta["complete"] and meta["num_images"] == 32 and meta["latent_shape"] == [4, 2, 2]
    assert meta["image_size"] == 16 and meta["vae"] == "stand-in-0" and meta["hierarchy"] == dataset.hierarchy()


def test_cache_resumes_without_re_encoding_done_items(tmp_path):
    dataset = small_toy()
    with pytest.raises(RuntimeError, match="simulated"):  # probe + 2 batches of 4, then the run dies
        data.build_latent_cache(dataset, FailingVAE(fail_at=4), str(tmp_path / "a"), batch_size=4, num_workers=0,
                                meta=cache_meta(), progress=False)
    done = np.load(str(tmp_path / "a" / "done.npy"))
    assert done.sum() == 8
    with pytest.raises(UserError, match="incomplete.*resume"):
        data.LatentCacheDataset(str(tmp_path / "a"))
    vae = StandInVAE()
    meta = data.build_latent_cache(dataset, vae, str(tmp_path / "a"), batch_size=4, num_workers=0,
                                   meta=cache_meta(), progress=False)
    assert meta["complete"]
    assert sum(vae.batch_sizes) - 1 == 2 * (32 - 8)  # one probe image + both views of each remaining item
    data.build_latent_cache(dataset, StandInVAE(), str(tmp_path / "b"), batch_size=5, num_workers=0,
                            meta=cache_meta(), progress=False)
    for name in ("moments.npy", "labels.npy", "done.npy"):
        assert np.array_equal(np.load(str(tmp_path / "a" / name)), np.load(str(tmp_path / "b" / name)))


def test_cache_built_for_another_vae_or_size_is_refused(toy_cache, tmp_path):
    out, dataset, _ = toy_cache
    with pytest.raises(UserError, match="vae=.*rebuild"):
        data.LatentCacheDataset(out, expect=dict(vae="other", image_size=16))
    with pytest.raises(UserError, match="image_size=16 .*image_size=32"):
        data.LatentCacheDataset(out, expect=dict(vae="stand-in-0", image_size=32))
    data.LatentCacheDataset(out, expect=dict(vae="stand-in-0", image_size=16, data="toy"))  # all match
    with pytest.raises(UserError, match="another latent cache.*vae"):  # resuming into it with another VAE
        data.build_latent_cache(dataset, StandInVAE(), out, num_workers=0, meta=cache_meta("other"),
                                progress=False)


def test_latent_dataset_samples_the_scaled_posterior(toy_cache):
    out, dataset, _ = toy_cache
    moments = torch.from_numpy(np.load(os.path.join(out, "moments.npy"))[5, 0].astype(np.float32))
    mean, logvar = moments.chunk(2)
    ds = data.LatentCacheDataset(out, flip=False)
    assert ds.hierarchy() == dataset.hierarchy() and ds.targets == dataset.targets
    torch.manual_seed(0)
    z = torch.stack([ds[5][0] for _ in range(4000)])  # 4000 x 4 x 2 x 2
    std = vae_module.LATENT_SCALE * torch.exp(0.5 * logvar)
    assert torch.allclose(z.mean(0), vae_module.LATENT_SCALE * mean, atol=0.03)
    assert torch.allclose(z.std(0), std, rtol=0.1)


def test_latent_dataset_draws_both_views_when_flipping(toy_cache):
    out, _, _ = toy_cache
    moments = torch.from_numpy(np.load(os.path.join(out, "moments.npy"))[2].astype(np.float32))  # 2 x 8 x 2 x 2
    ds = data.LatentCacheDataset(out, flip=True)
    torch.manual_seed(0)
    z = torch.stack([ds[2][0] for _ in range(4000)])
    assert torch.allclose(z.mean(0), vae_module.LATENT_SCALE * moments[:, :4].mean(0), atol=0.03)


def test_vae_identity_is_its_config_and_the_sha256_of_its_weights_file(tmp_path):
    import hashlib
    same = tiny_vae().state_dict()
    a = AutoencoderKL.from_pretrained(write_folder(tmp_path / "a", same))
    b = AutoencoderKL.from_pretrained(write_folder(tmp_path / "b", same))            # the same weights elsewhere
    c = AutoencoderKL.from_pretrained(write_folder(tmp_path / "c", tiny_vae(seed=1).state_dict()))
    assert a.identity() == b.identity() and a.identity() != c.identity()
    weights = (tmp_path / "a" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a.identity() == dict(sha256=hashlib.sha256(weights).hexdigest(), config=a.config)


def test_cache_command_line_builds_a_loadable_cache(tmp_path, monkeypatch):
    for sup, cls in [("citrus", "lemon"), ("melon", "cantaloupe")]:
        for j in range(2):
            write_image(str(tmp_path / "data" / sup / cls / f"{j}.jpg"), (90 * j, 50, 200), size=(20, 24))
    monkeypatch.setattr(data.AutoencoderKL, "from_pretrained", classmethod(lambda cls, path: StandInVAE()))
    args = ["cache", "--data", "folder", "--data-path", str(tmp_path / "data"), "--out", str(tmp_path / "cache"),
            "--vae", "any", "--image-size", "16", "--batch-size", "3", "--num-workers", "0"]
    data.main(args)
    expect = dict(image_size=16, data="folder", data_path=str(tmp_path / "data"))
    ds = data.LatentCacheDataset(str(tmp_path / "cache"), expect=expect)
    assert len(ds) == 4 and ds.superclass_names == ["citrus", "melon"] and ds[0][0].shape == (4, 2, 2)
    assert ds.meta["vae"] == StandInVAE().identity()
    assert "python data.py cache --data folder" in ds.meta["command"]
    data.main(args)  # a second run finds nothing left to do


def test_cache_with_a_tiny_real_autoencoder(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1)
    dataset = small_toy()
    meta = data.build_latent_cache(dataset, vae, str(tmp_path), batch_size=8, num_workers=0, meta=cache_meta(),
                                   progress=False)
    c, h, w = meta["latent_shape"]
    assert (h, w) == (8, 8)  # two resolution levels: one 2x downsampling
    moments = np.load(str(tmp_path / "moments.npy"))
    with torch.no_grad():
        mean, logvar = vae.encode(dataset[4][0][None])
    np.testing.assert_allclose(moments[4, 0], torch.cat([mean, logvar], 1)[0].numpy(), rtol=5e-3, atol=5e-3)


# ------------------------------------------------------------------------------------------------------------
# evaluate.py
# ------------------------------------------------------------------------------------------------------------

# ---- fixtures ---------------------------------------------------------------------------------------------------

def seeded_inception(salt=""):
    """FID-Inception weights in the published layout, well scaled (seeded_state: He-scaled convolutions, BatchNorm
    statistics off identity), so that features differ from image to image as the real network's do: a feature taken
    from the wrong layer, resized wrongly or given to another image changes every FID. `salt`: another network."""
    salted = {salt + k: v for k, v in FIDInceptionV3().state_dict().items()}   # crc32 of the name seeds each tensor
    return {k[len(salt):]: v for k, v in seeded_state(salted).items()}


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """The seeded FID-Inception weights saved as published (pt_inception-2015-12-05-6726825d.pth)."""
    state = seeded_inception()
    path = tmp_path_factory.mktemp("weights") / fid_inception.FID_WEIGHTS
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Seeded AlexNet (torchvision layout) and non-negative LPIPS heads (lin{i}.model.1.weight, [1, C, 1, 1])."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lpips")
    torch.save(seeded_state(alexnet().state_dict()), folder / evaluate.ALEXNET_WEIGHTS)
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS.channels)}
    torch.save(lins, folder / evaluate.LPIPS_LIN_WEIGHTS)
    return folder / evaluate.ALEXNET_WEIGHTS, folder / evaluate.LPIPS_LIN_WEIGHTS


class MeanColour(nn.Module):
    """Stand-in feature extractor (3-d): keeps grouping tests fast and their covariances full rank. forward_all: the
    mean colour, logits over 4 "classes" read from it, and the mean colour of each image's left half as its spatial
    features."""

    weights_sha256 = "mean-colour"           # what statistics record of the network (load_inception: its file's)

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # [N, 3]

    def forward_all(self, x):
        pool = self(x)
        logits = 8 * torch.cat([pool, pool.mean(1, keepdim=True)], 1)               # [N, 4]
        return pool, logits, self(x[..., :x.shape[-1] // 2])                        # [N, 3], [N, 4], [N, 3]


SUPERCLASSES = {"Birds": ["sparrow", "wren"], "Fungi": ["morel"], "Plants": ["oak", "fern"]}


@pytest.fixture
def labelled_folder(tmp_path):
    """DIR/<superclass>/<class>/*.png, 6 random 16 px images per class, each superclass its own tint."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for tint, (superclass, classes) in enumerate(SUPERCLASSES.items()):
        for name in classes:
            (root / superclass / name).mkdir(parents=True)
            for i in range(6):
                pixels = rng.integers(0, 200, (16, 16, 3)) + np.array([40 * tint, 0, 20])
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / superclass / name / f"{i}.png")
    return root


# ---- Frechet distance -------------------------------------------------------------------------------------------

def test_frechet_distance_equals_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, -1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 9.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(0).standard_normal((200, 16))
    mu, sigma = feature_stats(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_is_symmetric():
    rng = np.random.default_rng(1)
    a, b = feature_stats(rng.standard_normal((100, 8))), feature_stats(2 * rng.standard_normal((100, 8)) + 1)
    assert frechet_distance(*a, *b) == pytest.approx(frechet_distance(*b, *a), rel=1e-8)


def test_frechet_distance_survives_singular_covariances():
    rng = np.random.default_rng(2)
    few = feature_stats(rng.standard_normal((4, 10)))  # rank 3 < 10 dimensions
    many = feature_stats(rng.standard_normal((50, 10)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm may warn about the singular product: expected here
        value = frechet_distance(*few, *many)
    assert np.isfinite(value) and value > 0


# ---- FID Inception ----------------------------------------------------------------------------------------------

def test_inception_has_torchvision_inception3_key_names_and_shapes_with_1008_classes():
    ours = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    ref = {k: tuple(v.shape) for k, v in Inception3(num_classes=1008, aux_logits=False, init_weights=False)
           .state_dict().items()}
    assert ours == ref
    assert ours["fc.weight"] == (1008, 2048) and ours["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)


def test_inception_uses_tf_pooling_in_its_pool_branches():
    model = FIDInceptionV3()
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"
    assert model.Conv2d_1a_3x3.bn.eps == 0.001
    # TF's average pool ignores the zero padding: a constant stays constant at the border
    assert torch.equal(fid_inception.tf_avg_pool(torch.ones(1, 1, 4, 4)), torch.ones(1, 1, 4, 4))


def test_inception_loads_published_layout_and_gives_2048_features_at_any_size(inception_file, one_thread):
    path, state = inception_file
    model = load_inception(str(path))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not model.training
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 2048)
        assert model(torch.rand(1, 3, 299, 299)).shape == (1, 2048)


def test_inception_loads_a_file_without_num_batches_tracked(inception_file, tmp_path):
    _, state = inception_file
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    load_inception(str(tmp_path / "old.pth"))


def test_inception_state_dict_missing_a_key_is_rejected_naming_it(inception_file, tmp_path):
    _, state = inception_file
    broken = {k: v for k, v in state.items() if k != "Mixed_6c.branch7x7_2.conv.weight"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(UserError, match="Mixed_6c.branch7x7_2.conv.weight"):
        load_inception(str(tmp_path / "broken.pth"))


def test_missing_inception_weights_error_names_the_published_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="pt_inception-2015-12-05-6726825d.pth") as error:
        load_inception()
    assert "github.com/mseitzer/pytorch-fid/releases" in str(error.value)


def test_inception_weights_are_found_in_torch_home(inception_file, tmp_path, monkeypatch):
    path, _ = inception_file
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    os.symlink(path, tmp_path / "hub" / "checkpoints" / fid_inception.FID_WEIGHTS)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert isinstance(load_inception(), FIDInceptionV3)


def test_inception_features_accept_a_tensor_or_a_loader_of_uint8_batches():
    model = MeanColour()
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    from_loader = inception_features(model, [(images[:3], None), (images[3:], None)], "cpu", progress=False,
                                     count=len(images))
    from_tensor = inception_features(model, images.float() / 255, "cpu", batch_size=2, progress=False)
    assert [from_loader[k].shape for k in ("pool", "logits", "spatial")] == [(5, 3), (5, 4), (5, 3)]
    assert all(np.allclose(from_loader[k], from_tensor[k], atol=1e-6) for k in from_loader)


# ---- per-superclass statistics and the Table 1 layout -----------------------------------------------------------

def folder_images(root, size=16):
    """The real images of a two-level folder, as `evaluate.py stats --data folder` reads them."""
    return evaluate.dataset_images(data.build_dataset("folder", str(root), size, split="val", flip=False), str(root))


def test_real_images_of_a_two_level_folder_carry_its_hierarchy_and_exact_pixels(labelled_folder):
    source = folder_images(labelled_folder)
    assert source.hierarchy["superclass_names"] == ["Birds", "Fungi", "Plants"]
    assert len(source) == 30 and len(set(source.labels)) == 5
    assert list(np.bincount(evaluate.superclasses_of(source.labels, source.hierarchy))) == [12, 6, 12]
    image, label = source[0]
    first = labelled_folder / "Birds" / "sparrow" / "0.png"
    assert label == 0 and torch.equal(image, torch.from_numpy(np.array(Image.open(first))).permute(2, 0, 1))


def test_class_labelled_images_take_superclasses_from_a_hierarchy_file(tmp_path):
    images = np.zeros((3, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "gen.npz", arr_0=images, labels=np.array([0, 1, 2]))
    hierarchy = dict(class_names=["a", "b", "c"], superclass_names=["Fungi", "Birds"], superclass_of=[1, 0, 1])
    (tmp_path / "h.json").write_text(json.dumps(hierarchy))
    source = open_images(str(tmp_path / "gen.npz"), 0, evaluate.load_hierarchy(str(tmp_path / "h.json")))
    assert list(source.labels) == [0, 1, 2] and source.hierarchy == hierarchy
    assert list(evaluate.superclasses_of(source.labels, source.hierarchy)) == [1, 0, 1]


def test_stats_are_grouped_per_superclass(labelled_folder):
    stats = compute_stats(folder_images(labelled_folder), MeanColour(), progress=False)
    assert int(stats["count"]) == 30
    assert evaluate.stats_hierarchy(stats)["superclass_names"] == ["Birds", "Fungi", "Plants"]
    assert [int(stats[f"count_{s}"]) for s in range(3)] == [12, 6, 12]
    assert stats["mu_1"].shape == (3,) and stats["sigma_1"].shape == (3, 3)
    assert stats["mu_2"][0] > stats["mu_0"][0]  # Plants were tinted redder than Birds


def test_fid_table_has_every_superclass_then_overall(labelled_folder):
    stats = compute_stats(folder_images(labelled_folder), MeanColour(), progress=False)
    rows = fid_table(stats, stats)
    assert [r["superclass"] for r in rows] == ["Birds", "Fungi", "Plants", "Overall"]
    assert all(abs(r["fid"]) < 1e-6 for r in rows)


def test_fid_table_needs_per_superclass_reference_statistics(labelled_folder):
    stats = compute_stats(folder_images(labelled_folder), MeanColour(), progress=False)
    overall_only = {k: stats[k] for k in ("mu", "sigma", "count")}
    with pytest.raises(UserError, match="per-superclass"):
        fid_table(overall_only, stats)
    assert [r["superclass"] for r in fid_table(overall_only, stats, overall_only=True)] == ["Overall"]


def test_npz_images_carry_labels_and_hierarchy(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    hierarchy = dict(class_names=["x", "y", "z"], superclass_names=["Insects", "Birds"], superclass_of=[1, 0, 1])
    np.savez(tmp_path / "fake.npz", arr_0=images, labels=np.array([0, 0, 1, 1, 2, 2]),
             hierarchy=np.array(json.dumps(hierarchy)))
    source = open_images(str(tmp_path / "fake.npz"))
    assert source.hierarchy == hierarchy
    assert list(evaluate.superclasses_of(source.labels, hierarchy)) == [1, 1, 0, 0, 1, 1]
    image, label = source[2]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and label == 1



def adm_batches(path, batch_size):
    """arr_0 of an .npz as ADM's evaluator reads it (evaluations/evaluator.py: open_npz_array, StreamingNpzArrayReader):
    the zip member streamed, its .npy 1.0 header read, then batch_size rows at a time."""
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as member:
        assert np.lib.format.read_magic(member) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            yield np.frombuffer(member.read(n * row), dtype).reshape(n, *shape[1:])


def test_a_streamed_npz_holds_the_members_np_savez_writes_and_adm_reads_it_in_batches(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (10, 6, 5, 3), dtype=np.uint8), rng.integers(0, 4, 10)
    hierarchy = np.array(json.dumps(TOY_HIERARCHY))
    np.savez(tmp_path / "savez.npz", arr_0=images, labels=labels, hierarchy=hierarchy)
    hardening.write_npz_rows(tmp_path / "streamed.npz", 10, iter([images[:4], images[4:7], images[7:]]),
                             lambda: dict(labels=labels, hierarchy=hierarchy))
    with zipfile.ZipFile(tmp_path / "savez.npz") as savez, zipfile.ZipFile(tmp_path / "streamed.npz") as streamed:
        assert savez.namelist() == streamed.namelist() == ["arr_0.npy", "labels.npy", "hierarchy.npy"]
        assert all(savez.read(name) == streamed.read(name) for name in savez.namelist())   # headers and bytes
        assert streamed.testzip() is None                                                  # every CRC-32 right
    assert np.array_equal(np.concatenate(list(adm_batches(tmp_path / "streamed.npz", 3))), images)
    with pytest.raises(hardening.RunFailed, match="9 images came where 10 were counted"):
        hardening.write_npz_rows(tmp_path / "short.npz", 10, iter([images[:9]]), dict)
    with pytest.raises(hardening.RunFailed, match=r"11\+ images came where 10 were counted"):
        hardening.write_npz_rows(tmp_path / "long.npz", 10, iter([images, images[:1], images]), dict)
    assert sorted(os.listdir(tmp_path)) == ["savez.npz", "streamed.npz"]                  # nothing half-written


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_an_npz_of_images_is_written_and_read_a_batch_at_a_time(tmp_path):
    """generate --npz and fid --fake X.npz hold a batch of images, not all N (Table 1's 100,000 at 256 px: 19.7 GB):
    Python's allocations while writing 48 MiB, and the resident pages after reading each image back (a memory map's
    would stay resident)."""
    batches = (np.full((64, 64, 64, 3), i, np.uint8) for i in range(64))                # 768 KiB each
    tracemalloc.start()
    hardening.write_npz_rows(tmp_path / "x.npz", 64 * 64, batches, dict)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 768 * 1024
    images = evaluate.NpzImages(str(tmp_path / "x.npz"))
    before = resident_bytes()
    assert all(images(i).shape == (64, 64, 3) and images(i).min() == images(i).max() == i // 64 for i in range(64 * 64))
    assert resident_bytes() - before < 8 * 1024 * 1024


def test_stats_npz_writes_the_real_images_as_scored_as_an_adm_reference_batch(labelled_folder, tmp_path, monkeypatch,
                                                                               capsys):
    monkeypatch.setattr(evaluate, "load_inception", lambda path=None: MeanColour())
    (labelled_folder / "Birds" / "wren" / "9_broken.png").write_bytes(b"not a png")   # left out, with its label
    with pytest.warns(UserWarning, match="9_broken.png"):
        proc = run_main(evaluate, "stats", "--data", "folder", "--data-path", labelled_folder, "--image-size", 12,
                        "--out", tmp_path / "stats.npz", "--npz", tmp_path / "ref.npz", "--batch-size", 7,
                        "--workers", 0, "--device", "cpu", capsys=capsys)
        assert proc.returncode == 0, proc.stderr
        source = folder_images(labelled_folder, 12)                   # ADM's crop to 12 px, as stats described them
        kept = [i for i in range(len(source)) if source.read(i) is not None]
    batch = np.load(tmp_path / "ref.npz")
    assert batch["arr_0"].dtype == np.uint8 and batch["arr_0"].shape == (30, 12, 12, 3)
    assert np.array_equal(batch["arr_0"], np.stack([source.read(i) for i in kept]))
    assert np.array_equal(batch["labels"], source.labels[kept])
    assert json.loads(str(batch["hierarchy"])) == source.hierarchy
    assert np.array_equal(np.concatenate(list(adm_batches(tmp_path / "ref.npz", 8))), batch["arr_0"])
    again = compute_stats(open_images(str(tmp_path / "ref.npz")), MeanColour(), progress=False)   # read back
    stats = np.load(tmp_path / "stats.npz")
    assert int(stats["count"]) == 30 and np.array_equal(again["mu"], stats["mu"])
    assert np.array_equal(again["sigma"], stats["sigma"]) and np.array_equal(again["mu_1"], stats["mu_1"])


def test_fid_of_the_npz_generate_streams_equals_fid_of_its_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_inception", lambda path=None: MeanColour())
    write_our_checkpoint(tmp_path / "ckpt.pt")
    common = ["--per-class", 2, "--steps", 2, "--batch-size", 5, "--workers", 0, "--device", "cpu"]   # a short tail
    for seed, extra in ((0, ["--npz", tmp_path / "gen.npz"]), (1, [])):
        proc = run_main(evaluate, "generate", "--ckpt", tmp_path / "ckpt.pt", "--out", tmp_path / f"gen{seed}",
                        "--seed", seed, *common, *extra, capsys=capsys)
        assert proc.returncode == 0, proc.stderr
    assert run_main(evaluate, "stats", "--images", tmp_path / "gen1", "--out", tmp_path / "ref.npz", "--workers", 0,
                    "--device", "cpu", capsys=capsys).returncode == 0
    tables = []
    for fake in (tmp_path / "gen0", tmp_path / "gen.npz"):
        proc = run_main(evaluate, "fid", "--real", tmp_path / "ref.npz", "--fake", fake, "--pairs", 0, "--workers", 0,
                        "--device", "cpu", "--out-json", tmp_path / "t.json", capsys=capsys)
        assert proc.returncode == 0, proc.stderr
        tables.append(json.loads((tmp_path / "t.json").read_text())["rows"])
    assert tables[0] == tables[1] and len(tables[0]) == 5 and tables[0][-1]["count_fake"] == 32
    assert tables[0][-1]["fid"] > 0


def test_the_npz_of_a_checkpoint_without_a_hierarchy_reads_back_with_its_labels(tmp_path, capsys):
    dit, vae = latent_dit_and_vae(tmp_path)                            # the official layout: class ids, no names
    proc = run_main(evaluate, "generate", "--ckpt", dit, "--vae", vae, "--out", tmp_path / "gen", "--per-class", 1,
                    "--guidance", "null", "--steps", 2, "--workers", 0, "--device", "cpu", "--npz", tmp_path / "gen.npz",
                    capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "gen.npz").files == ["arr_0", "labels"]                  # no hierarchy to write
    source = open_images(str(tmp_path / "gen.npz"))
    assert source.hierarchy is None and list(source.labels) == [0, 1, 2, 3] and source.read(3).shape == (16, 16, 3)

def test_inception_statistics_of_16bit_png_copies_equal_those_of_their_8bit_originals(inception_file, tmp_path):
    """16-bit PNGs are scaled to 8 bits, not clipped to white: the two sets have the same Inception mean and
    covariance, so their FID is that of a set against itself."""
    rng = np.random.default_rng(0)
    for folder in ("eight", "sixteen"):
        (tmp_path / folder).mkdir()
    for i in range(4):
        gray = rng.integers(0, 256, (16, 16), dtype=np.uint8)
        Image.fromarray(gray).save(tmp_path / "eight" / f"{i}.png")
        sixteen = gray.astype(np.int64) * 257 + rng.integers(-128, 129, gray.shape)  # rounds back to gray
        Image.fromarray(sixteen.clip(0, 65535).astype(np.uint16)).save(tmp_path / "sixteen" / f"{i}.png")
    model = load_inception(str(inception_file[0]))
    eight, sixteen = (compute_stats(open_images(str(tmp_path / f)), model, progress=False) for f in ("eight", "sixteen"))
    assert np.array_equal(eight["mu"], sixteen["mu"]) and np.array_equal(eight["sigma"], sixteen["sigma"])


def test_stats_of_a_tree_with_a_broken_file_count_each_image_once_under_its_own_superclass(tmp_path, monkeypatch,
                                                                                              capsys):
    """The broken file is left out, with a warning naming it: neither its neighbour of another superclass in its
    place (counted under its superclass) nor a second copy of that neighbour."""
    monkeypatch.setattr(evaluate, "load_inception", lambda path=None: MeanColour())
    colours = {"A": [(150 + 30 * i, 20, 10 * i) for i in range(3)], "B": [(10 * i, 20, 150 + 30 * i) for i in range(3)]}
    for superclass, shades in colours.items():
        for i, colour in enumerate(shades):
            write_image(str(tmp_path / "tree" / superclass / f"{superclass.lower()}1" / f"{i}.png"), colour, (16, 16),
                        fmt="PNG")
            write_image(str(tmp_path / superclass / f"{i}.png"), colour, (16, 16), fmt="PNG")  # the same, alone
    (tmp_path / "tree" / "A" / "a1" / "9_broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="9_broken.png"):
        proc = run_main(evaluate, "stats", "--data", "folder", "--data-path", tmp_path / "tree", "--image-size", "16",
                        "--out", tmp_path / "x.npz", "--workers", "0", "--device", "cpu", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    stats = np.load(tmp_path / "x.npz")
    assert evaluate.stats_hierarchy(stats)["superclass_names"] == ["A", "B"]
    assert (int(stats["count"]), int(stats["count_0"]), int(stats["count_1"])) == (6, 3, 3)
    for s, superclass in enumerate(colours):
        alone = compute_stats(open_images(str(tmp_path / superclass)), MeanColour(), progress=False)
        assert np.allclose(stats[f"mu_{s}"], alone["mu"]) and np.allclose(stats[f"sigma_{s}"], alone["sigma"])


# Superclass names as iNat21 has them, or worse: spaces, hyphens, commas, an ampersand, non-ASCII.
INAT_STYLE = {"Ray-finned Fishes": ["Salmo trutta", "Esox lucius"], "Crabs, Lobsters & Kin": ["Cancer pagurus"],
              "Żaby (Anura)": ["Rana temporaria"], "Plants": ["Quercus robur", "Pteridium aquilinum"]}


def test_table1_path_keeps_inat21_style_names_from_stats_through_generate_to_fid(tmp_path, monkeypatch):
    """The README's Table 1 commands: stats of real images -> generate (with --fid) -> fid, a row per superclass."""
    monkeypatch.setattr(evaluate, "load_inception", lambda path=None: MeanColour())
    root = tmp_path / "val"
    for s, (superclass, classes) in enumerate(INAT_STYLE.items()):
        for name in classes:
            for i in range(3):
                write_image(str(root / superclass / name / f"{i}.png"), (60 * s, 40 * i, 90), (16, 16), fmt="PNG")
    hierarchy = data.build_dataset("folder", str(root), 16, split="val").hierarchy()
    common = ["--workers", "0", "--device", "cpu"]
    evaluate.main(["stats", "--data", "folder", "--data-path", str(root), "--image-size", "16",
                   "--out", str(tmp_path / "ref.npz"), *common])
    write_our_checkpoint(tmp_path / "ckpt.pt", hierarchy)
    evaluate.main(["generate", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "gen"), "--per-class",
                   "3", "--steps", "2", "--fid", str(tmp_path / "ref.npz"), "--pairs", "0",
                   "--out-json", str(tmp_path / "generate.json"), *common])
    evaluate.main(["fid", "--real", str(tmp_path / "ref.npz"), "--fake", str(tmp_path / "gen"), "--pairs", "0",
                   "--out-json", str(tmp_path / "fid.json"), *common])
    for table in ("generate.json", "fid.json"):
        rows = json.loads((tmp_path / table).read_text())["rows"]
        assert [r["superclass"] for r in rows] == sorted(INAT_STYLE) + ["Overall"]
        assert [r["count_fake"] for r in rows[:-1]] == [3 * len(INAT_STYLE[name]) for name in sorted(INAT_STYLE)]
        assert all(math.isfinite(r["fid"]) for r in rows)


# ---- LPIPS ------------------------------------------------------------------------------------------------------

def test_lpips_is_zero_for_identical_images(lpips_files):
    lpips = LPIPS.from_pretrained(*map(str, lpips_files))
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-7)


def test_lpips_is_symmetric_and_positive_for_different_images(lpips_files):
    lpips = LPIPS.from_pretrained(*map(str, lpips_files))
    x, y = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    d = lpips(x, y)
    assert d.shape == (3,) and (d > 0).all() and torch.allclose(d, lpips(y, x), atol=1e-6)


def test_lpips_heads_missing_a_key_is_rejected_naming_it(lpips_files, tmp_path):
    alex_path, lin_path = lpips_files
    lins = torch.load(lin_path)
    del lins["lin3.model.1.weight"]
    torch.save(lins, tmp_path / "alex.pth")
    with pytest.raises(UserError, match="lin3.model.1.weight"):
        LPIPS.from_pretrained(str(alex_path), str(tmp_path / "alex.pth"))


def test_lpips_pairs_are_distinct_images_of_one_class():
    labels = np.array([0, 0, 0, 1, 2, 2, -1, 3, 3, 3, 3])
    a, b = sample_pairs(labels, 500, np.random.default_rng(0))
    assert (a != b).all() and (labels[a] == labels[b]).all()
    assert set(labels[a]) == {0, 2, 3}  # class 1 has one image, -1 is unlabelled
    a, b = sample_pairs(labels, None, np.random.default_rng(0))
    assert len(a) == 3 + 1 + 6  # every pair once


def test_lpips_diversity_reports_per_class_and_per_superclass(lpips_files):
    lpips = LPIPS.from_pretrained(*map(str, lpips_files))
    images = torch.rand(6, 3, 64, 64)
    images[3] = images[2]  # class 1 collapsed to one image twice: no diversity
    result = lpips_diversity(lpips, images, [0, 0, 1, 1, 2, 2], num_pairs=None, superclass_of=[0, 1, 1])
    assert result["pairs"] == 3 and result["per_class"][1] < 1e-6 < result["per_class"][0]
    assert result["per_superclass"][0] == pytest.approx(result["per_class"][0])
    assert result["per_superclass"][1] == pytest.approx((result["per_class"][1] + result["per_class"][2]) / 2)


# ---- command line -----------------------------------------------------------------------------------------------

def run_evaluate(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env)


def test_cli_without_inception_weights_names_the_file_and_exits_2(labelled_folder, tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path)}
    result = run_evaluate("stats", "--data", "folder", "--data-path", labelled_folder, "--out", tmp_path / "ref.npz",
                          cwd=tmp_path, env=env)
    assert_one_line_error(result, "pt_inception-2015-12-05-6726825d.pth", "github.com/mseitzer/pytorch-fid")


def test_cli_unreadable_image_in_a_worker_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_inception", lambda path=None: MeanColour())
    np.savez(tmp_path / "x.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    (tmp_path / "gen").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "gen" / "0.png")
    (tmp_path / "gen" / "9.png").write_bytes(b"not a png")
    code = hardening.run_cli(lambda: evaluate.main(["fid", "--real", str(tmp_path / "x.npz"), "--fake",
                                                       str(tmp_path / "gen"), "--workers", "1", "--pairs", "0"]))
    stderr = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and stderr[-1].startswith("error: cannot read image") and "9.png" in stderr[-1]
    assert not any("Traceback" in line for line in stderr)


def test_cli_stats_then_fid_writes_table1_csv_and_json(labelled_folder, lpips_files, tmp_path, monkeypatch,
                                                       one_thread):
    monkeypatch.setattr(evaluate, "load_inception", lambda path=None: MeanColour())
    ref = tmp_path / "ref.npz"
    evaluate.main(["stats", "--data", "folder", "--data-path", str(labelled_folder), "--out", str(ref),
                   "--image-size", "64", "--workers", "0"])
    assert {"mu", "sigma", "count", "hierarchy", "mu_0", "sigma_2", "count_1"} <= set(np.load(ref).files)
    source = folder_images(labelled_folder, 64)                # LPIPS's AlexNet needs 64 px
    np.savez(tmp_path / "fake.npz", arr_0=np.stack([source.read(i) for i in range(len(source))]),
             labels=source.labels, hierarchy=np.array(json.dumps(source.hierarchy)))
    evaluate.main(["fid", "--real", str(ref), "--fake", str(tmp_path / "fake.npz"), "--workers", "0",
                   "--lpips-alex", str(lpips_files[0]), "--lpips-lin", str(lpips_files[1]), "--pairs", "20",
                   "--out-csv", str(tmp_path / "t.csv"), "--out-json", str(tmp_path / "t.json")])
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["superclass"] for r in rows] == ["Birds", "Fungi", "Plants", "Overall"]
    assert abs(rows[-1]["fid"]) < 1e-6 and rows[-1]["lpips"] > 0
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == \
        "superclass,fid,sfid,kid,kid_std,is,is_std,precision,recall,lpips,count_real,count_fake,kid_subset"
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # atomic writes left no temp files


METRIC_COLUMNS = ("fid", "sfid", "kid", "kid_std", "is", "is_std", "precision", "recall")


def test_cli_stats_then_fid_gives_every_metric_per_superclass_and_overall_and_reads_older_statistics(
        inception_file, tmp_path, monkeypatch, capsys, one_thread):
    """Table 1's commands: `stats` keeps the FID Inception's features (the seeded network: its 2048-d pool features,
    2023-d spatial statistics and IS per superclass); `fid` gives sFID, KID, IS and precision/recall beside FID for
    each superclass and Overall (the mean-colour stand-in: a Frechet distance of 2048-d covariances of a few images
    takes minutes). Statistics made before these metrics still read: their columns are left empty, said in one line."""
    rng = np.random.default_rng(0)
    for folder, offset in (("val", 0), ("gen", 25)):
        for s, superclass in enumerate(("Ray-finned Fishes", "Birds")):
            for name in ("a", "b"):
                for i in range(6):
                    pixels = rng.integers(0, 180, (32, 32, 3)) + np.array([60 * s, offset, 30])
                    (tmp_path / folder / superclass / name).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / folder / superclass / name / f"{i}.png")
    source = folder_images(tmp_path / "gen", 32)
    np.savez(tmp_path / "fake.npz", arr_0=np.stack([source.read(i) for i in range(len(source))]),
             labels=source.labels, hierarchy=np.array(json.dumps(source.hierarchy)))
    stats = ["stats", "--data", "folder", "--data-path", tmp_path / "val", "--image-size", 32, "--workers", 0]
    assert run_main(evaluate, *stats, "--inception", inception_file[0], "--out", tmp_path / "inception.npz",
                    capsys=capsys).returncode == 0
    kept = np.load(tmp_path / "inception.npz")
    assert kept["features"].shape == (24, 2048) and list(kept["superclass"]) == [0] * 12 + [1] * 12
    assert kept["spatial_sigma_1"].shape == (2023, 2023) and np.isfinite(kept["isc_1"]).all()

    monkeypatch.setattr(evaluate, "load_inception", lambda path=None: MeanColour())
    common = ["--pairs", 0, "--workers", 0, "--out-csv", tmp_path / "t.csv"]
    assert run_main(evaluate, *stats, "--out", tmp_path / "ref.npz", capsys=capsys).returncode == 0
    proc = run_main(evaluate, "fid", "--real", tmp_path / "ref.npz", "--fake", tmp_path / "fake.npz", *common,
                    capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert "KID drew subsets of fewer than 1000 images" in proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["superclass"] for r in rows] == ["Birds", "Ray-finned Fishes", "Overall"]
    assert all(math.isfinite(float(r[c])) for r in rows for c in METRIC_COLUMNS)
    assert [int(r["kid_subset"]) for r in rows] == [12, 12, 24]
    assert all(0 <= float(r["precision"]) <= 1 and 0 <= float(r["recall"]) <= 1 and float(r["is"]) >= 1 for r in rows)

    ref = dict(np.load(tmp_path / "ref.npz"))
    older = {k: v for k, v in ref.items() if not k.startswith(("features", "superclass", "spatial_", "isc"))}
    np.savez(tmp_path / "older.npz", **older)                        # what `stats` wrote before these metrics
    proc = run_main(evaluate, "fid", "--real", tmp_path / "older.npz", "--fake", tmp_path / "fake.npz", *common,
                    capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert "reference statistics were made before sFID, KID, IS and precision/recall" in proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert all(r[c] == "" for r in rows for c in ("sfid", "kid", "precision", "recall"))
    assert all(r["fid"] != "" and r["is"] != "" for r in rows)       # FID needs mu and sigma; IS the generated alone


# ------------------------------------------------------------------------------------------------------------
# train.py
# ------------------------------------------------------------------------------------------------------------

TINY_TRAIN = ["--data", "toy", "--model", "DiT-T/4", "--image-size", "16", "--num-workers", "0", "--log-every", "1"]


def run_train(*argv):
    """train.main's result, with "losses": those this call trained, read back from the run's log.jsonl (a line is the
    mean loss since the line before: one step's under --log-every 1)."""
    argv = [str(a) for a in argv]
    start = hardening.read_checkpoint(hardening.resolve_checkpoint(argv[argv.index("--resume") + 1]))["step"] \
        if "--resume" in argv else 0
    out = train.main(argv)
    log_path = out["run_dir"] and os.path.join(out["run_dir"], "log.jsonl")
    if log_path and os.path.isfile(log_path):                  # not /dev/full, as a full-disk test makes it
        log = [json.loads(line) for line in open(log_path)]
        out["losses"] = [r["loss"] for r in log if r["step"] > start]
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_builder(images_per_class):
    """build_dataset with a smaller toy set (32 classes x images_per_class), so epochs end within a test."""
    def build(name, data_path=None, image_size=None, split=None, flip=True, seed=0, **_):
        return toy_module.ToyDataset("toy", image_size=image_size or 32, images_per_class=images_per_class, seed=seed,
                                     flip=flip, split=split or "train")
    return build


def tensors_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A base DiT-T/4 on toy-base trained from scratch for one step: the stand-in for DiT-XL-2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = run_train(*TINY_TRAIN, "--data", "toy-base", "--init", "none", "--global-batch-size", "4", "--max-steps", "1",
                    "--run-dir", tmp_path_factory.mktemp("base") / "run")
    torch.set_num_threads(threads)
    return out["final_ckpt"]


# ------------------------------------------------------------------------------------------------------------
# Distributed data parallel
# ------------------------------------------------------------------------------------------------------------

RANK_DUMP = """import os, sys, torch
sys.path.insert(0, {here!r})
import train
save = train.save
def save_and_dump(run):   # each rank's own weights and EMA, as it saves
    save(run)
    torch.save(dict(model=run.model.state_dict(), ema=run.ema), os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".pt"))
train.save = save_and_dump
train.main(sys.argv[2:])
"""


def test_two_process_ddp_keeps_ranks_identical_and_frozen_tensors_equal_to_the_base(tmp_path, base_ckpt):
    dump = tmp_path / "ranks"
    dump.mkdir()
    (tmp_path / "rank_dump.py").write_text(RANK_DUMP.format(here=HERE))   # train, then save this rank's tensors
    proc = run_script("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                      tmp_path / "rank_dump.py", dump, *TINY_TRAIN, "--init", base_ckpt, "--tune", "finediffusion",
                      "--global-batch-size", "4", "--max-steps", "3", "--run-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert tensors_equal(rank0["model"], rank1["model"]) and tensors_equal(rank0["ema"], rank1["ema"])
    base = torch.load(base_ckpt, weights_only=True)["ema"]       # what --init loads (as DiT's EMA release)
    frozen = [k for k in rank0["model"] if not is_trainable(k, "finediffusion")]
    assert frozen and all(torch.equal(rank0["model"][k], base[k]) for k in frozen)
    assert not torch.equal(rank0["model"]["blocks.0.attn.qkv.bias"], base["blocks.0.attn.qkv.bias"])
    # the checkpoint rank 0 wrote is a delta that load_model puts back on the base: it equals the ranks' EMA
    model, info = load_model(tmp_path / "run" / "checkpoints" / "0000003.pt")
    assert info["step"] == 3 and tensors_equal(model.state_dict(), train.with_ema(rank0["model"], rank0["ema"]))


def test_a_run_resumes_on_two_nodes_whose_ranks_stay_identical(tmp_path, base_ckpt):
    """Two torchrun "nodes" of one process each on this machine, meeting on localhost (the README's command)."""
    first = run_train(*TINY_TRAIN, "--init", base_ckpt, "--global-batch-size", "4", "--max-steps", "2",
                      "--run-dir", tmp_path / "run")["final_ckpt"]
    dump, script, port = tmp_path / "ranks", tmp_path / "rank_dump.py", free_port()
    dump.mkdir()
    script.write_text(RANK_DUMP.format(here=HERE))
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={n}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", script, dump,
                               "--resume", first, "--max-steps", "3"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    for node in nodes:
        stderr = node.communicate(timeout=300)[1]
        assert node.returncode == 0, stderr[-3000:]
    rank0, rank1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert tensors_equal(rank0["model"], rank1["model"]) and tensors_equal(rank0["ema"], rank1["ema"])
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "0000003.pt", weights_only=True)
    assert resumed["step"] == 3 and resumed["train"]["world_size"] == 2


RANK_READS = """import json, os, sys
sys.path.insert(0, {here!r})
import data, train
reads = dict(list_images=0, inat21_categories=0)     # the folder scans and the json parse that build iNat21

def counted(name, read):
    def call(*args):
        reads[name] += 1
        return read(*args)
    return call

def dump(dataset):                                   # this rank's reads and the dataset it works on
    with open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".json"), "w") as f:
        json.dump(dict(reads, files=[os.fsdecode(name) for name in dataset.files], labels=dataset.targets,
                       hierarchy=dataset.hierarchy()), f)

for name in reads:
    setattr(data, name, counted(name, getattr(data, name)))
build_latent_cache, data_and_vae = data.build_latent_cache, train.data_and_vae
data.build_latent_cache = lambda dataset, *args, **kwargs: dump(dataset) or build_latent_cache(dataset, *args, **kwargs)
train.data_and_vae = lambda *args: (lambda out: dump(out[0]) or out)(data_and_vae(*args))
dict(train=train, data=data)[sys.argv[2]].main(sys.argv[3:])
"""


@pytest.mark.parametrize("command", [["train", "--model", "DiT-T/2", "--init", "none", "--global-batch-size", 4,
                                      "--max-steps", 1, "--num-workers", 0], ["data", "cache", "--num-workers", 0]],
                         ids=["train", "cache"])
def test_under_torchrun_rank_0_alone_reads_the_dataset_and_every_rank_gets_its_file_list(command, tmp_path):
    """iNat21-mini is 500,000 files and a 216 MB json: one rank scans and parses them, and hands the others the list."""
    root = make_inat21(tmp_path / "inat")
    write_tiny_vae(tmp_path / "vae")
    (tmp_path / "reads.py").write_text(RANK_READS.format(here=HERE))
    (tmp_path / "ranks").mkdir()
    proc = run_script("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                      tmp_path / "reads.py", tmp_path / "ranks", *command, "--data", "inat21", "--data-path", root,
                      "--image-size", 16, "--vae", tmp_path / "vae",
                      *(["--out", tmp_path / "cache"] if "cache" in command else ["--run-dir", tmp_path / "run"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (rank0["list_images"], rank0["inat21_categories"]) == (len(INAT_FOLDERS), 1)    # a scan per class folder
    assert (rank1["list_images"], rank1["inat21_categories"]) == (0, 0)
    alone = data.build_dataset("inat21", str(root), 16)
    for rank in (rank0, rank1):
        assert rank["files"] == [os.fsdecode(name) for name in alone.files] and rank["labels"] == alone.targets
        assert rank["hierarchy"] == alone.hierarchy()


def test_the_cache_bar_counts_the_images_left_on_every_rank_after_a_resume(tmp_path, capsys):
    root = make_inat21(tmp_path / "inat")                                                  # 8 images
    write_tiny_vae(tmp_path / "vae")
    argv = ["cache", "--data", "inat21", "--data-path", root, "--image-size", 16, "--vae", tmp_path / "vae", "--out",
            tmp_path / "cache", "--batch-size", 2, "--num-workers", 0]
    assert run_main(data, *argv, capsys=capsys).returncode == 0
    first = np.load(tmp_path / "cache" / "moments.npy")
    done = np.load(tmp_path / "cache" / "done.npy", mmap_mode="r+")
    done[[0, 1, 2, 5, 6]] = False                        # interrupted: 3 images of rank 0's half, 2 of rank 1's
    done.flush()
    del done
    proc = run_script("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "data.py",
                      *argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bar = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.startswith("encoding")]
    assert bar and all("encoding 5 of 8 images" in line for line in bar)
    assert "5/5" in bar[-1] and "img/s" in bar[-1]                      # the images of both ranks, none else
    assert np.load(tmp_path / "cache" / "done.npy").all()
    assert np.allclose(np.load(tmp_path / "cache" / "moments.npy"), first, atol=1e-3)

# ------------------------------------------------------------------------------------------------------------
# Checkpoints: exact resume, deltas, export
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tune, workers", [("finediffusion", 0), ("full", 0), ("finediffusion", 2)])
def test_resume_continues_bit_for_bit(tmp_path, base_ckpt, monkeypatch, tune, workers):
    # 32 images, 8 per batch: 4 batches an epoch, so resuming at step 3 skips into an epoch and crosses the next.
    monkeypatch.setattr(data, "build_dataset", toy_builder(images_per_class=1))
    init = base_ckpt if tune == "finediffusion" else "none"
    common = [*TINY_TRAIN, "--init", init, "--tune", tune, "--global-batch-size", "8", "--ckpt-every", "3",
              "--num-workers", workers]
    straight = run_train(*common, "--max-steps", "6", "--run-dir", tmp_path / "straight")
    first = run_train(*common, "--max-steps", "3", "--run-dir", tmp_path / "split")
    second = run_train("--resume", first["final_ckpt"], "--max-steps", "6")
    assert second["final_ckpt"] == str(tmp_path / "split" / "checkpoints" / "0000006.pt")
    assert straight["losses"] == first["losses"] + second["losses"]
    a, b = (torch.load(r["final_ckpt"], weights_only=True) for r in (straight, second))
    assert a["train"]["epoch"] == b["train"]["epoch"] == 1 and a["train"]["position"] == b["train"]["position"] == 2
    assert tensors_equal(a["model"], b["model"]) and tensors_equal(a["ema"], b["ema"])
    assert (a["base"] is not None) is (tune == "finediffusion")          # a delta exactly when there is a base


def test_delta_checkpoint_of_dit_xl2_finediffusion_is_under_2_percent_of_the_full_one():
    with torch.device("meta"):
        model = build_model("DiT-XL/2", 256, 10000, 11, "finediffusion")
    set_trainable(model, "finediffusion")
    state = model.state_dict()
    nbytes = lambda names: sum(state[k].numel() * 4 for k in names)       # fp32, as saved
    delta = nbytes([name for name, p in model.named_parameters() if p.requires_grad])
    full = nbytes(state)
    assert full > 2.7e9 and delta / full <= 0.02, (delta, full)


def test_init_takes_the_newest_checkpoint_of_a_run_folder_given_by_an_absolute_path(tmp_path, base_ckpt):
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(base_ckpt)))     # .../run/checkpoints/0000001.pt
    assert hardening.resolve_checkpoint(run_dir) == os.path.abspath(base_ckpt)


@pytest.mark.parametrize("tune, table, rows, trained", [("full", "tiered", 32 + 8, 1.0),
                                                         ("finediffusion", "null", 32 + 1, None)])
def test_the_table_can_be_chosen_apart_from_what_is_tuned(tmp_path, base_ckpt, tune, table, rows, trained):
    """The two ablation cells: full fine-tuning with the tiered table (so guided by eq. 1), and FineDiffusion's
    tensors with a null row (so guided by standard CFG)."""
    out = run_train(*TINY_TRAIN, "--init", base_ckpt, "--tune", tune, "--table", table, "--global-batch-size", "4",
                    "--max-steps", "1", "--run-dir", tmp_path)
    model, _ = load_model(out["final_ckpt"])
    emb = model.y_embedder
    assert emb.embedding_table.num_embeddings == rows and (emb.null_class, bool(emb.num_superclasses)) == (
        table == "null", table == "tiered")
    share = set_trainable(model, tune)
    assert (share[0] / share[1] == trained) if trained else share[0] / share[1] < 0.05


def test_checkpoint_stores_only_tuned_tensors_and_their_optimizer_state(tmp_path, base_ckpt):
    out = run_train(*TINY_TRAIN, "--init", base_ckpt, "--global-batch-size", "4", "--max-steps", "1", "--run-dir", tmp_path)
    ckpt = torch.load(out["final_ckpt"], weights_only=True)          # plain tensors and containers only
    model = build_model(**ckpt["config"], hierarchy=ckpt["hierarchy"])
    set_trainable(model, "finediffusion")
    tuned = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(ckpt["model"]) == set(ckpt["ema"]) == tuned
    assert len(ckpt["train"]["opt"]["state"]) == len(tuned)
    assert ckpt["base"]["path"] == os.path.abspath(base_ckpt) and len(ckpt["base"]["sha256"]) == 64
    assert ckpt["config"] == dict(name="DiT-T/4", image_size=16, num_classes=32, num_superclasses=8,
                                  method="finediffusion", table="tiered", pixel_space=True)
    assert ckpt["hierarchy"] == data.build_dataset("toy", image_size=16).hierarchy()
    assert isinstance(ckpt["args"], dict) and ckpt["step"] == 1


def test_delta_and_exported_checkpoints_load_to_the_same_model(tmp_path, base_ckpt):
    delta = run_train(*TINY_TRAIN, "--init", base_ckpt, "--global-batch-size", "4", "--max-steps", "2",
                      "--run-dir", tmp_path / "delta", "--export", tmp_path / "full.pt")["final_ckpt"]
    full = tmp_path / "full.pt"
    assert torch.load(full, weights_only=True)["base"] is None
    assert os.path.getsize(delta) < os.path.getsize(full) / 2
    assert tensors_equal(load_model(delta)[0].state_dict(), load_model(full)[0].state_dict())


def test_a_delta_refuses_a_changed_base(tmp_path, base_ckpt):
    base = shutil.copy(base_ckpt, tmp_path / "base.pt")
    ckpt = run_train(*TINY_TRAIN, "--init", base, "--global-batch-size", "4", "--max-steps", "1",
                     "--run-dir", tmp_path / "run")["final_ckpt"]
    state = torch.load(base, weights_only=True)
    state["ema"]["blocks.0.attn.qkv.weight"] += 1
    torch.save(state, base)
    with pytest.raises(UserError, match="sha256"):
        load_model(ckpt)


def test_export_loads_with_load_model_and_gives_the_trained_outputs(tmp_path, base_ckpt):
    out = run_train(*TINY_TRAIN, "--init", base_ckpt, "--global-batch-size", "4", "--max-steps", "2", "--ema-decay", "0.5",
                    "--run-dir", tmp_path / "run", "--export", tmp_path / "end.pt")
    again = run_train("--resume", out["final_ckpt"], "--export", tmp_path / "resumed.pt")   # export only
    assert again["step"] == 2
    exported = torch.load(tmp_path / "end.pt", weights_only=True)
    assert set(exported) >= {"model", "ema", "args", "config", "hierarchy"} and exported["base"] is None
    assert "train" not in exported
    assert len(exported["ema"]) == len(exported["model"]) == len(build_model(**exported["config"]).state_dict())
    # the EMA as trained: the delta checkpoint's EMA on the frozen base
    trained, _ = load_model(out["final_ckpt"])
    x, t, y = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500]), \
        torch.tensor([3, 12])
    with torch.no_grad():
        want = trained(x, t, y)
        for path in (tmp_path / "end.pt", tmp_path / "resumed.pt"):
            model, info = load_model(path)
            assert not model.training and model.hierarchy["superclass_of"][12] == 3
            assert torch.equal(model(x, t, y), want)


# ------------------------------------------------------------------------------------------------------------
# Training behaviour
# ------------------------------------------------------------------------------------------------------------

def test_toy_loss_falls_and_is_logged(tmp_path):
    run_train(*TINY_TRAIN, "--init", "none", "--global-batch-size", "32", "--max-steps", "120", "--log-every", "40",
              "--run-dir", tmp_path)
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in records] == [40, 80, 120]
    assert records[-1]["loss"] < 0.7 * records[0]["loss"], records      # the mean of steps 81-120 against 1-40
    assert all(r["loss"] > 0 and r["steps_per_s"] > 0 and r["images_per_s"] > 0 and r["peak_mem_gb"] > 0
               for r in records)


def test_sample_grids_leave_training_untouched(tmp_path, base_ckpt):
    common = [*TINY_TRAIN, "--init", base_ckpt, "--global-batch-size", "4", "--max-steps", "3"]
    plain = run_train(*common, "--run-dir", tmp_path / "plain")
    sampled = run_train(*common, "--sample-every", "2", "--run-dir", tmp_path / "sampled")
    assert os.path.isfile(tmp_path / "sampled" / "samples" / "0000002.png")
    assert plain["losses"] == sampled["losses"]
    a, b = (torch.load(r["final_ckpt"], weights_only=True) for r in (plain, sampled))
    assert tensors_equal(a["model"], b["model"]) and tensors_equal(a["ema"], b["ema"])


def test_latent_dit_trains_from_the_vae_on_the_fly_and_from_a_latent_cache(tmp_path, monkeypatch):
    vae_dir = tmp_path / "vae"
    write_tiny_vae(vae_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    base = tmp_path / "latent-base.pt"                        # an official-layout latent DiT for 32 px images
    torch.save(DiT_models["DiT-T/2"](input_size=4, num_classes=4).state_dict(), base)
    common = ["--data", "toy", "--global-batch-size", "4", "--max-steps", "2", "--num-workers", "0", "--log-every", "1"]
    live = run_train(*common, "--init", base, "--vae", vae_dir, "--run-dir", tmp_path / "live")
    saved = torch.load(live["final_ckpt"], weights_only=True)
    assert saved["config"]["pixel_space"] is False and saved["vae"] == vae.identity()
    # the cache of python data.py cache: the same run, from stored VAE posteriors
    toy = toy_module.ToyDataset(image_size=32, images_per_class=1, flip=False)
    data.build_latent_cache(toy, vae, str(tmp_path / "cache"), num_workers=0, progress=False,
                            meta=dict(data="toy", vae=vae.identity()))
    cached = run_train(*common, "--init", base, "--latent-cache", tmp_path / "cache", "--vae", vae_dir,
                       "--run-dir", tmp_path / "c")
    assert len(cached["losses"]) == 2 and all(math.isfinite(loss) for loss in cached["losses"])
    proc = run_script(os.path.join(HERE, "train.py"), "--latent-cache", tmp_path / "cache", "--image-size", "64",
                      "--init", "none", "--model", "DiT-T/2", cwd=tmp_path)
    assert_one_line_error(proc, "32px")


def test_training_time_is_logged_and_checkpointed_and_keeps_counting_across_a_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "build_dataset", toy_builder(images_per_class=1))
    common = [*TINY_TRAIN, "--init", "none", "--global-batch-size", "4", "--log-every", "1"]
    first = run_train(*common, "--max-steps", "2", "--run-dir", tmp_path)
    saved = torch.load(first["final_ckpt"], weights_only=True)["time_s"]
    run_train("--resume", first["final_ckpt"], "--max-steps", "4")
    times = [json.loads(line)["time_s"] for line in open(tmp_path / "log.jsonl")]
    assert len(times) == 4 and times[0] > 0 and all(b > a for a, b in zip(times, times[1:]))
    assert times[1] <= saved < times[2]                         # step 3 counts on from the checkpoint's time
    assert torch.load(tmp_path / "checkpoints" / "0000004.pt", weights_only=True)["time_s"] >= times[3]


def signal_at_step(monkeypatch, step, signum=signal.SIGTERM):
    """A scheduler's pre-emption signal to this process while it trains step `step` (sent from inside the loop, so
    that the step it lands on is known)."""
    update, steps = train.update_ema, []

    def update_and_signal(*args):
        update(*args)
        steps.append(1)
        if len(steps) == step:
            os.kill(os.getpid(), signum)
    monkeypatch.setattr(train, "update_ema", update_and_signal)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_pre_empted_run_saves_its_step_exits_75_and_resumes_bit_for_bit(tmp_path, base_ckpt, monkeypatch, capsys,
                                                                           signum):
    common = [*TINY_TRAIN, "--init", base_ckpt, "--global-batch-size", "4", "--ckpt-every", "100"]
    straight = run_train(*common, "--max-steps", "5", "--run-dir", tmp_path / "straight")
    signal_at_step(monkeypatch, 3, signum)
    proc = run_main(train, *common, "--max-steps", "5", "--run-dir", tmp_path / "split", capsys=capsys)
    assert proc.returncode == 75 and proc.stderr.strip().splitlines()[-1].startswith("stopped: ")
    assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == ["0000003.pt"]        # the step it was on
    monkeypatch.undo()
    resumed = run_train("--resume", tmp_path / "split", "--max-steps", "5")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL                        # the handlers are put back
    a, b = (torch.load(r["final_ckpt"], weights_only=True) for r in (straight, resumed))
    assert tensors_equal(a["model"], b["model"]) and tensors_equal(a["ema"], b["ema"])
    assert resumed["losses"] == straight["losses"][3:]


PRE_EMPTED_RANK = """import os, signal, sys
sys.path.insert(0, {here!r})
import train
update, steps = train.update_ema, []
def update_and_signal(*args):   # only rank 1 is signalled, during step 2: both ranks must stop after the same step
    update(*args)
    steps.append(1)
    if os.environ["RANK"] == "1" and len(steps) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
train.update_ema = update_and_signal
sys.exit(train.run_cli(lambda: train.main(sys.argv[1:])))
"""


def test_a_pre_empted_two_process_run_stops_both_ranks_after_one_step_and_resumes_bit_for_bit(tmp_path, base_ckpt):
    (tmp_path / "pre_empted.py").write_text(PRE_EMPTED_RANK.format(here=HERE))
    launch = ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    common = [*TINY_TRAIN, "--init", base_ckpt, "--tune", "finediffusion", "--global-batch-size", "4", "--max-steps",
              "4", "--ckpt-every", "100"]
    proc = run_script(*launch, f"--master_port={free_port()}", tmp_path / "pre_empted.py", *common,
                      "--run-dir", tmp_path / "split")
    assert "exitcode: 75" in proc.stderr or "exitcode  : 75" in proc.stderr, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == ["0000002.pt"]
    for run_dir, argv in (("split", ["--resume", tmp_path / "split", "--max-steps", "4"]),
                          ("straight", [*common, "--run-dir", tmp_path / "straight"])):
        proc = run_script(*launch, f"--master_port={free_port()}", "train.py", *argv)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(tmp_path / r / "checkpoints" / "0000004.pt", weights_only=True) for r in ("straight", "split"))
    assert tensors_equal(a["model"], b["model"]) and tensors_equal(a["ema"], b["ema"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, base_ckpt, monkeypatch):
    real, calls = diffusion_module.GaussianDiffusion.training_losses, []

    def poisoned(self, *a, **k):
        terms = real(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(diffusion_module.GaussianDiffusion, "training_losses", poisoned)
    with pytest.raises(hardening.RunFailed, match=r"nan at step 3.*0000002\.pt"):
        run_train(*TINY_TRAIN, "--init", base_ckpt, "--global-batch-size", "4", "--max-steps", "5", "--ckpt-every", "2",
                  "--run-dir", tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["0000002.pt"]
    assert torch.load(tmp_path / "checkpoints" / "0000002.pt", weights_only=True)["step"] == 2


# ------------------------------------------------------------------------------------------------------------
# The paper's ideas end to end: superclass substitution in training (§3.2.1), the guide batch of eq. 1 in
# sampling, the 0.18215 latent scale on both sides, the EMA
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture
def label_lookups():
    """Every TieredEmbedder call while the fixture is active, as (labels given, table rows looked up)."""
    import model as model_module
    calls, rows = [], []

    def hook(module, args, output):
        if isinstance(module, nn.Embedding):
            rows.append(args[0].detach().clone())
        elif isinstance(module, model_module.TieredEmbedder):
            calls.append((args[0].detach().clone(), rows.pop()))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    yield calls
    handle.remove()


def test_training_swaps_labels_for_their_superclass_row_at_the_configured_rate(tmp_path, base_ckpt, label_lookups):
    run_train(*TINY_TRAIN, "--init", base_ckpt, "--tune", "finediffusion", "--superclass-prob", "0.3",
              "--global-batch-size", "16", "--max-steps", "25", "--run-dir", tmp_path / "run")
    y = torch.cat([given for given, _ in label_lookups])
    rows = torch.cat([looked_up for _, looked_up in label_lookups])
    assert len(y) == 16 * 25
    swapped = rows != y
    superclass_of = torch.tensor(toy_module.ToyDataset(images_per_class=1).superclass_of)
    assert torch.equal(rows[swapped], 32 + superclass_of[y[swapped]])     # to the row of its own superclass
    n, p = len(y), 0.3
    assert abs(swapped.sum().item() - n * p) < 4 * math.sqrt(n * p * (1 - p))


def test_a_resume_trains_with_every_setting_the_run_was_started_with(tmp_path, base_ckpt, monkeypatch):
    """Read from what the resumed run uses: the embedder's substitution rate, the optimizer's rate, the EMA's decay."""
    used = []
    substitute, update_ema = model_module.TieredEmbedder.substitute, train.update_ema
    monkeypatch.setattr(model_module.TieredEmbedder, "substitute",
                        lambda self, y: used.append(("superclass_prob", self.superclass_prob)) or substitute(self, y))
    monkeypatch.setattr(train, "update_ema",
                        lambda ema, named, decay: used.append(("ema_decay", decay)) or update_ema(ema, named, decay))
    out = run_train(*TINY_TRAIN, "--init", base_ckpt, "--superclass-prob", "0.3", "--ema-decay", "0.5", "--lr", "3e-3",
                    "--global-batch-size", "4", "--max-steps", "1", "--run-dir", tmp_path)
    used.clear()
    step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda net, diffusion, opt, *a: used.append(
        ("lr", opt.param_groups[0]["lr"])) or step(net, diffusion, opt, *a))
    run_train("--resume", out["final_ckpt"], "--max-steps", "2")
    assert sorted(set(used)) == [("ema_decay", 0.5), ("lr", 3e-3), ("superclass_prob", 0.3)]


def test_training_draws_timesteps_uniformly_over_all_1000_steps(tmp_path, base_ckpt, monkeypatch):
    real, seen = diffusion_module.GaussianDiffusion.training_losses, []

    def recording(self, model, x_start, t, *a, **k):
        seen.append(t.clone())
        return real(self, model, x_start, t, *a, **k)

    monkeypatch.setattr(diffusion_module.GaussianDiffusion, "training_losses", recording)
    run_train(*TINY_TRAIN, "--init", base_ckpt, "--global-batch-size", "50", "--max-steps", "8",
              "--run-dir", tmp_path)
    t = torch.cat(seen)                                            # 400 draws of U{0, ..., 999}
    counts = torch.bincount(t // 250, minlength=4).float()          # four quarters: 100 expected in each
    assert t.min() >= 0 and t.max() <= 999 and ((counts - 100).abs() < 4 * math.sqrt(75)).all(), counts


def test_superclass_substitution_defaults_to_the_authors_rate():
    assert train.parse_args([]).superclass_prob == 0.1


def test_ema_moves_towards_the_trained_weights_at_rate_one_minus_decay(tmp_path, base_ckpt):
    run_train(*TINY_TRAIN, "--init", base_ckpt, "--tune", "finediffusion", "--ema-decay", "0.75",
              "--global-batch-size", "4", "--max-steps", "2", "--ckpt-every", "1", "--run-dir", tmp_path)
    first, second = (torch.load(tmp_path / "checkpoints" / f"{s:07d}.pt", weights_only=True) for s in (1, 2))
    for name, theta in second["model"].items():
        torch.testing.assert_close(second["ema"][name], 0.75 * first["ema"][name] + 0.25 * theta)
    assert not torch.equal(first["ema"]["blocks.0.attn.qkv.bias"], second["ema"]["blocks.0.attn.qkv.bias"])


class FixedPosterior(nn.Module):
    """A VAE whose posterior is N(2, 0.5^2) at every latent pixel (4 channels, 8x downsampling), with the latent
    scale of its config (the SD VAE's 0.18215, or SDXL's 0.13025)."""

    def __init__(self, scaling_factor=0.18215):
        super().__init__()
        self.scaling_factor = scaling_factor

    def encode(self, x):
        shape = (x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8)
        return torch.full(shape, 2.0), torch.full(shape, math.log(0.25))


def test_training_latents_are_posterior_draws_scaled_by_0_18215():
    torch.manual_seed(0)
    z = train.encode(FixedPosterior(), torch.zeros(2000, 3, 16, 16))     # (2000, 4, 2, 2)
    assert abs(z.mean().item() - 0.18215 * 2.0) < 0.005
    assert abs(z.std().item() - 0.18215 * 0.5) < 0.005
    z = train.encode(FixedPosterior(0.13025), torch.zeros(2000, 3, 16, 16))   # a VAE of another scale: its own
    assert abs(z.mean().item() - 0.13025 * 2.0) < 0.005


def test_difffit_gates_scale_their_branches():
    block = randomize(build_model("DiT-T/2", 16, 16, 4, "difffit", pixel_space=True).blocks[0])
    x, c = torch.randn(2, 64, 128), torch.randn(2, 128)
    with torch.no_grad():
        block.gamma1.fill_(0.0)
        block.gamma2.fill_(0.0)
        assert torch.equal(block(x, c), x)                      # both branches gated off: the identity
        block.gamma1.fill_(1.0)
        assert not torch.allclose(block(x, c), x)


def test_dit_configurations_are_the_published_ones():
    published = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
    for size, (depth, width, heads) in published.items():
        for patch in (2, 4, 8):
            with torch.device("meta"):
                model = DiT_models[f"DiT-{size}/{patch}"]()
            assert len(model.blocks) == depth and model.blocks[0].attn.num_heads == heads, size
            assert model.x_embedder.proj.weight.shape[:1] + model.x_embedder.proj.weight.shape[2:] == (width, patch, patch)


def test_fid_table_pairs_superclasses_by_name_not_by_position():
    rng = np.random.default_rng(0)
    fishes, birds = rng.normal(0.0, 1.0, (60, 3)), rng.normal(4.0, 2.0, (60, 3))
    labels = np.repeat([0, 1], 60)
    hierarchy = lambda classes, names: data.make_hierarchy(classes, names, [0, 1])   # class 0 in superclass 0, ...
    # the same tree numbered two ways: the carp is a fish and the wren a bird on both sides
    real = evaluate.image_stats(np.concatenate([fishes, birds]), labels,
                                hierarchy(["carp", "wren"], ["Ray-finned Fishes", "Birds"]))
    fake = evaluate.image_stats(np.concatenate([birds, fishes]), labels,
                                hierarchy(["wren", "carp"], ["Birds", "Ray-finned Fishes"]))
    rows = {r["superclass"]: r["fid"] for r in fid_table(real, fake)}
    assert rows["Ray-finned Fishes"] == pytest.approx(0.0, abs=1e-6) and rows["Birds"] == pytest.approx(0.0, abs=1e-6)


def test_a_superclass_whose_classes_differ_between_the_two_sides_gets_no_row_and_says_so(capsys):
    rng = np.random.default_rng(0)
    features, labels = rng.normal(0.0, 1.0, (180, 3)), np.repeat([0, 1, 2], 60)
    real = evaluate.image_stats(features, labels, data.make_hierarchy(["carp", "wren", "tit"], ["Fishes", "Birds"],
                                                                     [0, 1, 1]))
    fake = evaluate.image_stats(features, labels, data.make_hierarchy(["carp", "wren", "cod"], ["Fishes", "Birds"],
                                                                     [0, 1, 0]))   # the cod among the fishes
    rows = fid_table(real, fake)
    assert [r["superclass"] for r in rows] == ["Overall"]      # both superclasses hold other classes on each side
    assert "no per-superclass row for Fishes, Birds" in capsys.readouterr().err
    same_birds = data.make_hierarchy(["carp", "wren", "tit"], ["Fishes", "Birds", "Whales"], [2, 1, 1])
    rows = fid_table(real, evaluate.image_stats(features, labels, same_birds))
    assert [r["superclass"] for r in rows] == ["Birds", "Overall"] and rows[0]["count_real"] == 120


# ------------------------------------------------------------------------------------------------------------
# User mistakes: one line, exit code 2, no traceback
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """A working folder of files the table below names: a toy checkpoint, a latent DiT without its VAE, broken
    checkpoints, a plain pickle, a VAE with an impossible config, FID statistics and images, a plain file."""
    folder = tmp_path_factory.mktemp("bad_inputs")
    write_our_checkpoint(folder / "ckpt.pt")
    torch.save(DiT_models["DiT-T/2"](input_size=4, num_classes=4).state_dict(), folder / "latent-base.pt")
    torch.save([torch.zeros(1)], folder / "list.pt")
    torch.save(dict(config="DiT-T/4", model={"x": torch.zeros(1)}), folder / "config-string.pt")
    with open(folder / "plain.pth", "wb") as f:
        pickle.dump({"weights": [1.0, 2.0]}, f)                   # a pickle, not a torch checkpoint
    write_folder(folder / "bad-vae", {}, config=dict(TINY_VAE, norm_num_groups=3))
    np.savez(folder / "real.npz", mu=np.zeros(2048), sigma=np.eye(2048), count=np.int64(2))
    np.savez(folder / "fake.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    (folder / "a-file").write_text("not a folder")
    (folder / "results").mkdir()
    return folder


# (script, argv, words the one line must hold[, environment]); "{base}" is a training checkpoint at step 1
BAD_ARGUMENTS = [
    ("train", ["--data", "inat21"], ["--data-path", "inat_comp"]),
    ("train", ["--data", "inat21", "--data-path", "nowhere"], ["nowhere", "inat_comp"]),
    ("train", ["--data", "toy", "--init", "missing.pt"], ["missing.pt", "not found"]),
    ("train", ["--data", "toy", "--init", "DiT-XL-2-256x256.pt"], ["DiT-XL-2-256x256.pt", "dl.fbaipublicfiles.com"]),
    ("train", ["--data", "toy", "--init", "latent-base.pt"], ["sd-vae-ft-ema", "pretrained/", "huggingface.co"]),
    ("train", ["--data", "toy", "--global-batch-size", "3"], ["--global-batch-size 3", "multiple of 2"],
     {"WORLD_SIZE": "2", "RANK": "0"}),
    ("train", ["--data", "toy", "--global-batch-size", "0"], ["--global-batch-size", ">= 1"]),
    ("train", ["--data", "toy", "--lr", "-1"], ["--lr", "positive"]),
    ("train", ["--data", "toy", "--num-workers", "-1"], ["--num-workers", ">= 0"]),
    ("train", ["--data", "toy", "--ema-decay", "1.5"], ["--ema-decay", "[0, 1)"]),
    ("train", ["--data", "toy", "--superclass-prob", "2"], ["--superclass-prob", "[0, 1]"]),
    ("train", ["--data", "toy", "--sample-every", "-1"], ["--sample-every", ">= 0"]),
    ("train", ["--data", "toy", "--device", "tpu"], ["--device", "cpu"]),
    ("train", ["--data", "toy", "--init", "none", "--image-size", "17"], ["--image-size 17", "multiple of 4"]),
    ("train", ["--data", "toy", "--image-size", "0"], ["--image-size", ">= 1"]),
    ("train", ["--data", "toy", "--image-size", "-8"], ["--image-size", ">= 1"]),
    ("train", ["--data", "folder", "--data-path", ".", "--init", "none", "--model", "DiT-T/2", "--image-size", "40"],
     ["--image-size 40", "multiple of 16"]),
    ("train", ["--run-dir", "a-file", "--data", "toy"], ["--run-dir", "folder"]),
    ("train", ["--resume", "nothing.pt"], ["nothing.pt"]),
    ("train", ["--resume", "{base}", "--max-steps", "1", "--run-dir", "new-run"], ["--max-steps 1", "step 1"]),
    ("train", ["--resume", "{base}", "--max-steps", "5", "--model", "DiT-S/2"], ["--model DiT-S/2", "DiT-T/4"]),
    ("sample", ["--ckpt", "ckpt.pt", "--class-id", "1", "--steps", "1001"], ["--steps", "[2, 1000]"]),
    ("sample", ["--ckpt", "ckpt.pt", "--class-id", "1", "--steps", "1"], ["--steps", "[2, 1000]"]),
    ("sample", ["--ckpt", "ckpt.pt", "--class-id", "1", "--sampler", "ddim", "--steps", "300"], ["ddim", "300"]),
    ("sample", ["--ckpt", "ckpt.pt", "--class-id", "1", "--device", "tpu"], ["--device"]),
    ("sample", ["--ckpt", "ckpt.pt", "--class-id", "1", "--guidance-interval", "700", "200"],
     ["--guidance-interval 700 200", "LO <= HI"]),
    ("sample", ["--ckpt", "ckpt.pt", "--class-id", "1", "--guidance-interval", "0", "1000"],
     ["--guidance-interval 0 1000", "999"]),
    ("sample", ["--ckpt", "ckpt.pt", "--class-id", "1", "--guidance-interval", "0", "500", "--guidance", "none"],
     ["--guidance-interval", "guidance"]),
    ("sample", ["--ckpt", "ckpt.pt", "--class-id", "1", "--sampler", "dpm++2m", "--steps", "1000"],
     ["--steps 1000", "at most 999 steps"]),
    ("sample", ["--ckpt", "ckpt.pt", "--class-id", "1", "--cfg-scale", "nan"], ["--cfg-scale", "finite"]),
    ("sample", ["--ckpt", "ckpt.pt", "--class-id", "1", "--num-samples", "0"], ["--num-samples", ">= 1"]),
    ("sample", ["--ckpt", "ckpt.pt", "--class-id", "16"], ["--class-id", "[0, 16)"]),
    ("sample", ["--ckpt", "FineDiffusion-iNat.pt", "--class-id", "1"], ["not found", "finediffusion.github.io"]),
    ("sample", ["--class-id", "1"], ["train.py", "looked in results/", "pretrained/FineDiffusion-iNat.pt"]),
    ("sample", ["--ckpt", "list.pt", "--class-id", "1"], ["list.pt", "list"]),
    ("sample", ["--ckpt", "config-string.pt", "--class-id", "1"], ["config-string.pt", "config"]),
    ("evaluate", ["generate", "--ckpt", "ckpt.pt", "--out", "gen", "--per-class", "1", "--batch-size", "0"],
     ["--batch-size", ">= 1"]),
    ("evaluate", ["generate", "--ckpt", "ckpt.pt", "--out", "gen", "--per-class", "1", "--steps", "0"],
     ["--steps", "[2, 1000]"]),
    ("evaluate", ["generate", "--ckpt", "ckpt.pt", "--out", "a-file", "--per-class", "1"], ["--out", "folder"]),
    ("evaluate", ["toy", "--ckpt", "ckpt.pt", "--per-class", "0"], ["--per-class", ">= 1"]),
    ("evaluate", ["stats", "--data", "toy", "--out", "s.npz", "--workers", "-1"], ["--workers", ">= 0"]),
    ("evaluate", ["fid", "--real", "real.npz", "--fake", "fake.npz", "--inception", "plain.pth"], ["plain.pth"]),
    ("evaluate", ["fid", "--real", "missing.npz", "--fake", "fake.npz"], ["missing.npz", "not found"]),
    ("evaluate", ["embeddings", "--ckpt", "ckpt.pt", "--out", "e.png", "--perplexity", "0"], ["--perplexity"]),
    ("evaluate", ["embeddings", "--ckpt", "missing.pt", "--out", "e.png"], ["missing.pt", "not found"]),
    ("evaluate", ["grid", "--ckpt", "ckpt.pt", "--class-ids", "16", "--out", "g.png"], ["16", "[0, 16)"]),
    ("evaluate", ["grid", "--ckpt", "ckpt.pt", "--class-ids", "1", "--out", "g.png", "--steps", "0"],
     ["--steps", "[2, 1000]"]),
    ("evaluate", ["curves", "--runs", "nowhere", "--out", "c.png"], ["nowhere", "log"]),
    ("data", ["cache", "--data", "toy", "--out", "c", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    ("data", ["cache", "--data", "toy", "--out", "a-file"], ["--out", "folder"]),
    ("data", ["cache", "--data", "toy", "--out", "c", "--image-size", "36"], ["--image-size", "'36'", "multiple of 8"]),
    ("data", ["cache", "--data", "toy", "--out", "c", "--vae", "bad-vae"], ["norm_num_groups 3"]),
    ("data", ["preview", "--per-class", "0"], ["--per-class", ">= 1"]),
    ("data", ["info", "--data", "inat21"], ["--data-path", "inat_comp"]),
    ("bench", ["--batch", "0"], ["--batch", ">= 1"]),
    ("bench", ["--image-size", "60"], ["--image-size 60", "multiple of 16"]),
    ("bench", ["--sample-batches", "1"], ["--sample-batches", ">= 2"]),
    ("bench", ["--device", "tpu"], ["--device"]),
    ("bench", ["--gpu-check", "--only", "train"], ["unrecognized arguments: --only train"]),
    ("bench", ["--gpu-check", "--sample-batches", "2"], ["unrecognized arguments: --sample-batches 2"]),
    ("bench", ["--peak-tflops", "500"], ["unrecognized arguments: --peak-tflops 500"]),
    ("bench", ["--gpu-check", "--peak-tflops", "0"], ["--peak-tflops", "positive"]),
    ("evaluate", ["generate", "--ckpt", "ckpt.pt", "--out", "gen", "--num-samples", "1000000000000"],
     ["--num-samples", "[1, 1000000]"]),
    ("evaluate", ["generate", "--ckpt", "ckpt.pt", "--out", "gen", "--per-class", "100000"],
     ["--per-class 100000", "1,600,000 images", "1,000,000"]),
]


@pytest.mark.parametrize("row", BAD_ARGUMENTS, ids=lambda row: f"{row[0]} {' '.join(row[1])}")
def test_every_cli_answers_a_bad_argument_with_one_error_line_and_does_nothing(row, bad_inputs, base_ckpt,
                                                                              monkeypatch, capsys):
    script, argv, words, *env = row
    monkeypatch.chdir(bad_inputs)
    for name, value in (env[0] if env else {}).items():
        monkeypatch.setenv(name, value)
    before = sorted(os.listdir("."))
    module = dict(train=train, sample=sample_module, evaluate=evaluate, data=data, bench=bench)[script]
    with warnings.catch_warnings(record=True) as warned:   # a warning would be one more line on stderr
        warnings.simplefilter("always")
        proc = run_main(module, *[a.replace("{base}", str(base_ckpt)) for a in argv], capsys=capsys)
    assert_one_line_error(proc, *words)
    assert not warned, [str(w.message) for w in warned]
    assert "multiple of 1:" not in proc.stderr and "weights_only" not in proc.stderr   # no wrong advice
    assert sorted(os.listdir(".")) == before                                        # nothing left behind


# ------------------------------------------------------------------------------------------------------------
# evaluate.py — generate and the offline toy tables
# ------------------------------------------------------------------------------------------------------------

def test_samples_are_spread_evenly_over_classes():
    counts = np.bincount([c for c, _ in evaluate.generation_jobs(16, num_samples=40)], minlength=16)
    assert counts.min() == 2 and counts.max() == 3 and counts.sum() == 40
    assert evaluate.generation_jobs(3, per_class=2) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def test_generate_writes_the_requested_per_class_counts_and_resumes_without_duplicating(tmp_path):
    write_our_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "gen"
    argv = ["generate", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(out), "--per-class", "3", "--steps", "2",
            "--batch-size", "8", "--device", "cpu", "--npz", str(tmp_path / "gen.npz")]
    evaluate.main(argv)
    manifest = json.loads((out / "samples.json").read_text())
    assert manifest["hierarchy"] == TOY_HIERARCHY and len(manifest["images"]) == 16 * 3
    assert sorted(np.bincount([c for _, c in manifest["images"]])) == [3] * 16
    paths = [out / name for name, _ in manifest["images"]]
    assert all(p.is_file() for p in paths) and sum(len(files) for _, _, files in os.walk(out)) == 16 * 3 + 2  # .lock
    first_run = {p: os.path.getmtime(p) for p in paths}
    os.remove(paths[0])                                          # an interrupted first batch
    evaluate.main(argv)
    assert all(p.is_file() for p in paths)
    assert all(os.path.getmtime(p) == first_run[p] for p in paths[8:])   # finished batches were not redone
    packed = np.load(tmp_path / "gen.npz")
    assert packed["arr_0"].shape == (48, 16, 16, 3) and sorted(np.bincount(packed["labels"])) == [3] * 16
    assert json.loads(str(packed["hierarchy"])) == TOY_HIERARCHY


def test_generate_records_the_sampler_and_the_guidance_interval(tmp_path):
    write_our_checkpoint(tmp_path / "ckpt.pt")
    evaluate.main(["generate", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "gen"), "--per-class", "1",
                   "--sampler", "dpm++2m", "--steps", "2", "--guidance-interval", "0", "500", "--device", "cpu"])
    made_by = json.loads((tmp_path / "gen" / "samples.json").read_text())["made_by"]
    assert (made_by["sampler"], made_by["steps"], made_by["guidance_interval"]) == ("dpm++2m", 2, [0, 500])


def toy_checkpoint(path, method, **kw):
    """A (random-weight) checkpoint of the real toy hierarchy at 16 px, as train.py writes it."""
    toy = toy_module.ToyDataset("toy", image_size=16, images_per_class=1)
    config = dict(name="DiT-T/4", image_size=16, num_classes=32, num_superclasses=8, method=method, pixel_space=True, **kw)
    model = randomize(build_model(**config, hierarchy=toy.hierarchy()))
    torch.save(dict(model=model.state_dict(), config=config, hierarchy=toy.hierarchy(), args={}, base=None), path)
    return str(path)


def test_toy_table_has_a_row_for_every_checkpoint_and_guidance_it_supports(tmp_path, capsys):
    hybrid = toy_checkpoint(tmp_path / "fd.pt", "finediffusion", null_class=True)     # superclass and null rows
    bitfit = toy_checkpoint(tmp_path / "bitfit.pt", "bitfit")                        # null row only
    evaluate.main(["toy", "--ckpt", hybrid, bitfit, "--per-class", "2", "--steps", "2", "--pairs", "20",
                   "--cache-dir", str(tmp_path), "--classifier-epochs", "1", "--out-json", str(tmp_path / "t.json")])
    rows = json.load(open(tmp_path / "t.json"))
    assert [(r["method"], r["guidance"]) for r in rows] == [
        ("-", "-"), ("finediffusion", "none"), ("finediffusion", "null"), ("finediffusion", "superclass"),
        ("bitfit", "none"), ("bitfit", "null")]
    assert all({"sub_acc", "super_acc", "fid", "diversity"} <= r.keys() for r in rows)
    header = capsys.readouterr().out.splitlines()[0]
    for column in ["sub acc", "super acc", "FID", "diversity"]:
        assert column in header
    assert os.path.isfile(tmp_path / "toy_classifier_16px.pt")          # cached for the next call


def test_toy_table_gives_a_json_row_per_seed_and_prints_their_spread(tmp_path, capsys):
    fd = toy_checkpoint(tmp_path / "fd.pt", "finediffusion")
    evaluate.main(["toy", "--ckpt", fd, "--guidance", "superclass", "--sampler", "dpm++2m", "--steps", "2",
                   "--guidance-interval", "0", "500", "--seeds", "0", "1", "--per-class", "2", "--pairs", "20",
                   "--cache-dir", str(tmp_path), "--classifier-epochs", "1", "--out-json", str(tmp_path / "t.json")])
    rows = json.load(open(tmp_path / "t.json"))
    assert [(r["guidance"], r.get("seed")) for r in rows] == [("-", None), ("superclass", 0), ("superclass", 1)]
    assert all((r["sampler"], r["steps"], r["guidance_interval"]) == ("dpm++2m", 2, [0, 500]) for r in rows[1:])
    assert rows[1]["fid"] != rows[2]["fid"]                            # the seed moves the figures
    line = capsys.readouterr().out.splitlines()[2]                     # header, real images, the sampled row
    mean, half = (rows[1]["fid"] + rows[2]["fid"]) / 2, abs(rows[1]["fid"] - rows[2]["fid"]) / 2
    assert f"{mean:.2f}±{half:.2f}" in line


def test_toy_table_refuses_a_checkpoint_of_other_data(tmp_path):
    write_our_checkpoint(tmp_path / "other.pt")
    proc = run_script("evaluate.py", "toy", "--ckpt", str(tmp_path / "other.pt"), "--cache-dir", str(tmp_path))
    assert_one_line_error(proc, "not a toy checkpoint")


def test_toy_sweep_has_a_row_per_guide_and_scale_and_w1_is_the_unguided_sampler(tmp_path):
    hybrid = toy_checkpoint(tmp_path / "fd.pt", "finediffusion", null_class=True)
    evaluate.main(["toy", "--ckpt", hybrid, "--cfg-scales", "1", "3", "--per-class", "2", "--steps", "2",
                   "--pairs", "20", "--cache-dir", str(tmp_path), "--classifier-epochs", "1",
                   "--out-json", str(tmp_path / "t.json"), "--plot", str(tmp_path / "sweep.png")])
    rows = json.load(open(tmp_path / "t.json"))
    assert [(r["guidance"], r["cfg_scale"]) for r in rows] == [
        ("-", None), ("none", None), ("null", 1.0), ("null", 3.0), ("superclass", 1.0), ("superclass", 3.0)]
    metrics = lambda r: (r["sub_acc"], r["fid"], r["diversity"])
    assert metrics(rows[2]) == metrics(rows[4]) == metrics(rows[1]) != metrics(rows[3])    # eq. 1 at w = 1
    assert png_size(tmp_path / "sweep.png") == (900, 440) and coloured_pixels(tmp_path / "sweep.png") > 200
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["fid"]) for r in table] == pytest.approx([r["fid"] for r in rows])


def test_toy_table_scores_a_toy_base_checkpoint_with_a_classifier_of_the_base_sets_classes(tmp_path):
    base = toy_module.toy_dataset("toy-base", image_size=16, images_per_class=1)
    config = dict(name="DiT-T/4", image_size=16, num_classes=64, num_superclasses=8, method="full", pixel_space=True)
    model = randomize(build_model(**config, hierarchy=base.hierarchy()))
    torch.save(dict(model=model.state_dict(), config=config, hierarchy=base.hierarchy(), args={}, base=None),
               tmp_path / "base.pt")
    evaluate.main(["toy", "--ckpt", str(tmp_path / "base.pt"), "--per-class", "2", "--steps", "2", "--pairs", "10",
                   "--cache-dir", str(tmp_path), "--classifier-epochs", "1", "--out-json", str(tmp_path / "t.json")])
    rows = json.load(open(tmp_path / "t.json"))
    assert [(r["ckpt"], r["guidance"]) for r in rows] == [("real toy-base images (test)", "-"), ("base.pt", "none"),
                                                           ("base.pt", "null")]
    net = torch.load(tmp_path / "toy_base_classifier_16px.pt", weights_only=True)
    assert net["fc.weight"].shape[0] == 64 and base.class_names[:2] == ["disc/striped/pale", "disc/striped/deep"]


def coloured_pixels(path, box=None):
    """Pixels of a PNG (within box = (left, top, right, bottom)) that are clearly coloured: markers and curves,
    not the black text and frames or the white background."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB").crop(box) if box else im.convert("RGB")).astype(int)
    return int(((rgb.max(-1) - rgb.min(-1)) > 60).sum())


def panel_boxes(path, count):
    """The `count` equal panels of a figure tiled in one row."""
    width, height = png_size(path)
    return [(i * width // count, 0, (i + 1) * width // count, height) for i in range(count)]


# ------------------------------------------------------------------------------------------------------------
# evaluate.py — figures: t-SNE (Fig. 7), same-seed grids (Fig. 5), training curves and Fig. 2
# ------------------------------------------------------------------------------------------------------------

def test_tsne_bandwidths_give_every_point_the_perplexity_asked_for():
    x = torch.cat([torch.randn(40, 5, dtype=torch.float64), 5 + 3 * torch.randn(20, 5, dtype=torch.float64)])
    p = figures.conditional_affinities(figures.squared_distances(x), perplexity=10.0)
    assert torch.allclose(p.sum(1), torch.ones(60, dtype=torch.float64)) and torch.all(p.diagonal() == 0)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(1)
    assert torch.allclose(entropy.exp(), torch.full((60,), 10.0, dtype=torch.float64), rtol=1e-4)


def test_tsne_joint_affinities_are_the_symmetrised_conditionals_over_2n():
    x = torch.randn(30, 4, dtype=torch.float64)
    d = figures.squared_distances(x)
    cond, joint = figures.conditional_affinities(d, 5.0), figures.tsne_affinities(d, 5.0)
    assert torch.allclose(joint, (cond + cond.T) / 60) and joint.sum().item() == pytest.approx(1.0)


def test_tsne_gradient_is_the_autograd_gradient_of_kl_p_q_under_student_t():
    p = figures.tsne_affinities(figures.squared_distances(torch.randn(25, 6, dtype=torch.float64)), 6.0)
    y = torch.randn(25, 2, dtype=torch.float64, requires_grad=True)
    num = (1 / (1 + ((y[:, None] - y[None]) ** 2).sum(-1))) * (1 - torch.eye(25, dtype=torch.float64))
    q = num / num.sum()
    kl = (p * torch.log(p.clamp_min(1e-12) / q.clamp_min(1e-12))).sum()
    kl.backward()
    grad, q_ours = figures.tsne_gradient(p, y.detach())
    assert torch.allclose(grad, y.grad, atol=1e-10) and torch.allclose(q_ours, q.detach().clamp_min(1e-12))


def test_tsne_maps_separate_clusters_to_separate_clusters_and_repeats_with_its_seed():
    centres = 10 * torch.eye(3, 20)
    x = torch.cat([c + torch.randn(30, 20) for c in centres])
    labels = torch.arange(3).repeat_interleave(30)
    y, kl = figures.tsne(x, perplexity=10, iters=500, seed=1)
    assert figures.same_superclass_neighbours(y, labels, k=10) == 1.0 and kl < 1.0
    assert torch.equal(y, figures.tsne(x, perplexity=10, iters=500, seed=1)[0])


def test_same_superclass_neighbours_is_the_share_of_each_points_nearest_in_its_superclass():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0], [12.0]])
    superclass = torch.tensor([0, 1, 1, 1, 1])
    # k=1: 0 -> 1 (other), 1 -> 0 (other), 10 -> 11, 11 -> 10 or 12, 12 -> 11: 3 of 5
    assert figures.same_superclass_neighbours(x, superclass, k=1) == pytest.approx(3 / 5)
    # k=2: 0 -> 1, 10 (0 of 2); 1 -> 0, 10 (1 of 2); 10, 11, 12 -> the other two (2 of 2 each): 7 of 10
    assert figures.same_superclass_neighbours(x, superclass, k=2, chunk=2) == pytest.approx(7 / 10)


def test_embeddings_command_draws_a_panel_per_checkpoint_and_writes_its_numbers(tmp_path):
    fd, bitfit = toy_checkpoint(tmp_path / "fd.pt", "finediffusion"), toy_checkpoint(tmp_path / "bitfit.pt", "bitfit")
    out = tmp_path / "fig7.png"
    evaluate.main(["embeddings", "--ckpt", fd, bitfit, "--out", str(out), "--iters", "300", "--device", "cpu"])
    assert png_size(out) == (2 * 640, 460)
    assert all(coloured_pixels(out, box) > 100 for box in panel_boxes(out, 2))
    found = json.load(open(tmp_path / "fig7.json"))["checkpoints"]
    assert [len(c["subclass"]) for c in found] == [32, 32]
    assert [len(c["superclass"]) for c in found] == [8, 0]      # FineDiffusion's table has superclass rows (+)
    assert [len(c["mean"]) for c in found] == [8, 8]
    with open(tmp_path / "fig7.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["finediffusion", "bitfit"]
    assert all(0 <= float(r["same_superclass_2d"]) <= 1 and float(r["chance"]) == pytest.approx(3 / 31)
               for r in table)


def test_embeddings_read_the_authors_10011_row_table_with_the_inat21_hierarchy(tmp_path):
    model = DiT_models["DiT-T/2"](input_size=4, num_classes=10000, num_superclasses=11, null_class=False,
                                  norm_affine=True)
    superclass_of = torch.tensor(data.inat21_superclass_of())
    with torch.no_grad():                                      # subclass rows clustered around their superclass row
        table = model.y_embedder.embedding_table.weight
        table[10000:] = 5 * torch.randn(11, table.shape[1])
        table[:10000] = table[10000:][superclass_of] + torch.randn(10000, table.shape[1])
    torch.save({"model": model.state_dict()}, tmp_path / "FineDiffusion-iNat.pt")
    evaluate.main(["embeddings", "--ckpt", str(tmp_path / "FineDiffusion-iNat.pt"), "--out", str(tmp_path / "f.png"),
                   "--max-points", "300", "--iters", "250", "--device", "cpu"])
    found = json.load(open(tmp_path / "f.json"))["checkpoints"][0]
    assert found["superclass_names"] == data.INAT21_SUPERCLASSES and found["classes"] == 10000
    assert len(found["subclass"]) == 300 and len(found["superclass"]) == 11
    assert all(s == superclass_of[c] for _, _, c, s in found["subclass"])
    assert found["same_superclass_original"] > 0.9 and found["same_superclass_2d"] > 0.9


def test_grid_has_the_real_images_then_a_row_per_checkpoint_all_from_one_seed(tmp_path):
    ckpt = toy_checkpoint(tmp_path / "fd.pt", "finediffusion")
    out = tmp_path / "fig5.png"
    evaluate.main(["grid", "--ckpt", ckpt, ckpt, "--class-ids", "0", "5", "9", "--steps", "2", "--data", "toy",
                   "--out", str(out), "--device", "cpu"])
    cell = figures.GRID_MIN_CELL                              # 16 px toy images, enlarged
    left, top, pad = figures.GRID_LABEL_WIDTH, figures.GRID_HEADER, figures.GRID_PAD
    assert png_size(out) == (left + 3 * (cell + pad), top + 3 * (cell + pad))
    image = np.asarray(Image.open(out).convert("RGB"))
    rows = [image[top + r * (cell + pad):top + r * (cell + pad) + cell, left:] for r in range(3)]
    assert np.array_equal(rows[1], rows[2])                    # the same checkpoint twice: the same noise, every cell
    real = data.build_dataset("toy", image_size=16, split="val", flip=False)
    first = real[real.targets.index(5)][0]                     # the first real image of class 5, in its column
    expected = ((first + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    assert np.array_equal(rows[0][::cell // 16, (cell + pad):(cell + pad) + cell:cell // 16], expected)
    with open(tmp_path / "fig5.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["row"], r["class_id"]) for r in table] == [(str(r), str(c)) for r in range(3) for c in (0, 5, 9)]
    assert {r["guidance"] for r in table[3:]} == {"superclass"} and {r["seed"] for r in table[3:]} == {"0"}


def test_grid_labels_are_cut_to_their_cell_and_may_be_empty():
    long_name = "Crabs, Lobsters & Kin / a species name far too long for one cell"
    sheet = figures.grid_image([[np.zeros((16, 16, 3), np.uint8)]], [[long_name]], [["class 0", ""]])
    assert sheet.size == (figures.GRID_LABEL_WIDTH + figures.GRID_MIN_CELL + figures.GRID_PAD,
                          figures.GRID_HEADER + figures.GRID_MIN_CELL + figures.GRID_PAD)
    label_column = np.asarray(sheet)[:, :figures.GRID_LABEL_WIDTH]
    assert (label_column[:, -6:] == 255).all() and (label_column < 128).any()      # drawn, and kept in its column


def test_grid_refuses_checkpoints_of_other_classes(tmp_path):
    toy = toy_checkpoint(tmp_path / "toy.pt", "finediffusion")
    write_our_checkpoint(tmp_path / "other.pt")
    with pytest.raises(UserError, match="other classes"):
        evaluate.main(["grid", "--ckpt", toy, str(tmp_path / "other.pt"), "--class-ids", "0", "--steps", "2",
                       "--out", str(tmp_path / "g.png"), "--device", "cpu"])


def write_log(path, records):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_read_log_lets_a_resume_replace_the_steps_it_repeats(tmp_path):
    write_log(tmp_path, [dict(step=10, loss=1.0, time_s=5.0), dict(step=20, loss=0.9, time_s=7.0),
                         dict(step=30, loss=0.8, time_s=9.0),                      # resumed at 20, then:
                         dict(step=30, loss=0.7, time_s=8.0)])
    records = figures.read_log(str(tmp_path))
    assert [(r["step"], r["loss"], r["time_s"]) for r in records] == [(10, 1.0, 5.0), (20, 0.9, 7.0), (30, 0.7, 8.0)]


def test_curves_plot_loss_by_step_and_by_time_and_fig2_from_toy_tables(tmp_path):
    for i, run in enumerate(["toy-full", "toy-finediffusion"]):
        write_log(tmp_path / run, [dict(step=s, loss=1 / s, time_s=s * (2 - i), steps_per_s=1.0) for s in (10, 20, 30)])
    toy = [dict(ckpt="real toy images (test)", method="-", guidance="-", cfg_scale=None, fid=0.4, train_time_s=None),
           dict(ckpt="toy-full/0000030", method="full", guidance="null", cfg_scale=4.0, fid=9.0, train_time_s=60.0),
           dict(ckpt="toy-finediffusion/0000030", method="finediffusion", guidance="superclass", cfg_scale=4.0,
                fid=7.0, train_time_s=30.0),
           dict(ckpt="toy-full/0000030", method="full", guidance="null", cfg_scale=2.0, fid=5.0, train_time_s=60.0)]
    with open(tmp_path / "toy.json", "w") as f:
        json.dump(toy, f)
    out = tmp_path / "curves.png"
    evaluate.main(["curves", "--runs", str(tmp_path / "toy-full"), str(tmp_path / "toy-finediffusion"),
                   "--toy-json", str(tmp_path / "toy.json"), "--out", str(out)])
    assert png_size(out) == (3 * figures.PANEL_SIZE[0], figures.PANEL_SIZE[1])
    assert all(coloured_pixels(out, box) > 200 for box in panel_boxes(out, 3))
    with open(tmp_path / "curves.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["run"], r["step"], r["time_s"]) for r in table if r["panel"] == "loss"][:3] == [
        ("toy-full", "10", "20"), ("toy-full", "20", "40"), ("toy-full", "30", "60")]
    assert [(r["method"], r["fid"]) for r in table if r["panel"] == "fid_vs_time"] == [
        ("full", "9.0"), ("finediffusion", "7.0")]                 # w = 4 only, real images have no training time


@pytest.mark.parametrize("command", [["embeddings", "--ckpt", "nothing.pt"],
                                     ["grid", "--ckpt", "nothing.pt", "--class-ids", "0"],
                                     ["curves", "--runs", "nowhere"]])
def test_figure_commands_want_a_png_before_any_work(tmp_path, command):
    with pytest.raises(UserError, match=r"\.png"):
        evaluate.main([*command, "--out", str(tmp_path / "figure.jpg")])


# ------------------------------------------------------------------------------------------------------------
# Nothing silently mixed or lost: one writer per run folder, samples that know what made them, full disks, a VAE
# that fits its DiT, no leftovers, fp16 as on V100s, the design's two commands, torchrun
# ------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def file_size_limit(nbytes):
    """Files this process writes stop at `nbytes` (writes past it fail with EFBIG, as on a disk that fills up);
    SIGXFSZ is ignored, so that the write fails instead of the process being killed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def error_lines(proc):
    """The `error:` lines of a command whose stderr also holds progress bars and notes."""
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def test_a_run_folder_has_one_writer_until_its_run_is_killed_and_then_it_resumes(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *TINY_TRAIN, "--init", "none",
                               "--global-batch-size", "4", "--max-steps", "100000", "--ckpt-every", "2",
                               "--run-dir", run_dir], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):                                   # its first checkpoint: it is training
            if glob.glob(str(run_dir / "checkpoints" / "*.pt")):
                break
            time.sleep(0.1)
        with pytest.raises(UserError, match=rf"{run_dir} is in use by another training run \(pid {holder.pid} on"):
            run_train(*TINY_TRAIN, "--init", "none", "--global-batch-size", "4", "--max-steps", "1", "--run-dir",
                      run_dir)
    finally:
        holder.kill()                                          # kill -9: no clean-up code runs
        holder.wait()
    newest = max(glob.glob(str(run_dir / "checkpoints" / "*.pt")))
    step = torch.load(newest, weights_only=True)["step"]
    assert run_train("--resume", newest, "--max-steps", step + 1)["step"] == step + 1


def latent_dit_and_vae(folder, seed=0):
    """An official-layout latent DiT-T/2 for 16 px images (4 classes + null) and an 8x VAE for it."""
    torch.manual_seed(seed)
    torch.save(randomize(DiT_models["DiT-T/2"](input_size=2, num_classes=4), seed).state_dict(), folder / "dit.pt")
    write_tiny_vae(folder / "vae", seed)
    return folder / "dit.pt", folder / "vae"


def test_generate_resumes_only_the_samples_of_its_settings_and_names_what_changed(tmp_path, capsys):
    dit, vae = latent_dit_and_vae(tmp_path)
    (tmp_path / "other").mkdir()
    other_dit, other_vae = latent_dit_and_vae(tmp_path / "other", seed=1)
    argv = ["generate", "--ckpt", dit, "--vae", vae, "--out", tmp_path / "gen", "--per-class", "1", "--guidance", "null",
            "--steps", "2", "--device", "cpu"]
    assert run_main(evaluate, *argv, capsys=capsys).returncode == 0
    made_by = json.loads((tmp_path / "gen" / "samples.json").read_text())["made_by"]
    assert {"ckpt_sha256", "vae_sha256", "guidance", "cfg_scale", "sampler", "steps", "seed", "image_size"} <= set(made_by)
    for change, named in [(["--cfg-scale", "2"], "cfg_scale 4.0 -> 2.0"), (["--steps", "3"], "steps 2 -> 3"),
                          (["--guidance", "none"], "guidance 'null' -> 'none'"), (["--sampler", "ddim"], "sampler"),
                          (["--seed", "1"], "seed 0 -> 1"), (["--ckpt", other_dit], "ckpt_sha256"),
                          (["--vae", other_vae], "vae_sha256")]:
        assert_one_line_error(run_main(evaluate, *argv, *change, capsys=capsys), named, "--overwrite")
    assert run_main(evaluate, *argv, capsys=capsys).returncode == 0       # the same settings resume


def test_generate_with_overwrite_starts_over_with_the_new_settings(tmp_path, capsys):
    write_our_checkpoint(tmp_path / "ckpt.pt")
    argv = ["generate", "--ckpt", tmp_path / "ckpt.pt", "--out", tmp_path / "gen", "--per-class", "1", "--steps", "2",
            "--device", "cpu"]
    run_main(evaluate, *argv, capsys=capsys)
    first = (tmp_path / "gen" / "00003" / "000000.png").read_bytes()
    assert run_main(evaluate, *argv, "--cfg-scale", "1", "--overwrite", capsys=capsys).returncode == 0
    assert json.loads((tmp_path / "gen" / "samples.json").read_text())["made_by"]["cfg_scale"] == 1.0
    assert (tmp_path / "gen" / "00003" / "000000.png").read_bytes() != first


def test_a_log_append_that_fails_warns_once_and_training_goes_on(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    os.symlink("/dev/full", tmp_path / "run" / "log.jsonl")            # every write: ENOSPC
    out = run_train(*TINY_TRAIN, "--init", "none", "--global-batch-size", "4", "--max-steps", "4", "--log-every", "1",
                    "--ckpt-every", "2", "--run-dir", tmp_path / "run")
    assert out["step"] == 4 and sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["0000002.pt", "0000004.pt"]
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "log.jsonl" in warned[0], warned


def test_a_checkpoint_that_does_not_fit_ends_the_run_in_one_line_keeping_the_last_good_one(tmp_path, monkeypatch,
                                                                                          capsys):
    real_save, saves = torch.save, []

    def second_save_finds_the_disk_full(obj, f, *args, **kwargs):
        saves.append(f)
        with file_size_limit(4096) if len(saves) == 2 else contextlib.nullcontext():
            return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", second_save_finds_the_disk_full)
    proc = run_main(train, *TINY_TRAIN, "--init", "none", "--global-batch-size", "4", "--max-steps", "6",
                    "--ckpt-every", "2", "--run-dir", tmp_path, capsys=capsys)
    good, full = (tmp_path / "checkpoints" / f"{step:07d}.pt" for step in (2, 4))
    assert proc.returncode == 1 and error_lines(proc) == [
        f"error: disk full writing {full}; last good checkpoint: {good}; nothing else lost; free some space and "
        "resume from it"]
    assert os.listdir(tmp_path / "checkpoints") == ["0000002.pt"]           # no half-written file
    assert torch.load(good, weights_only=True)["step"] == 2


def test_a_first_checkpoint_that_does_not_fit_says_the_steps_are_lost(tmp_path, capsys):
    with file_size_limit(4096):
        proc = run_main(train, *TINY_TRAIN, "--init", "none", "--global-batch-size", "4", "--max-steps", "2",
                        "--run-dir", tmp_path, capsys=capsys)
    assert proc.returncode == 1 and error_lines(proc) == [
        f"error: disk full writing {tmp_path / 'checkpoints' / '0000002.pt'}, the run's first checkpoint: its 2 "
        "steps are lost; free some space and start again"]
    assert os.listdir(tmp_path / "checkpoints") == []


def test_a_latent_cache_that_does_not_fit_fails_at_once_in_one_line(tmp_path, capsys):
    write_tiny_vae(tmp_path / "vae")
    with file_size_limit(64 * 1024):                 # the 4096 toy images' moments need 256 KiB
        proc = run_main(data, "cache", "--data", "toy", "--image-size", "16", "--vae", tmp_path / "vae", "--out",
                        tmp_path / "cache", "--num-workers", "0", capsys=capsys)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: disk full writing {tmp_path / 'cache' / 'moments.npy'} (File too large)"
    assert os.listdir(tmp_path / "cache") == []


@pytest.mark.parametrize("script", ["sample", "generate"])
def test_a_full_disk_while_writing_samples_is_one_error_line(script, tmp_path, capsys):
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "out"
    write_our_checkpoint(ckpt)
    command = {"sample": [sample_module, "--ckpt", ckpt, "--class-id", "1", "--num-samples", "1", "--steps", "2",
                          "--out", out / "grid.png"],
               "generate": [evaluate, "generate", "--ckpt", ckpt, "--out", out, "--per-class", "1", "--steps", "2",
                            "--device", "cpu"]}[script]
    with file_size_limit(100):
        proc = run_main(*command, capsys=capsys)
    errors = error_lines(proc)
    assert proc.returncode == 1 and len(errors) == 1 and errors[0].startswith(f"error: disk full writing {out}")


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("start", ["train", "cache", "generate"])
def test_temp_files_of_dead_writers_are_removed_at_the_next_start_and_nothing_else(start, tmp_path):
    dead, alive = dead_pid(), os.getpid()
    folder, names = {"train": ("run/checkpoints", [f".0000002.pt.finediffusion-tmp{dead}",
                                                   f".0000003.pt.finediffusion-tmp{alive}"]),
                     "cache": ("cache", [f".labels.npy.finediffusion-tmp{dead}"]),
                     "generate": ("gen/00001", [f".000000.png.finediffusion-tmp{dead}"])}[start]
    users = ["experiment.tmp4000000", "results.tmp4000001.npy", f".notes.tmp{dead}"]   # a user's, whatever they look like
    os.makedirs(tmp_path / folder)
    for name in names + users:
        (tmp_path / folder / name).write_bytes(b"half a file")
    if start == "train":
        run_train(*TINY_TRAIN, "--init", "none", "--global-batch-size", "4", "--max-steps", "1", "--run-dir",
                  tmp_path / "run")
    elif start == "cache":
        data.build_latent_cache(small_toy(), StandInVAE(), str(tmp_path / "cache"), num_workers=0, progress=False)
    else:
        write_our_checkpoint(tmp_path / "ckpt.pt")
        evaluate.main(["generate", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "gen"), "--per-class",
                       "1", "--steps", "2", "--device", "cpu"])
    left = {name for name in os.listdir(tmp_path / folder) if "tmp" in name}
    assert left == {name for name in names if name.endswith(f"tmp{alive}")} | set(users)   # a live writer's stays


@pytest.mark.parametrize("vae_config, says", [(dict(block_out_channels=(32, 32)), "2x smaller"),
                                              (dict(latent_channels=8), "8-channel")])
def test_sampling_refuses_a_vae_that_does_not_fit_the_dit_before_any_step(vae_config, says, tmp_path, capsys):
    torch.save(DiT_models["DiT-T/4"](input_size=8, num_classes=10).state_dict(), tmp_path / "dit.pt")   # 64 px
    write_tiny_vae(tmp_path / "vae", **vae_config)
    proc = run_main(sample_module, "--ckpt", tmp_path / "dit.pt", "--vae", tmp_path / "vae", "--class-id", "3",
                    "--guidance", "null", "--steps", "2", "--out", tmp_path / "s.png", capsys=capsys)
    assert_one_line_error(proc, "does not fit", says, "64 px")
    assert not os.path.exists(tmp_path / "s.png")


def test_training_refuses_a_vae_that_does_not_fit_the_dit_before_any_step(tmp_path):
    torch.save(DiT_models["DiT-T/2"](input_size=4, num_classes=4).state_dict(), tmp_path / "latent-base.pt")
    write_tiny_vae(tmp_path / "vae", block_out_channels=(32, 32))
    with pytest.raises(UserError, match="does not fit this DiT.*2x smaller"):
        run_train("--data", "toy", "--init", tmp_path / "latent-base.pt", "--vae", tmp_path / "vae",
                  "--global-batch-size", "4", "--max-steps", "1", "--num-workers", "0", "--run-dir", tmp_path / "run")
    assert not os.path.exists(tmp_path / "run")                            # refused: no empty run folder


def test_sampling_with_another_vae_than_the_recorded_one_warns_in_one_line(tmp_path, capsys):
    dit, trained_with = latent_dit_and_vae(tmp_path)
    other = tmp_path / "other-vae"
    write_tiny_vae(other, seed=1)
    state = torch.load(dit, weights_only=True)
    config = dict(name="DiT-T/2", image_size=16, num_classes=4, num_superclasses=0, method="full", pixel_space=False)
    model_module.save_checkpoint(tmp_path / "ours.pt", model=state, ema=state, base=None, config=config,
                                 hierarchy=None, vae=AutoencoderKL.from_pretrained(trained_with).identity(), step=1,
                                 args=dict(vae=str(trained_with)))
    argv = ["--ckpt", tmp_path / "ours.pt", "--class-id", "1", "--guidance", "null", "--num-samples", "1", "--steps", "2",
            "--out", tmp_path / "s.png"]
    warned = lambda proc: [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    same, other_one = (run_main(sample_module, *argv, *vae, capsys=capsys) for vae in ([], ["--vae", other]))
    assert same.returncode == other_one.returncode == 0 and warned(same) == []
    assert len(warned(other_one)) == 1 and str(other) in warned(other_one)[0]


def test_the_toy_classifier_is_the_same_in_every_clone_whatever_ran_before(tmp_path, monkeypatch):
    monkeypatch.setattr(toy_module, "ToyDataset", functools.partial(toy_module.ToyDataset, images_per_class=4))
    nets = []
    for seed in (1, 2):
        torch.manual_seed(seed)                       # the global RNG state the caller happens to leave
        nets.append(toy_module.toy_classifier(16, str(tmp_path / str(seed)), epochs=1).state_dict())
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])
    torch.manual_seed(2)
    expected = torch.rand(1)
    torch.manual_seed(2)
    toy_module.toy_classifier(16, str(tmp_path / "3"), epochs=1)
    assert torch.equal(torch.rand(1), expected)       # and the caller's RNG stream is left as it was


def test_a_corrupt_cached_toy_classifier_is_trained_again(tmp_path, monkeypatch):
    monkeypatch.setattr(toy_module, "ToyDataset", functools.partial(toy_module.ToyDataset, images_per_class=4))
    (tmp_path / "toy_classifier_16px.pt").write_bytes(b"cut short by a full disk")
    assert isinstance(toy_module.toy_classifier(16, str(tmp_path), epochs=1), toy_module.ToyClassifier)
    hardening.load_strict(toy_module.ToyClassifier(32), torch.load(tmp_path / "toy_classifier_16px.pt"), "cache")


def test_a_moved_base_is_asked_for_with_the_flag_each_script_has(tmp_path, base_ckpt, capsys):
    base = shutil.copy(base_ckpt, tmp_path / "base.pt")
    ckpt = run_train(*TINY_TRAIN, "--init", base, "--global-batch-size", "4", "--max-steps", "1",
                     "--run-dir", tmp_path / "run")["final_ckpt"]
    os.rename(base, tmp_path / "moved.pt")
    resumed = run_main(train, "--resume", ckpt, "--max-steps", "2", capsys=capsys)
    assert_one_line_error(resumed, "base.pt", "with --init")
    assert "--base" not in resumed.stderr                                 # train.py has no --base
    assert_one_line_error(run_main(sample_module, "--ckpt", ckpt, "--class-id", "1", capsys=capsys), "with --base")


def test_the_log_holds_each_step_once_after_resuming_from_an_older_checkpoint(tmp_path):
    run_train(*TINY_TRAIN, "--init", "none", "--global-batch-size", "4", "--max-steps", "4", "--log-every", "1",
              "--ckpt-every", "2", "--run-dir", tmp_path)
    run_train("--resume", tmp_path / "checkpoints" / "0000002.pt", "--max-steps", "4")
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1, 2, 3, 4]


def test_all_images_unreadable_with_dataloader_workers_is_one_error_line(tmp_path):
    for k in range(4):
        os.makedirs(tmp_path / "images" / "plants" / "oak", exist_ok=True)
        (tmp_path / "images" / "plants" / "oak" / f"{k}.jpg").write_bytes(b"not a jpeg")
    write_tiny_vae(tmp_path / "vae")
    # a script of its own: in this process, the failed DataLoader's workers would take seconds to be collected
    proc = run_script("train.py", "--data", "folder", "--data-path", tmp_path / "images", "--vae", tmp_path / "vae",
                      "--init", "none", "--model", "DiT-T/4", "--image-size", "32", "--num-workers", "2",
                      "--global-batch-size", "2", "--run-dir", tmp_path / "run")
    assert proc.returncode == 2 and error_lines(proc) == [f"error: no readable image under {tmp_path / 'images'}"]


def test_fp16_training_on_a_cpu_resumes_bit_for_bit_with_its_loss_scale(tmp_path):
    common = [*TINY_TRAIN, "--init", "none", "--global-batch-size", "4", "--precision", "fp16", "--ckpt-every", "2"]
    straight = run_train(*common, "--max-steps", "4", "--run-dir", tmp_path / "straight")
    first = run_train(*common, "--max-steps", "2", "--run-dir", tmp_path / "split")
    second = run_train("--resume", first["final_ckpt"], "--max-steps", "4")
    assert all(map(math.isfinite, straight["losses"])) and straight["losses"] == first["losses"] + second["losses"]
    a, b = (torch.load(r["final_ckpt"], weights_only=True) for r in (straight, second))
    assert a["train"]["scaler"] == b["train"]["scaler"] and a["train"]["scaler"]["_growth_tracker"] == 4
    assert tensors_equal(a["model"], b["model"]) and tensors_equal(a["ema"], b["ema"])


def test_sample_script_runs_in_fp16_on_a_cpu(tmp_path, capsys):
    write_our_checkpoint(tmp_path / "ckpt.pt")
    proc = run_main(sample_module, "--ckpt", tmp_path / "ckpt.pt", "--class-id", "1", "--num-samples", "1", "--steps",
                    "2", "--precision", "fp16", "--device", "cpu", "--out", tmp_path / "s.png", capsys=capsys)
    assert proc.returncode == 0 and png_size(tmp_path / "s.png") == (128, 128)                   # 16 px shown 8x


def test_the_designs_sample_command_runs_as_written_with_the_authors_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    authors = randomize(DiT_models["DiT-T/2"](input_size=2, num_classes=10000, num_superclasses=11, null_class=False,
                                              norm_affine=True))         # 10,000 + 11 rows: the authors' table
    os.makedirs("pretrained")
    torch.save({"model": authors.state_dict(), "ema": authors.state_dict(), "opt": {},
                "args": argparse.Namespace(model="DiT-T/2")}, "pretrained/FineDiffusion-iNat.pt")
    write_tiny_vae("pretrained/sd-vae-ft-mse")                             # the authors' sample.py's VAE
    proc = run_main(sample_module, "--class-id", "4021", capsys=capsys)    # python sample.py --class-id 4021
    assert proc.returncode == 0, proc.stderr
    assert "class 4021 (04021), guided by superclass row 10002 (Birds)" in proc.stderr
    assert "from pretrained/FineDiffusion-iNat.pt" in proc.stderr
    assert png_size("samples/sample.png") == (4 * 128 + 5 * 2, 2 * 128 + 3 * 2)   # 8 samples, 4 a row, 16 px shown 8x


def test_without_a_ckpt_the_newest_run_under_results_comes_before_the_authors_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in ("pretrained/FineDiffusion-iNat.pt", "results/000-run/checkpoints/0000001.pt"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()
    assert hardening.resolve_checkpoint() == os.path.join("results", "000-run", "checkpoints", "0000001.pt")


def test_the_designs_train_command_names_each_missing_file_where_it_looked_and_where_it_is_published(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    command = ["--data", "inat21"]                    # torchrun --nproc_per_node=8 train.py --data inat21
    assert_one_line_error(run_main(train, *command, capsys=capsys), "data/inat21", "github.com/visipedia/inat_comp")
    make_inat21("data/inat21")
    assert_one_line_error(run_main(train, *command, capsys=capsys), "looked in DiT-XL-2-256x256.pt, "
                          "pretrained/DiT-XL-2-256x256.pt", "https://dl.fbaipublicfiles.com/DiT/models/")
    os.makedirs("pretrained")               # a small stand-in for DiT-XL/2 under the published name
    torch.save(DiT_models["DiT-T/2"](input_size=2, num_classes=1000).state_dict(), "pretrained/DiT-XL-2-256x256.pt")
    assert_one_line_error(run_main(train, *command, capsys=capsys), "looked in sd-vae-ft-ema, pretrained/sd-vae-ft-ema",
                          "https://huggingface.co/stabilityai/sd-vae-ft-ema")
    write_tiny_vae("pretrained/sd-vae-ft-ema")
    proc = run_main(train, *command, "--max-steps", "1", "--global-batch-size", "2", "--num-workers", "0", capsys=capsys)
    assert proc.returncode == 0 and glob.glob("results/000-DiT-T-2-finediffusion/checkpoints/0000001.pt"), proc.stderr


def test_under_torchrun_a_user_error_found_by_rank_0_stops_every_rank_and_is_said_once(tmp_path):
    lock = hardening.lock_folder(str(tmp_path / "run"))       # this process holds the run folder: only rank 0 can tell
    try:
        proc = run_script("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                          os.path.join(HERE, "train.py"), *TINY_TRAIN, "--init", "none", "--global-batch-size", "4",
                          "--max-steps", "2", "--run-dir", tmp_path / "run")
    finally:
        lock.close()
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and f"in use by another training run (pid {os.getpid()} on" in ours[0], proc.stderr
    # torchrun's own summary follows (its traceback, then one entry per rank): the first rank to finish exited 2,
    # the other exited 2 as well or was stopped by the SIGTERM with which torchrun ends the group
    codes = re.findall(r"exitcode  : (-?\d+)", proc.stderr)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, proc.stderr[-3000:]
    assert not os.listdir(tmp_path / "run" / "checkpoints")


# ------------------------------------------------------------------------------------------------------------
# bench.py and the README's quickstart
# ------------------------------------------------------------------------------------------------------------

SMALL_BENCH = ["--model", "DiT-T/4", "--image-size", 64, "--batch", 4, "--sample-batches", 2, 4, "--repeats", 2,
               "--warmup", 1, "--loop-repeats", 1]


def test_bench_emits_json_with_every_figure(tmp_path):
    proc = run_script("bench.py", *SMALL_BENCH, "--out", tmp_path / "bench.json")
    assert proc.returncode == 0, proc.stderr
    result = json.load(open(tmp_path / "bench.json"))
    assert set(result["train"]) == {"full", "bitfit", "difffit", "finediffusion"}
    for r in result["train"].values():
        assert {"seconds_per_step", "peak_memory_mb", "speedup_vs_full", "memory_vs_full"} <= r.keys()
        assert r["seconds_per_step"] > 0
    assert {"cache_images_per_s", "vae_images_per_s", "cache_speedup"} <= result["data"].keys()
    assert {"seconds_per_ddpm_step", "ddpm250_seconds", "ddim50_seconds", "ddim50_speedup", "dpm20_seconds",
            "dpm20_speedup"} <= result["sampling"].keys()
    assert set(result["sampling"]["seconds_per_ddpm_step"]) == {"2", "4"}
    assert result["fid"]["images_per_s"] > 0
    assert result["decode"]["fp32_seconds_per_image"] > 0 and result["decode"]["precision"] == "fp32"
    assert "speed-up" in proc.stdout and "SD VAE decode, s per image" in proc.stdout
    assert "memory" not in result                                          # an hour at Table 1's counts: when named


def test_bench_memory_measures_evaluate_fid_of_each_count_in_a_process_of_its_own(tmp_path):
    """Run alone, a part writes its own file: the whole run's results/bench.json is left as it is."""
    os.makedirs(tmp_path / "results")
    (tmp_path / "results" / "bench.json").write_text("{}")
    proc = run_script(os.path.join(HERE, "bench.py"), "--only", "memory", "--memory-images", 10, 20, "--image-size",
                      32, "--batch", 10, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "results" / "bench.json").read_text() == "{}"
    memory = json.load(open(tmp_path / "results" / "bench-memory.json"))["memory"]
    assert set(memory["peak_rss_mb"]) == {"10", "20"} and min(memory["peak_rss_mb"].values()) > 100  # torch alone
    assert memory["image_kb"] == 3 and "evaluate.py fid --fake X.npz (32 px), peak MiB: 10 images" in proc.stdout


def test_bench_projects_each_samplers_cost_with_and_without_a_guidance_interval(tmp_path):
    proc = run_script("bench.py", *SMALL_BENCH, "--only", "samplers", "--out", tmp_path / "bench.json")
    assert proc.returncode == 0, proc.stderr
    s = json.load(open(tmp_path / "bench.json"))["samplers"]
    runs = {(r["sampler"], r["steps"], r["guidance_interval"] is not None): r for r in s["runs"]}
    assert set(runs) == {(name, steps, interval) for name, steps in [("ddpm", 250), ("ddim", 50), ("dpm++2m", 10),
                         ("dpm++2m", 15), ("dpm++2m", 20), ("dpm++2m", 25)] for interval in (False, True)}
    ddpm = runs["ddpm", 250, False]
    assert ddpm["evaluations_per_image"] == 500 and ddpm["speedup_vs_ddpm250"] == 1.0    # the paper's 2 x 250
    dpm = runs["dpm++2m", 20, True]                 # [200, 700] holds 11 of its 20 steps (699, 649, ..., 200)
    assert (dpm["guided_steps"], dpm["evaluations_per_image"]) == (11, 2 * 11 + 9)
    for r in s["runs"]:
        assert r["seconds_per_image"] > 0
        assert r["hours_per_100k"] == pytest.approx(r["seconds_per_image"] * 100_000 / 3600)
        assert r["speedup_vs_ddpm250"] == pytest.approx(ddpm["seconds_per_image"] / r["seconds_per_image"])
    assert "h per 100K" in proc.stdout and "not run end to end" in proc.stdout


# bench.py --gpu-check: the GPU itself is not here, so what runs around it is tested on a CPU

def test_gpu_check_without_cuda_says_it_needs_a_gpu_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)     # so on a GPU machine as well
    proc = run_main(bench, "--gpu-check", capsys=capsys)
    assert_one_line_error(proc, "--gpu-check needs a CUDA GPU (none is visible here)")
    assert proc.stdout == "" and os.listdir(tmp_path) == []


def test_gpu_check_counts_model_flops_from_the_dit_papers_118_6_gflops_as_multiply_adds():
    forward = gpu_check.GPU_CHECK["forward_flops"]
    assert forward == 2 * 118.6e9                        # DiT paper Table 4, DiT-XL/2 at 256 px: 118.6 G multiply-adds
    with torch.device("meta"):                           # torch's own count: a multiply-add is 2 FLOPs
        dit = DiT_models["DiT-XL/2"](input_size=32)
        with FlopCounterMode(display=False) as counter:
            dit(torch.randn(1, 4, 32, 32), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert counter.get_total_flops() == pytest.approx(forward, rel=1e-3)
    # a step: forward + backward, 2x the forward for full fine-tuning, 1x for FineDiffusion
    assert gpu_check.step_flops("full", 256, forward) == pytest.approx(256 * 3 * 237.2e9)      # 182.2 PFLOP
    assert gpu_check.step_flops("finediffusion", 256, forward) == pytest.approx(256 * 2 * 237.2e9)
    run = dict(method="finediffusion", batch=256, seconds_per_step=0.5)
    figures = gpu_check.throughput(run, forward, peak=989)
    assert figures["images_per_s"] == 512
    assert figures["tflops"] == pytest.approx(121.4464 / 0.5)                               # 242.9 TFLOP/s
    assert figures["mfu"] == pytest.approx(242.8928 / 989)                                  # 24.6%
    assert gpu_check.throughput(run, forward, peak=None)["mfu"] is None


@pytest.mark.parametrize("gpu, peak", [("NVIDIA H100 80GB HBM3, 80 GiB", 989), ("NVIDIA H100 PCIe, 80 GiB", 756),
                                       ("NVIDIA H200, 140 GiB", 989), ("NVIDIA A100-SXM4-80GB, 80 GiB", 312),
                                       ("NVIDIA L4, 22 GiB", 121), ("NVIDIA L40S, 45 GiB", None),
                                       ("NVIDIA GeForce RTX 4090, 24 GiB", 165), ("Tesla T4, 15 GiB", None), (None, None)])
def test_gpu_check_takes_the_peak_from_the_datasheet_of_the_gpu_it_names(gpu, peak):
    assert gpu_check.peak_tflops(gpu) == peak
    assert gpu_check.peak_tflops(gpu, given=500.0) == 500.0                                      # --peak-tflops


def test_gpu_check_batch_search_doubles_until_a_batch_runs_out_of_memory():
    def fits_up_to(limit):
        def step(batch):
            if batch > limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return lambda batch: gpu_check.fits_in_memory(step, batch)

    assert gpu_check.largest_batch(fits_up_to(300), 32, 2048) == (256, [[32, True], [64, True], [128, True], [256, True],
                                                                    [512, False]])
    assert gpu_check.largest_batch(fits_up_to(10 ** 6), 32, 128) == (128, [[32, True], [64, True], [128, True]])  # the cap
    assert gpu_check.largest_batch(fits_up_to(20), 32, 2048) == (16, [[32, False], [16, True]])   # 32 too large: halves
    assert gpu_check.largest_batch(fits_up_to(0), 4, 2048) == (None, [[4, False], [2, False], [1, False]])

    def broken(batch):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match="illegal memory access"):         # only running out of memory is "no fit"
        gpu_check.fits_in_memory(broken, 32)


def test_gpu_check_fails_a_measurement_whose_loss_is_not_finite():
    assert bench.read_losses([torch.tensor(0.25), torch.tensor(0.125)]) == [0.25, 0.125]
    with pytest.raises(hardening.RunFailed, match="loss is nan at step 2 of 3"):
        bench.read_losses([torch.tensor(0.25), torch.tensor(float("nan")), torch.tensor(0.125)])
    with pytest.raises(hardening.RunFailed, match="loss is inf at step 1 of 1"):
        bench.read_losses([torch.tensor(float("inf"), dtype=torch.float16)])


def gpu_check_results(gpu="NVIDIA H100 80GB HBM3, 80 GiB"):
    """What --gpu-check records, as it would on an H100: some parts done, one failed, others not reached."""
    plan = gpu_check.GPU_CHECK
    done = dict(method="finediffusion", precision="bf16", compile=False, batch=256, seconds_per_step=0.5,
                peak_memory_mb=61440, losses=[0.2, 0.1553])
    done.update(gpu_check.throughput(done, plan["forward_flops"], gpu_check.peak_tflops(gpu)))
    return dict(check="gpu", device="cuda", gpu=gpu, torch="2.5.1", plan=plan, peak_tflops=None, seconds=412.0,
                search={"finediffusion": dict(batch=256, tried=[[32, True], [64, True], [128, True], [256, True],
                                                                [512, False]]),
                        "full": dict(error="the full batch search failed: CUDA error: unspecified launch failure")},
                runs=[done, dict(method="full", precision="bf16", compile=False, batch=None,
                                 skipped="no batch: its search did not finish"),
                      dict(method="finediffusion", precision="bf16", compile=True, batch=256,
                           skipped="the time budget was spent")],
                sample=dict(seconds=0.71, first_seconds=4.2, sampler="dpm++2m", steps=20, cfg_scale=4.0,
                            precision="bf16", shape=[1, 256, 256, 3]),
                ddp=dict(skipped="1 GPU visible, the test needs 2"))


def test_gpu_check_table_reads_its_figures_from_the_results():
    table = gpu_check.gpu_check_report(gpu_check_results()).splitlines()
    assert table[0].startswith("gpu-check on NVIDIA H100 80GB HBM3, 80 GiB, torch 2.5.1, 412 s: DiT-XL/2 at 256 px")
    assert "a forward pass is 237.2 GFLOP an image" in table[1] and "MFU against 989 TFLOP/s (datasheet" in table[1]
    rows = [line.split() for line in table if line.startswith("  finediffusion") or line.startswith("  full")]
    assert rows[0] == ["finediffusion", "bf16", "off", "256", "0.500", "512.0", "60.0", "242.9", "24.6%", "0.1553"]
    assert rows[1][:4] == ["full", "bf16", "off", "-"] and "skipped: no batch" in " ".join(rows[1])
    assert rows[2][:4] == ["finediffusion", "bf16", "on", "256"] and "skipped: the time budget" in " ".join(rows[2])
    text = "\n".join(table)
    assert "largest batch of finediffusion: 256 (tried 32, 64, 128, 256, 512 out of memory)" in text
    assert "largest batch of full: the full batch search failed: CUDA error: unspecified launch failure" in text
    assert ("sampling: one 256x256 image, fine-grained guidance 4, DPM-Solver++(2M) in 20 steps, SD VAE decode, "
            "bf16: 0.71 s (4.20 s the first time)") in text
    assert table[-1] == "DDP smoke test: skipped: 1 GPU visible, the test needs 2"
    unknown = gpu_check.gpu_check_report(gpu_check_results(gpu="Tesla T4, 15 GiB"))
    assert "peak unknown for this GPU (give --peak-tflops)" in unknown and "      ?" in unknown


def test_gpu_check_runs_out_of_time_part_by_part_and_keeps_a_table_and_json(tmp_path, monkeypatch, capsys):
    def no_worker(*args, **kwargs):
        raise AssertionError("a worker started after the budget was spent")
    monkeypatch.setattr(gpu_check, "run_worker", no_worker)
    args = gpu_check.parse_args(["--out", str(tmp_path / "gpu.json")])
    gpu_check.gpu_check(args, {**gpu_check.GPU_CHECK, "budget_seconds": 0})
    out, err = capsys.readouterr()
    saved = json.load(open(tmp_path / "gpu.json"))
    assert all(s == {"skipped": "the time budget was spent"} for s in saved["search"].values())
    assert len(saved["runs"]) == 6 and all("skipped" in r for r in saved["runs"])
    assert "skipped" in saved["sample"] and "skipped" in saved["ddp"]
    assert len(err.strip().splitlines()) == 1 + 2 + 6 + 2               # the plan, then a line per part
    assert out.count("skipped: ") == 6 + 2 + 2 and f"wrote {tmp_path / 'gpu.json'}" in out


def test_a_worker_past_its_time_is_stopped_with_the_processes_it_started(tmp_path):
    """A DDP smoke test that would run for hours, under torchrun: at its time limit torchrun and both its ranks
    (which run in sessions of their own) are gone, and the limit is said in one line."""
    marker = str(tmp_path / "marker")                         # in the command line of torchrun and of its ranks
    seen, stop = [], threading.Event()

    def watch():                                              # how many of them run, every 0.2 s
        while not stop.wait(0.2):
            seen.append(len(processes_naming(marker)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(UserError, match="the DDP smoke test was stopped after 20 s, when the time budget ran out"):
            bench.run_worker("the DDP smoke test", ["--worker", "ddp", "--method", "finediffusion", "--model", "DiT-T/4",
                                                    "--image-size", "32", "--device", "cpu", "--precision", "fp32",
                                                    "--batch", "2", "--repeats", "1000000", "--out", marker],
                             timeout=20, launcher=gpu_check.TORCHRUN_2, script=gpu_check.ME)
    finally:
        stop.set()
        watcher.join()
        left = processes_naming(marker)
        for pid in left:                                      # so a failure leaves no ranks running for hours
            os.kill(int(pid), signal.SIGKILL)
    assert max(seen) == 3                                     # torchrun and its 2 ranks were running
    assert left == []


def processes_naming(text):
    """Pids of this machine's processes whose command line holds `text`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if text in f.read().decode(errors="replace"):
                found.append(pid)
    return found


def test_gpu_check_rehearsed_on_a_cpu_runs_every_part_and_records_it(tmp_path, monkeypatch, capsys):
    """The whole check with a tiny DiT on a CPU: the workers' command lines, their figures, the table and the
    JSON. Workers run in this process (seconds, not a start-up each) except DDP: 2 processes under torchrun, gloo."""
    real_run_worker = bench.run_worker

    def in_process(what, argv, timeout=None, launcher=(), script=None):
        if launcher:
            return real_run_worker(what, argv, timeout, launcher, script)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            (bench if script == bench.__file__ else gpu_check).main([str(a) for a in argv])
        return json.loads(printed.getvalue().strip().splitlines()[-1])

    monkeypatch.setattr(gpu_check, "run_worker", in_process)
    monkeypatch.setattr(gpu_check, "AutoencoderKL", functools.partial(AutoencoderKL, block_out_channels=(32, 32, 32, 32),
                                                                      layers_per_block=1))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan = {**gpu_check.GPU_CHECK, "model": "DiT-T/4", "image_size": 32, "first_batch": 2, "max_batch": 4,
            "repeats": 1, "warmup": 1, "fp16_steps": 3, "compile": False, "ddp_batch": 2, "budget_seconds": 300}
    args = gpu_check.parse_args(["--out", str(tmp_path / "gpu.json")])
    results = gpu_check.gpu_check(args, plan)
    out, err = capsys.readouterr()
    assert json.load(open(tmp_path / "gpu.json")) == json.loads(json.dumps(results))
    for method in ("finediffusion", "full"):
        assert results["search"][method] == dict(batch=4, tried=[[2, True], [4, True]])
    runs = [(r["method"], r["precision"], r["batch"], len(r["losses"])) for r in results["runs"]]
    assert runs == [("finediffusion", "bf16", 4, 2), ("full", "bf16", 4, 2), ("finediffusion", "fp16", 4, 3),
                    ("full", "fp16", 4, 3)]
    for r in results["runs"]:
        assert r["seconds_per_step"] > 0 and all(math.isfinite(loss) for loss in r["losses"])
        assert r["tflops"] == pytest.approx(gpu_check.step_flops(r["method"], 4, plan["forward_flops"])
                                            / r["seconds_per_step"] / 1e12)
        assert r["mfu"] is None                                   # a CPU has no datasheet peak
    assert results["sample"]["shape"] == [1, 32, 32, 3] and results["sample"]["seconds"] > 0
    ddp = results["ddp"]
    assert (ddp["processes"], ddp["backend"], ddp["steps"], ddp["ok"]) == (2, "gloo", 2, True)
    assert ddp["weight_spread"] == 0 and ddp["input_spread"] > 0 and ddp["moved"] > 0
    assert "DDP smoke test: 2 processes (gloo)" in out and ": ok" in out
    assert len(err.strip().splitlines()) == 1 + 2 + 4 + 2


def readme_quickstart():
    """The commands of the README's quickstart block."""
    text = open(os.path.join(HERE, "README.md")).read()
    block = text.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split() for line in block.strip().splitlines() if line.strip() and not line.startswith("#")]


def test_readme_quickstart_is_two_commands_without_tuning_flags_and_runs_from_any_folder(tmp_path):
    commands = readme_quickstart()
    assert [c[:3] for c in commands] == [["python", "train.py", "--data"], ["python", "sample.py", "--class-id"]]
    assert [len(c) for c in commands] == [4, 4]
    fewer = {"train.py": ["--max-steps", "2", "--global-batch-size", "4"], "sample.py": ["--steps", "2", "--num-samples", "2"]}
    for words in commands:
        proc = run_script(os.path.join(HERE, words[1]), *words[2:], *fewer[words[1]], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "Warning" not in proc.stderr, proc.stderr[-2000:]  # e.g. more DataLoader workers than cores
    assert len(glob.glob(str(tmp_path / "results" / "**" / "checkpoints" / "*.pt"), recursive=True)) == 1
    assert png_size(tmp_path / "samples" / "sample.png")[0] >= 128   # enlarged so a person can see it


# ------------------------------------------------------------------------------------------------------------
# The shipped toy base: the toy world's DiT-XL-2-256x256.pt
# ------------------------------------------------------------------------------------------------------------

def test_the_shipped_toy_base_is_a_small_weights_only_file_with_the_recorded_sha256():
    assert os.path.getsize(train.TOY_BASE) <= 20 * 2 ** 20
    assert hashlib.sha256(open(train.TOY_BASE, "rb").read()).hexdigest() == train.TOY_BASE_SHA256
    torch.load(train.TOY_BASE, map_location="cpu", weights_only=True)


def test_the_shipped_toy_base_is_a_dit_of_the_base_sets_classes_at_32_px():
    base, info = load_model(train.TOY_BASE)
    assert (info["config"]["name"], info["config"]["image_size"]) == ("DiT-T/4", 32)
    assert info["config"]["num_classes"] == toy_module.toy_dataset("toy-base").num_classes == 64
    assert base.y_embedder.null_class and base.y_embedder.num_superclasses == 0   # trained as DiT is: a null row


def test_train_on_the_toy_with_no_other_flags_fine_tunes_the_shipped_base_with_finediffusion(tmp_path):
    out = run_train("--data", "toy", "--max-steps", "1", "--global-batch-size", "4", "--num-workers", "0",
                    "--run-dir", tmp_path / "run")
    ckpt = torch.load(out["final_ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["config"]["method"] == "finediffusion"
    assert os.path.samefile(ckpt["base"]["path"], train.TOY_BASE)
    assert (ckpt["args"]["lr"], ckpt["args"]["ema_decay"]) == (1e-2, 0.995)    # the toy's recipe, not the paper's
    tuned, _ = load_model(out["final_ckpt"])
    base = torch.load(train.TOY_BASE, map_location="cpu", weights_only=True)
    frozen = "blocks.0.attn.qkv.weight"                                       # a weight FineDiffusion never tunes
    assert torch.equal(tuned.state_dict()[frozen], base["ema"][frozen])


def test_a_changed_toy_base_is_refused_with_how_to_restore_it(tmp_path, monkeypatch, capsys):
    changed = tmp_path / "DiT-T-4-toy-base.pt"
    ckpt = torch.load(train.TOY_BASE, map_location="cpu", weights_only=True)
    ckpt["ema"]["final_layer.linear.bias"] += 1
    torch.save(ckpt, changed)
    monkeypatch.setattr(train, "TOY_BASE", str(changed))
    proc = run_main(train, "--data", "toy", "--init", changed, "--max-steps", "1", "--run-dir", tmp_path / "r",
                    capsys=capsys)
    assert_one_line_error(proc, "not the toy base this repository shipped", "git checkout")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------------------
# Inputs from the field: hostile and damaged files, races, the formats users bring
# ------------------------------------------------------------------------------------------------------------

def edited_safetensors(path, edit):
    """Rewrite a .safetensors file's JSON header with edit(header) (the data bytes stay as they are)."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = edit(json.loads(raw[8:8 + n]))
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + raw[8 + n:])


def entries(header):
    return {k: v for k, v in header.items() if k != "__metadata__"}


def shifted(header, by):
    for info in entries(header).values():
        info["data_offsets"] = [o + by for o in info["data_offsets"]]
    return header


def all_on_the_first_bytes(header):
    spans = [info["data_offsets"] for info in entries(header).values()]
    first = {}
    for info in entries(header).values():   # every tensor of one size onto the first tensor of that size
        size = info["data_offsets"][1] - info["data_offsets"][0]
        info["data_offsets"] = first.setdefault(size, info["data_offsets"])
    assert len(set(map(tuple, spans))) > len(set(map(tuple, (i["data_offsets"] for i in entries(header).values()))))
    return header


def first_entry(change):
    def edit(header):
        name = sorted(entries(header))[0]
        change(header[name])
        return header
    return edit


HOSTILE_HEADERS = {
    "offsets into the header": first_entry(lambda info: info.update(data_offsets=[-3464, -8])),
    "same-size tensors on the same bytes": all_on_the_first_bytes,
    "offsets shifted by one byte": lambda header: shifted(header, 1),
    "no dtype": first_entry(lambda info: info.pop("dtype")),
    "float offsets": first_entry(lambda info: info.update(data_offsets=[float(o) for o in info["data_offsets"]])),
    "three offsets": first_entry(lambda info: info.update(data_offsets=info["data_offsets"] + [0])),
    "a negative shape": first_entry(lambda info: info.update(shape=[-1] + info["shape"][1:])),
    "a string shape": first_entry(lambda info: info.update(shape=[str(s) for s in info["shape"]])),
    "a header that is a list": lambda header: [header],
}


def sample_with_vae(vae_folder):
    """python sample.py on an official-layout latent DiT, decoded by the given VAE."""
    torch.save(DiT_models["DiT-T/4"](input_size=8, num_classes=10).state_dict(), "dit.pt")
    return sample_module, ["--ckpt", "dit.pt", "--vae", vae_folder, "--class-id", "3", "--guidance", "null",
                           "--steps", "2", "--out", "s.png"]


def hostile_vae(edit):
    def make():
        write_tiny_vae("vae")
        edited_safetensors("vae/diffusion_pytorch_model.safetensors", edit)
        return sample_with_vae("vae")
    return make


def damaged_bytes(path):
    """4 KB of a checkpoint's tensor data overwritten, as a bad disk or an interrupted copy leaves it."""
    raw = bytearray(open(path, "rb").read())
    middle = len(raw) // 2
    raw[middle:middle + 4096] = bytes(4096)[:len(raw[middle:middle + 4096])]
    raw[middle:middle + 4096] = bytes((b + 1) % 256 for b in raw[middle:middle + 4096])
    open(path, "wb").write(bytes(raw))


def damaged_checkpoint(flag):
    def make():
        if flag == "--ckpt":
            write_our_checkpoint("ckpt.pt")
            damaged_bytes("ckpt.pt")
            return sample_module, ["--ckpt", "ckpt.pt", "--class-id", "1", "--steps", "2", "--out", "s.png"]
        out = run_train(*TINY_TRAIN, "--init", "none", "--global-batch-size", "4", "--max-steps", "1",
                        "--run-dir", "run")
        damaged_bytes(out["final_ckpt"])
        more = ["--data", "toy", "--init", out["final_ckpt"]] if flag == "--init" else ["--resume", "run"]
        return train, [*more, "--max-steps", "2", "--run-dir", "run" if flag == "--resume" else "run2"]
    return make


def escaping_manifest(name):
    def make():
        os.makedirs("gen")
        open("victim.txt", "w").write("somebody else's file")
        with open("gen/samples.json", "w") as f:
            json.dump(dict(made_by=dict(seed=-1), hierarchy=None, images=[[name, 0]]), f)
        write_our_checkpoint("ckpt.pt")
        return evaluate, ["generate", "--ckpt", "ckpt.pt", "--out", "gen", "--per-class", "1", "--steps", "2",
                          "--overwrite"]
    return make


def cache_then(damage):
    """A latent cache of the toy data built by `data.py cache`, then damaged; then `data.py cache` again (resume)
    or `train.py --latent-cache` reads it."""
    def make():
        write_tiny_vae("vae")
        argv = ["cache", "--data", "toy", "--image-size", "32", "--vae", "vae", "--out", "cache", "--num-workers", "0"]
        assert run_main(data, *argv, capsys=NoCapture()).returncode == 0
        command = damage()
        if command == "cache":
            return data, argv
        return train, [*TINY_TRAIN[:2], "--latent-cache", "cache", "--vae", "vae", "--init", "none", "--model",
                       "DiT-T/2", "--image-size", "32", "--max-steps", "1", "--num-workers", "0", "--run-dir", "run"]
    return make


class NoCapture:
    """Stands in for capsys where a fixture's own command output does not matter."""
    def readouterr(self):
        return argparse.Namespace(out="", err="")


def truncate(path, fraction=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))


def edit_json(path, edit):
    with open(path) as f:
        obj = json.load(f)
    with open(path, "w") as f:
        json.dump(edit(obj), f)


def cut_stats():
    np.savez("ref.npz", mu=np.zeros(8), sigma=np.eye(8), count=np.int64(3))
    truncate("ref.npz", 1000 / os.path.getsize("ref.npz"))
    np.savez("fake.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    return evaluate, ["fid", "--real", "ref.npz", "--fake", "fake.npz"]


def unreadable_manifest():
    os.makedirs("gen")
    open("gen/samples.json", "w").write('{"made_by": {}, "images": [["00000/000000.png", 0]')   # cut short
    np.savez("ref.npz", mu=np.zeros(8), sigma=np.eye(8), count=np.int64(3))
    return evaluate, ["fid", "--real", "ref.npz", "--fake", "gen"]


def edited_checkpoint(edit, command=("sample",)):
    """Our checkpoint with `edit(state)` done to both its tensor sets; then sample.py (or generate) on it."""
    def make():
        write_our_checkpoint("ckpt.pt")
        ckpt = torch.load("ckpt.pt", weights_only=True)
        for key in ("model", "ema"):
            edit(ckpt[key])
        torch.save(ckpt, "ckpt.pt")
        if command[0] == "generate":
            return evaluate, ["generate", "--ckpt", "ckpt.pt", "--out", "gen", "--per-class", "1", "--steps", "2"]
        return sample_module, ["--ckpt", "ckpt.pt", "--class-id", "1", "--steps", "2", "--out", "s.png"]
    return make


def grown(key, rows=0, columns=0):
    """The tensor `key` with rows (or columns) added: a checkpoint that holds more than its config says."""
    def edit(state):
        t = state[key]
        state[key] = torch.cat([t, t[:rows]], 0) if rows else torch.cat([t, t[:, :columns]], 1)
    return edit


def poisoned(key, value):
    def edit(state):
        state[key] = state[key].clone()
        state[key].view(-1)[3] = value
    return edit


def edited_delta(edit):
    """A delta checkpoint of train.py (the tuned tensors over a base file), edited; then sample.py on it."""
    def make():
        write_our_checkpoint("base.pt")
        out = run_train(*TINY_TRAIN, "--init", "base.pt", "--global-batch-size", "4", "--max-steps", "1",
                        "--run-dir", "run")
        ckpt = torch.load(out["final_ckpt"], weights_only=True)
        assert ckpt["base"] is not None
        for key in ("model", "ema"):
            edit(ckpt[key])
        torch.save(ckpt, out["final_ckpt"])
        return sample_module, ["--ckpt", "run", "--class-id", "1", "--steps", "2", "--out", "s.png"]
    return make


def vae_config(edit):
    """A VAE folder whose config.json is edited, then sample.py decodes with it."""
    def make():
        write_tiny_vae("vae")
        edit_json("vae/config.json", edit)
        return sample_with_vae("vae")
    return make


def inat21_json(edit):
    """An iNat21 layout whose json's categories are edited; then data.py info reads it."""
    def make():
        make_inat21("inat")
        edit_json("inat/train_mini.json", lambda j: dict(j, categories=edit(j["categories"])))
        return data, ["info", "--data", "inat21", "--data-path", "inat"]
    return make


def compressed_checkpoint():
    """Our checkpoint, its zip records deflated (torch.save never writes them so; inflating one can cost any memory)."""
    write_our_checkpoint("plain.pt")
    with zipfile.ZipFile("plain.pt") as source, zipfile.ZipFile("ckpt.pt", "w", zipfile.ZIP_DEFLATED) as packed:
        for info in source.infolist():
            packed.writestr(info.filename, source.read(info))
    os.remove("plain.pt")
    return sample_module, ["--ckpt", "ckpt.pt", "--class-id", "1", "--steps", "2", "--out", "s.png"]


def stats_with(**fields):
    def make():
        np.savez("ref.npz", mu=np.zeros(8), sigma=np.eye(8), count=np.int64(3), **fields)
        np.savez("fake.npz", mu=np.zeros(8), sigma=np.eye(8), count=np.int64(3))
        return evaluate, ["fid", "--real", "ref.npz", "--fake", "fake.npz"]
    return make


# (what, make() -> (module, argv) after writing the damaged input into the working folder, words of the one line)
DAMAGED_INPUTS = [
    ("label table one row longer than its config", edited_checkpoint(grown(model_module.LABEL_TABLE, rows=1)),
     ["ckpt.pt", "y_embedder.embedding_table.weight", "[21, 128]", "[20, 128]"]),
    ("label table one column wider", edited_checkpoint(grown(model_module.LABEL_TABLE, columns=1)),
     ["ckpt.pt", "y_embedder.embedding_table.weight", "[20, 129]"]),
    ("a NaN in one bias: sample", edited_checkpoint(poisoned("blocks.1.mlp.fc1.bias", math.nan)),
     ["ckpt.pt", "blocks.1.mlp.fc1.bias", "non-finite"]),
    ("an inf in one bias: generate", edited_checkpoint(poisoned("final_layer.linear.bias", math.inf), ["generate"]),
     ["ckpt.pt", "final_layer.linear.bias", "non-finite"]),
    ("a delta with a wrong-shaped tensor", edited_delta(grown("blocks.0.attn.qkv.bias", rows=1)),
     ["0000001.pt", "blocks.0.attn.qkv.bias", "[385]", "[384]"]),
    ("a delta with an unknown tensor", edited_delta(lambda state: state.update({"blocks.0.attn.gate": torch.ones(1)})),
     ["0000001.pt", "unexpected tensor", "blocks.0.attn.gate"]),
    ("a delta without one of its tuned tensors", edited_delta(lambda state: state.pop("blocks.2.norm1.weight")),
     ["0000001.pt", "missing tensor", "blocks.2.norm1.weight"]),
    ("a checkpoint whose zip records are compressed", compressed_checkpoint, ["ckpt.pt", "compressed"]),
    ("VAE config: a channel count in the millions", vae_config(lambda c: dict(c, block_out_channels=[2 ** 20] * 4)),
     ["config.json", "block_out_channels", "4096"]),
    ("VAE config: channels that fit no weights file", vae_config(lambda c: dict(c, block_out_channels=[4096] * 8)),
     ["diffusion_pytorch_model.safetensors"]),
    ("VAE config: layers_per_block as text", vae_config(lambda c: dict(c, layers_per_block="2")),
     ["config.json", "layers_per_block", "'2'"]),
    ("VAE config: no latent channels", vae_config(lambda c: dict(c, latent_channels=0)),
     ["config.json", "latent_channels", "[1, 64]"]),
    ("VAE config: block_out_channels a number", vae_config(lambda c: dict(c, block_out_channels=128)),
     ["config.json", "block_out_channels"]),
    ("VAE config: norm_num_groups zero", vae_config(lambda c: dict(c, norm_num_groups=0)),
     ["config.json", "norm_num_groups"]),
    ("VAE config: a true layer count", vae_config(lambda c: dict(c, layers_per_block=True)),
     ["config.json", "layers_per_block", "True"]),
    ("VAE config: a negative latent scale", vae_config(lambda c: dict(c, scaling_factor=-0.18215)),
     ["config.json", "scaling_factor"]),
    ("VAE config: a list", vae_config(lambda c: [c]), ["config.json", "JSON object"]),
    ("iNat21 json: a text id", inat21_json(lambda cats: [dict(cats[0], id="abc"), *cats[1:]]), ["train_mini.json", "abc"]),
    ("iNat21 json: a null category", inat21_json(lambda cats: [None, *cats]), ["train_mini.json", "None"]),
    ("iNat21 json: a category that is a list", inat21_json(lambda cats: [list(cats[0].values()), *cats[1:]]),
     ["train_mini.json", "integer id"]),
    ("iNat21 json: a number for a supercategory", inat21_json(lambda cats: [dict(cats[0], supercategory=5), *cats[1:]]),
     ["train_mini.json", "supercategory"]),
    ("iNat21 json: categories a dict", inat21_json(lambda cats: {"0": cats[0]}), ["train_mini.json", "categories"]),
    ("latent cache: done.npy empty, trained on", cache_then(lambda: truncate("cache/done.npy", 0) or "train"),
     ["done.npy", "delete cache"]),
    ("FID statistics: count as text", stats_with(count_0=np.array("3")), ["ref.npz", "count_0"]),
    ("FID statistics: count_0 an array", stats_with(count_0=np.arange(3)), ["ref.npz", "count_0", "[3]"]),
    ("FID statistics: a superclass's mean of another length", stats_with(mu_0=np.zeros(5), count_0=np.int64(2)),
     ["ref.npz", "mu_0", "[5]"]),
    ("statistics: features of 2 images where the count is 3", stats_with(features=np.zeros((2, 8), np.float32)),
     ["ref.npz", "features", "[2, 8]", "3 images"]),
    ("statistics: a NaN among the features", stats_with(features=np.full((3, 8), np.nan, np.float32)),
     ["ref.npz", "features", "finite"]),
    ("statistics: a superclass for 2 of 3 images", stats_with(superclass=np.zeros(2, np.int64)),
     ["ref.npz", "superclass", "[2]"]),
    ("statistics: features without each one's superclass", stats_with(features=np.zeros((3, 8), np.float32),
     hierarchy=np.array(json.dumps(data.make_hierarchy(["a"], ["S"], [0])))), ["ref.npz", "superclass"]),
    ("statistics: spatial covariance of another size", stats_with(spatial_mu=np.zeros(4), spatial_sigma_1=np.eye(3)),
     ["ref.npz", "spatial_sigma_1", "[3, 3]"]),
    ("statistics: an Inception Score of one number", stats_with(isc_0=np.ones(1)), ["ref.npz", "isc_0"]),
    *[(f"safetensors: {what}", hostile_vae(edit), ["diffusion_pytorch_model.safetensors"])
      for what, edit in HOSTILE_HEADERS.items()],
    ("checkpoint bytes damaged: sample --ckpt", damaged_checkpoint("--ckpt"), ["ckpt.pt", "damaged", "CRC-32"]),
    ("checkpoint bytes damaged: train --init", damaged_checkpoint("--init"), ["0000001.pt", "damaged", "CRC-32"]),
    ("checkpoint bytes damaged: train --resume", damaged_checkpoint("--resume"), ["0000001.pt", "damaged", "CRC-32"]),
    ("samples.json names ../victim.txt", escaping_manifest("../victim.txt"), ["samples.json", "../victim.txt"]),
    ("samples.json names an absolute path", escaping_manifest(os.path.abspath(os.sep + "victim.txt")),
     ["samples.json", "victim.txt"]),
    ("samples.json cut short", unreadable_manifest, ["samples.json"]),
    ("latent cache: moments.npy cut to half, cache resumed",
     cache_then(lambda: truncate("cache/moments.npy") or "cache"), ["moments.npy", "delete cache"]),
    ("latent cache: labels.npy cut short, trained on",
     cache_then(lambda: truncate("cache/labels.npy", 0.9) or "train"), ["labels.npy"]),
    ("latent cache: meta.json's latent_shape disagrees",
     cache_then(lambda: edit_json("cache/meta.json", lambda m: dict(m, latent_shape=[4, 8, 8])) or "train"),
     ["moments.npy", "meta.json says"]),
    ("FID statistics cut to 1,000 bytes", cut_stats, ["ref.npz"]),
]


def file_contents(root):
    """{relative path: bytes} of every file under root."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = open(path, "rb").read()
    return found


@pytest.mark.parametrize("row", DAMAGED_INPUTS, ids=lambda row: row[0])
def test_a_damaged_or_hostile_input_is_one_error_line_and_nothing_is_run_deleted_or_lost(row, tmp_path, monkeypatch,
                                                                                         capsys):
    what, make, words = row
    monkeypatch.chdir(tmp_path)
    module, argv = make()
    before = file_contents(tmp_path)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        proc = run_main(module, *argv, capsys=capsys)
    assert_one_line_error(proc, *words)
    assert not warned, [str(w.message) for w in warned]
    assert file_contents(tmp_path) == before                        # nothing written, deleted or changed


def test_a_valid_safetensors_file_still_loads_after_the_header_checks(tmp_path):
    vae = write_tiny_vae(tmp_path / "vae")
    loaded = load_safetensors(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    assert tensors_equal(loaded, vae.state_dict())


def racing_mkdir(monkeypatch, name):
    """Another run takes folder `name` (and its lock) between this run's look at the folder and its mkdir."""
    mkdir, held = os.mkdir, []

    def mkdir_after_the_other_run(path, *args):
        if os.path.basename(path) == name and not os.path.exists(path) and not held:
            mkdir(path)
            held.append(hardening.lock_folder(path))           # the other run holds it from now on
        return mkdir(path, *args)
    monkeypatch.setattr(os, "mkdir", mkdir_after_the_other_run)
    return held


def test_two_auto_numbered_runs_started_together_get_two_folders_and_the_other_runs_lock_stays(tmp_path,
                                                                                                monkeypatch):
    held = racing_mkdir(monkeypatch, "000-DiT-T-4-full")
    out = run_train(*TINY_TRAIN, "--init", "none", "--global-batch-size", "4", "--max-steps", "1",
                    "--results-dir", tmp_path)
    assert held and os.path.basename(out["run_dir"]) == "001-DiT-T-4-full"
    with pytest.raises(UserError, match="in use by another training run"):      # the other run's lock is intact
        hardening.lock_folder(tmp_path / "000-DiT-T-4-full")


def test_a_run_refused_a_folder_another_run_just_took_leaves_that_folder_alone(tmp_path, monkeypatch):
    held = racing_mkdir(monkeypatch, "run")
    with pytest.raises(UserError, match="in use by another training run"):
        run_train(*TINY_TRAIN, "--init", "none", "--global-batch-size", "4", "--max-steps", "1",
                  "--run-dir", tmp_path / "run")
    assert held and sorted(os.listdir(tmp_path / "run")) == [".lock", "checkpoints"]
    with pytest.raises(UserError, match="in use by another training run"):
        hardening.lock_folder(tmp_path / "run")


def test_statistics_of_pytorch_fid_and_of_adm_give_the_overall_fid_and_say_what_they_lack(tmp_path, capsys):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 6))
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    np.savez(tmp_path / "ours.npz", **evaluate.image_stats(features))
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)                    # fid_score.py --save-stats
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu, sigma=sigma,  # ADM's ref batches
             mu_s=np.zeros(3), sigma_s=np.eye(3))
    for reference in ("pytorch_fid.npz", "adm.npz"):
        proc = run_main(evaluate, "fid", "--real", tmp_path / reference, "--fake", tmp_path / "ours.npz",
                        "--out-csv", tmp_path / "t.csv", capsys=capsys)
        assert proc.returncode == 0, proc.stderr
        assert "no per-superclass rows, image count unknown" in proc.stderr
        with open(tmp_path / "t.csv") as f:
            (row,) = list(csv.DictReader(f))
        assert row["superclass"] == "Overall" and row["count_real"] == "" and abs(float(row["fid"])) < 1e-6


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_a_checkpoint_of_a_wrapped_model_loads_with_the_prefix_taken_off_and_says_so(prefix, tmp_path, capsys):
    model = write_our_checkpoint(tmp_path / "plain.pt")
    ckpt = torch.load(tmp_path / "plain.pt", weights_only=True)
    for key in ("model", "ema"):
        ckpt[key] = {prefix + k: v for k, v in ckpt[key].items()}
    torch.save(ckpt, tmp_path / "wrapped.pt")
    loaded, _ = load_model(str(tmp_path / "wrapped.pt"))
    assert tensors_equal(loaded.state_dict(), model.state_dict())
    assert "the prefix is taken off" in capsys.readouterr().err


def test_a_hierarchy_csv_saved_with_a_byte_order_mark_and_crlf_names_no_phantom_class(tmp_path):
    for name, sup in (("a", "S1"), ("b", "S1"), ("c", "S2")):
        os.makedirs(tmp_path / "flat" / name)
        Image.new("RGB", (8, 8)).save(tmp_path / "flat" / name / "0.png")
    (tmp_path / "h.csv").write_bytes("\ufeffclass,superclass\r\na,S1\r\nb,S1\r\nc,S2\r\n".encode("utf-8"))
    ds = data.build_dataset("folder", str(tmp_path / "flat"), image_size=8, hierarchy_csv=str(tmp_path / "h.csv"))
    assert ds.class_names == ["a", "b", "c"] and ds.superclass_names == ["S1", "S2"]


def test_a_metric_that_cannot_be_computed_leaves_its_column_empty_and_the_table_is_written(tmp_path, lpips_files,
                                                                                            monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_inception", lambda path=None: MeanColour())
    write_our_checkpoint(tmp_path / "ckpt.pt")                       # 16 classes: 5 samples, one of each of 5
    real = np.random.default_rng(0).normal(size=(50, 3))
    np.savez(tmp_path / "ref.npz", **evaluate.image_stats(real, np.arange(50) % 16, TOY_HIERARCHY))
    proc = run_main(evaluate, "generate", "--ckpt", tmp_path / "ckpt.pt", "--num-samples", 5, "--steps", 2,
                    "--out", tmp_path / "gen", "--fid", tmp_path / "ref.npz", "--out-csv", tmp_path / "t1.csv",
                    "--lpips-alex", lpips_files[0], "--lpips-lin", lpips_files[1], "--workers", 0, capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert "LPIPS skipped (its column is left empty)" in proc.stderr
    with open(tmp_path / "t1.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["superclass"] == "Overall" and rows[-1]["fid"] != "" and all(r["lpips"] == "" for r in rows)


def test_out_naming_an_existing_folder_is_a_user_mistake(tmp_path, capsys):
    write_our_checkpoint(tmp_path / "ckpt.pt")
    (tmp_path / "a-folder").mkdir()
    proc = run_main(sample_module, "--ckpt", tmp_path / "ckpt.pt", "--class-id", 1, "--steps", 2, "--out",
                    tmp_path / "a-folder", capsys=capsys)
    assert_one_line_error(proc, "--out", "a-folder", "it is a folder")
    assert not os.listdir(tmp_path / "a-folder")


def test_a_checkpoint_that_cannot_be_written_names_the_last_good_one(tmp_path, base_ckpt, monkeypatch):
    save, calls = train.save_checkpoint, []

    def read_only_the_second_time(path, **fields):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.EACCES, "Permission denied", path)
        save(path, **fields)
    monkeypatch.setattr(train, "save_checkpoint", read_only_the_second_time)
    with pytest.raises(hardening.RunFailed, match=r"Permission denied writing .*0000002\.pt; last good checkpoint: "
                                                  r".*0000001\.pt.*make the folder writable"):
        run_train(*TINY_TRAIN, "--init", base_ckpt, "--global-batch-size", "4", "--max-steps", "2", "--ckpt-every",
                  "1", "--run-dir", tmp_path)


def test_a_non_finite_loss_before_any_checkpoint_says_to_start_again(tmp_path, base_ckpt, monkeypatch):
    real = diffusion_module.GaussianDiffusion.training_losses
    def poisoned(self, *a, **k):
        terms = real(self, *a, **k)
        return {**terms, "loss": terms["loss"] * float("nan")}
    monkeypatch.setattr(diffusion_module.GaussianDiffusion, "training_losses", poisoned)
    with pytest.raises(hardening.RunFailed, match="nan at step 1: stopped; no checkpoint was written yet: start again"):
        run_train(*TINY_TRAIN, "--init", base_ckpt, "--global-batch-size", "4", "--max-steps", "2", "--run-dir", tmp_path)


# ------------------------------------------------------------------------------------------------------------
# Results that say what made them: statistics and samples compared only with what they can be compared with
# ------------------------------------------------------------------------------------------------------------

def stats_cli(*argv, capsys):
    return run_main(evaluate, "stats", *argv, "--workers", 0, "--device", "cpu", capsys=capsys)


def fid_cli(*argv, capsys):
    return run_main(evaluate, "fid", *argv, "--workers", 0, "--device", "cpu", capsys=capsys)


def test_fid_refuses_statistics_of_images_of_another_size_naming_both(labelled_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_inception", lambda path=None: MeanColour())
    images = tmp_path / "images.npz"
    source = folder_images(labelled_folder, 16)
    np.savez(images, arr_0=np.stack([source.read(i) for i in range(len(source))]))
    assert stats_cli("--images", images, "--image-size", 32, "--out", tmp_path / "r.npz", capsys=capsys).returncode == 0
    made = json.loads(str(np.load(tmp_path / "r.npz")["provenance"]))
    assert made["image_size"] == [32, 32] and made["crop"] == evaluate.ADM_CROP and made["count"] == 30
    assert made["inception_sha256"] == MeanColour.weights_sha256 and made["source"]["kind"] == "npz"
    proc = fid_cli("--real", tmp_path / "r.npz", "--fake", images, "--image-size", 16, "--out-csv", tmp_path / "t.csv",
                   capsys=capsys)
    assert_one_line_error(proc, "32x32", "16x16", "--image-size 32")
    assert not (tmp_path / "t.csv").exists()
    proc = fid_cli("--real", tmp_path / "r.npz", "--fake", images, "--image-size", 32, "--out-csv", tmp_path / "t.csv",
                   "--pairs", 0, capsys=capsys)
    assert proc.returncode == 0 and float(next(csv.DictReader(open(tmp_path / "t.csv")))["fid"]) < 1e-3


def test_fid_refuses_statistics_made_with_another_inception_network(labelled_folder, inception_file, tmp_path, capsys):
    torch.save(seeded_inception("another network: "), tmp_path / "other.pth")
    assert stats_cli("--data", "folder", "--data-path", labelled_folder, "--image-size", 16, "--out",
                     tmp_path / "r.npz", "--inception", inception_file[0], capsys=capsys).returncode == 0
    ours = hashlib.sha256(open(inception_file[0], "rb").read()).hexdigest()
    other = hashlib.sha256(open(tmp_path / "other.pth", "rb").read()).hexdigest()
    source = folder_images(labelled_folder, 16)
    np.savez(tmp_path / "fake.npz", arr_0=np.stack([source.read(i) for i in range(len(source))]))
    proc = fid_cli("--real", tmp_path / "r.npz", "--fake", tmp_path / "fake.npz", "--inception", tmp_path / "other.pth",
                   "--out-csv", tmp_path / "t.csv", capsys=capsys)
    assert_one_line_error(proc, ours[:12], other[:12], "--inception")
    assert not (tmp_path / "t.csv").exists()


def test_fid_and_generate_refuse_statistics_of_another_size_than_the_samples_json_records(labelled_folder, tmp_path,
                                                                                          monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_inception", lambda path=None: MeanColour())
    write_our_checkpoint(tmp_path / "ckpt.pt")                                # draws 16 px images
    assert stats_cli("--data", "folder", "--data-path", labelled_folder, "--image-size", 32, "--out",
                     tmp_path / "r.npz", capsys=capsys).returncode == 0
    proc = run_main(evaluate, "generate", "--ckpt", tmp_path / "ckpt.pt", "--out", tmp_path / "gen", "--per-class", 1,
                    "--steps", 2, "--fid", tmp_path / "r.npz", "--out-csv", tmp_path / "t.csv", "--workers", 0,
                    capsys=capsys)
    assert_one_line_error(proc, "32x32", "16x16")                           # before the first image is drawn
    assert not glob.glob(str(tmp_path / "gen" / "*" / "*.png")) and not (tmp_path / "t.csv").exists()
    assert run_main(evaluate, "generate", "--ckpt", tmp_path / "ckpt.pt", "--out", tmp_path / "gen", "--per-class", 1,
                    "--steps", 2, capsys=capsys).returncode == 0
    assert_one_line_error(fid_cli("--real", tmp_path / "r.npz", "--fake", tmp_path / "gen", capsys=capsys),
                          "32x32", "16x16")


def test_statistics_of_other_tools_are_compared_with_a_note_that_their_making_cannot_be_checked(tmp_path, capsys):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 6))
    np.savez(tmp_path / "ours.npz", **evaluate.image_stats(features, provenance=dict(image_size=[16, 16],
                                                                                         inception_sha256="abc")))
    np.savez(tmp_path / "pytorch_fid.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    proc = fid_cli("--real", tmp_path / "pytorch_fid.npz", "--fake", tmp_path / "ours.npz", capsys=capsys)
    assert proc.returncode == 0 and "their image size and Inception weights cannot be checked" in proc.stderr


def test_a_decoder_that_overflows_fp16_still_gives_images_when_the_dit_samples_in_fp16(tmp_path, capsys):
    dit, vae_dir = latent_dit_and_vae(tmp_path)
    weights = vae_dir / "diffusion_pytorch_model.safetensors"
    state = load_safetensors(str(weights))
    for name in ("decoder.conv_in.weight", "decoder.conv_in.bias"):    # activations past fp16's 65504
        state[name] = state[name] * 1e5
    save_safetensors(state, weights)
    pixels = {}
    for precision in ("fp32", "fp16"):
        proc = run_main(sample_module, "--ckpt", dit, "--vae", vae_dir, "--class-id", 1, "--num-samples", 2,
                        "--guidance", "null", "--steps", 3, "--precision", precision, "--out", tmp_path / "s.png",
                        "--per-sample-dir", tmp_path / precision, capsys=capsys)
        assert proc.returncode == 0, proc.stderr
        pixels[precision] = np.stack([np.array(Image.open(tmp_path / precision / f"00001_000{i}.png"))
                                      for i in range(2)]).astype(float)
    assert pixels["fp32"].std() > 10                                      # an image, not a flat colour
    assert np.abs(pixels["fp16"] - pixels["fp32"]).mean() < 0.2 * pixels["fp32"].std()   # the same image


def exploding_checkpoint(path):
    """Our checkpoint, every tensor finite, whose DiT predicts eps of 1e38: the samples overflow while sampling."""
    write_our_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    for key in ("model", "ema"):
        ckpt[key]["final_layer.linear.bias"] = torch.full_like(ckpt[key]["final_layer.linear.bias"], 1e38)
    torch.save(ckpt, path)


def test_a_sample_that_goes_non_finite_stops_in_one_line_naming_its_class_and_writes_no_image(tmp_path, capsys):
    exploding_checkpoint(tmp_path / "ckpt.pt")
    proc = run_main(sample_module, "--ckpt", tmp_path / "ckpt.pt", "--class-id", 5, "--num-samples", 2, "--steps", 2,
                    "--out", tmp_path / "s.png", "--per-sample-dir", tmp_path / "each", capsys=capsys)
    assert proc.returncode == 1 and error_lines(proc) == [proc.stderr.strip().splitlines()[-1]]
    assert "not finite" in proc.stderr and "class 5" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "each").exists()
    proc = run_main(evaluate, "generate", "--ckpt", tmp_path / "ckpt.pt", "--out", tmp_path / "gen", "--per-class", 1,
                    "--steps", 2, "--pairs", 0, capsys=capsys)
    assert proc.returncode == 1 and "not finite" in proc.stderr and "class 0" in proc.stderr
    assert not glob.glob(str(tmp_path / "gen" / "*" / "*.png"))


def test_a_vae_of_another_latent_scale_is_refused_for_a_dit_trained_on_the_sd_vaes(tmp_path, capsys):
    dit, _ = latent_dit_and_vae(tmp_path)                          # official layout: trained on 0.18215 latents
    write_tiny_vae(tmp_path / "sdxl", scaling_factor=0.13025)      # SDXL's config.json says so
    proc = run_main(sample_module, "--ckpt", dit, "--vae", tmp_path / "sdxl", "--class-id", 1, "--guidance", "null",
                    "--steps", 2, "--out", tmp_path / "s.png", capsys=capsys)
    assert_one_line_error(proc, "0.13025", "0.18215")
    assert not (tmp_path / "s.png").exists()


def test_a_latent_run_records_its_vaes_scale_trains_on_it_and_its_samples_decode_by_it(tmp_path, monkeypatch,
                                                                                       capsys):
    write_tiny_vae(tmp_path / "sdxl", scaling_factor=0.13025)
    base = tmp_path / "latent-base.pt"
    torch.save(DiT_models["DiT-T/2"](input_size=4, num_classes=4).state_dict(), base)
    seen = []
    encode = train.encode
    monkeypatch.setattr(train, "encode", lambda vae, x: seen.append(vae.scaling_factor) or encode(vae, x))
    run = run_train("--data", "toy", "--global-batch-size", 4, "--max-steps", 1, "--num-workers", 0, "--init", base,
                    "--vae", tmp_path / "sdxl", "--run-dir", tmp_path / "run")
    assert seen == [0.13025]
    assert torch.load(run["final_ckpt"], weights_only=True)["vae"]["config"]["scaling_factor"] == 0.13025
    decoded = []                                  # sampled latents of 1 are decoded as 1 / 0.13025
    monkeypatch.setattr(sample_module.Sampler, "loop", lambda self, learn_sigma=True: (
        lambda model, shape, noise, **kw: torch.ones(shape)))
    monkeypatch.setattr(AutoencoderKL, "decode", lambda self, z: decoded.append(z) or torch.zeros(len(z), 3, 32, 32))
    assert run_main(sample_module, "--ckpt", run["final_ckpt"], "--class-id", 1, "--steps", 2, "--out",
                    tmp_path / "s.png", capsys=capsys).returncode == 0
    assert torch.allclose(decoded[0], torch.full_like(decoded[0], 1 / 0.13025))


def test_lpips_on_images_too_small_for_alexnet_leaves_its_column_empty_and_the_fid_is_written(
        labelled_folder, lpips_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_inception", lambda path=None: MeanColour())
    source = folder_images(labelled_folder, 16)
    np.savez(tmp_path / "fake.npz", arr_0=np.stack([source.read(i) for i in range(len(source))]),
             labels=source.labels, hierarchy=np.array(json.dumps(source.hierarchy)))
    assert stats_cli("--data", "folder", "--data-path", labelled_folder, "--image-size", 16, "--out",
                     tmp_path / "r.npz", capsys=capsys).returncode == 0
    proc = fid_cli("--real", tmp_path / "r.npz", "--fake", tmp_path / "fake.npz", "--lpips-alex", lpips_files[0],
                   "--lpips-lin", lpips_files[1], "--out-csv", tmp_path / "t.csv", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert "LPIPS skipped (its column is left empty): its AlexNet needs images of at least 31 px" in proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["superclass"] for r in rows] == ["Birds", "Fungi", "Plants", "Overall"]
    assert all(r["fid"] != "" and r["lpips"] == "" for r in rows)


def test_fid_is_reported_as_a_distance_never_below_zero_and_the_raw_value_is_kept(labelled_folder, tmp_path,
                                                                                monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_inception", lambda path=None: MeanColour())
    assert stats_cli("--data", "folder", "--data-path", labelled_folder, "--image-size", 16, "--out",
                     tmp_path / "r.npz", capsys=capsys).returncode == 0
    proc = fid_cli("--real", tmp_path / "r.npz", "--fake", tmp_path / "r.npz", "--out-csv", tmp_path / "t.csv",
                   "--out-json", tmp_path / "t.json", capsys=capsys)
    assert proc.returncode == 0
    assert not [line for line in proc.stdout.splitlines()[1:] if line.split()[1].startswith("-")]  # the FID column
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert all(r["fid"] == max(0.0, r["fid_raw"]) and abs(r["fid_raw"]) < 1e-2 for r in rows)
    assert all(float(r["fid"]) >= 0 and "fid_raw" not in r for r in csv.DictReader(open(tmp_path / "t.csv")))
    assert json.loads((tmp_path / "t.json").read_text())["real_made_by"]["image_size"] == [16, 16]


SPAWNED = """import multiprocessing, os, runpy, sys
multiprocessing.set_start_method("spawn")      # as on Windows and macOS: workers import, nothing is inherited
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))    # as `python SCRIPT` puts the script's folder first
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_statistics_fid_the_latent_cache_and_training_run_with_workers_started_by_spawn(
        labelled_folder, inception_file, lpips_files, tmp_path):
    (tmp_path / "spawned.py").write_text(SPAWNED)
    shutil.copytree(labelled_folder / "Birds", tmp_path / "few" / "Birds")     # 2 classes, 6 images each
    source = folder_images(tmp_path / "few", 32)
    np.savez(tmp_path / "fake.npz", arr_0=np.stack([source.read(i) for i in range(0, 12, 3)]),
             labels=source.labels[::3], hierarchy=np.array(json.dumps(source.hierarchy)))
    write_tiny_vae(tmp_path / "vae")
    commands = [  # the real images' statistics (a dataset's reader), the fake ones' (an .npz's), the LPIPS pairs
        ["evaluate.py", "fid", "--data", "folder", "--data-path", tmp_path / "few", "--image-size", 32, "--fake",
         tmp_path / "fake.npz", "--lpips-alex", lpips_files[0], "--lpips-lin", lpips_files[1], "--pairs", 4,
         "--overall-only", "--out-json", tmp_path / "t.json", "--workers", 1, "--inception", inception_file[0]],
        ["data.py", "cache", "--data", "folder", "--data-path", tmp_path / "few", "--image-size", 16, "--vae",
         tmp_path / "vae", "--out", tmp_path / "cache", "--num-workers", 1],
        ["train.py", *TINY_TRAIN[:-4], "--num-workers", 1, "--init", "none", "--global-batch-size", 4, "--max-steps", 2,
         "--run-dir", tmp_path / "run"]]
    running = [subprocess.Popen([sys.executable, tmp_path / "spawned.py", os.path.join(HERE, script), *map(str, argv)],
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for script, *argv in commands]   # side by side
    for proc in running:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    assert json.loads((tmp_path / "t.json").read_text())["rows"][-1]["lpips"] > 0
    assert data.LatentCacheDataset(str(tmp_path / "cache")).meta["num_images"] == 12
    assert os.listdir(tmp_path / "run" / "checkpoints")


ASCII_ONLY = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}   # no UTF-8 mode either


def test_names_that_are_not_ascii_are_read_as_utf8_under_an_ascii_locale(tmp_path, inception_file):
    root = make_inat21(tmp_path / "inat")
    categories = json.loads((root / "train_mini.json").read_text())
    categories["categories"][0]["name"] = "Araneus diadematus (Kreuzspinne, araña de jardín)"
    (root / "train_mini.json").write_text(json.dumps(categories, ensure_ascii=False), encoding="utf-8")
    proc = run_script("evaluate.py", "stats", "--data", "inat21", "--data-path", root, "--split", "train_mini",
                      "--image-size", 16, "--out", tmp_path / "r.npz", "--workers", 0, "--inception",
                      inception_file[0], env=ASCII_ONLY)
    assert proc.returncode == 0, proc.stderr
    names = json.loads(str(np.load(tmp_path / "r.npz")["hierarchy"]))["class_names"]
    assert names[0] == "Araneus diadematus (Kreuzspinne, araña de jardín)"
    hierarchy = dict(class_names=["Pâquerette", "Bleuet"], superclass_names=["Fleurs des prés"], superclass_of=[0, 0])
    (tmp_path / "h.json").write_text(json.dumps(hierarchy, ensure_ascii=False), encoding="utf-8")
    np.savez(tmp_path / "gen.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8), labels=np.array([0, 0, 1, 1]))
    proc = run_script("evaluate.py", "stats", "--images", tmp_path / "gen.npz", "--hierarchy", tmp_path / "h.json",
                      "--out", tmp_path / "g.npz", "--workers", 0, "--inception", inception_file[0], env=ASCII_ONLY)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(str(np.load(tmp_path / "g.npz")["hierarchy"])) == hierarchy


def test_the_local_rank_flag_of_torch_distributed_launch_is_accepted_and_the_rank_taken_from_the_environment(
        tmp_path, capsys):
    write_our_checkpoint(tmp_path / "ckpt.pt")
    proc = run_script("-m", "torch.distributed.launch", "--nproc_per_node=1", f"--master_port={free_port()}",
                      "sample.py", "--ckpt", tmp_path / "ckpt.pt", "--class-id", 1, "--num-samples", 1, "--steps", 2,
                      "--out", tmp_path / "s.png")
    assert proc.returncode == 0 and (tmp_path / "s.png").exists(), proc.stderr[-2000:]
    for flag in ("--local-rank=0", "--local_rank=0"):
        proc = run_main(evaluate, flag, "generate", "--ckpt", tmp_path / "ckpt.pt", "--out", tmp_path / "gen",
                        "--num-samples", 2, "--steps", 2, "--pairs", 0, capsys=capsys)
        assert proc.returncode == 0, proc.stderr
    assert train.parse_args(["--local_rank", "3", "--data", "toy"]).data == "toy"


def out_of_memory_at(monkeypatch, call, error):
    """The DiT runs out of memory at its `call`-th forward pass (counting from 1)."""
    calls, forward = [0], model_module.DiT.forward

    def failing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise error
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(model_module.DiT, "forward", failing)


@pytest.mark.parametrize("error, where", [(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                           "GPU"),
                                          (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                                                        "allocate 9 bytes. Error code 12"), "CPU")])
def test_running_out_of_memory_names_the_batch_to_try_and_generate_keeps_what_it_finished(error, where, tmp_path,
                                                                                       monkeypatch, capsys):
    write_our_checkpoint(tmp_path / "ckpt.pt")
    out_of_memory_at(monkeypatch, 1, error)
    proc = run_main(sample_module, "--ckpt", tmp_path / "ckpt.pt", "--class-id", 1, "--steps", 2, "--out",
                    tmp_path / "s.png", capsys=capsys)
    assert proc.returncode == 1 and error_lines(proc) == [f"error: out of {where} memory: try --num-samples 4 "
                                                          "(sample.py draws them all at once)"]
    assert "Traceback" not in proc.stderr and not (tmp_path / "s.png").exists()
    out_of_memory_at(monkeypatch, 3, error)                                  # during the second batch of 4
    argv = ["generate", "--ckpt", tmp_path / "ckpt.pt", "--out", tmp_path / "gen", "--per-class", 1, "--steps", 2,
            "--pairs", 0]
    proc = run_main(evaluate, *argv, "--batch-size", 4, capsys=capsys)
    assert proc.returncode == 1 and error_lines(proc) == [f"error: out of {where} memory: try --batch-size 2; the "
                                                          "images written so far are kept: the same command with it "
                                                          f"resumes ({tmp_path / 'gen'})"]
    assert len(glob.glob(str(tmp_path / "gen" / "*" / "*.png"))) == 4
    monkeypatch.undo()
    assert run_main(evaluate, *argv, "--batch-size", 2, capsys=capsys).returncode == 0
    assert len(glob.glob(str(tmp_path / "gen" / "*" / "*.png"))) == 16


def generated_pixels(folder):
    return {os.path.relpath(p, folder): np.array(Image.open(p)) for p in glob.glob(str(folder / "*" / "*.png"))}


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m-sde"])
def test_a_generated_image_depends_on_its_class_index_and_seed_not_on_the_batch_size_or_the_number_of_processes(
        sampler, tmp_path, capsys):
    write_our_checkpoint(tmp_path / "ckpt.pt")
    argv = ["--ckpt", tmp_path / "ckpt.pt", "--per-class", 2, "--steps", 3, "--sampler", sampler, "--pairs", 0]
    for batch in (3, 5):
        assert run_main(evaluate, "generate", *argv, "--batch-size", batch, "--out", tmp_path / f"b{batch}",
                        capsys=capsys).returncode == 0
    proc = run_script("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                      "evaluate.py", "generate", *argv, "--batch-size", 4, "--out", tmp_path / "two", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    three, five, two = (generated_pixels(tmp_path / name) for name in ("b3", "b5", "two"))
    assert len(three) == 32 and three.keys() == five.keys() == two.keys()
    assert all(np.array_equal(three[k], five[k]) and np.array_equal(three[k], two[k]) for k in three)
    assert not np.array_equal(three["00001/000000.png"], three["00001/000001.png"])   # each index its own noise


def test_sample_py_says_in_its_help_that_its_images_depend_on_num_samples():
    proc = run_script("sample.py", "--help")
    assert "an image depends on --num-samples" in " ".join(proc.stdout.split())


def test_statistics_of_a_folder_are_those_of_each_image_read_and_described_on_its_own(labelled_folder, inception_file,
                                                                                        tmp_path, capsys):
    """The per-superclass statistics `stats` writes equal the features of each image computed one by one, outside the
    project's loaders: the seeded network tells every image apart, so a feature given to another image's label, a
    wrong crop or a wrong layer changes them."""
    assert stats_cli("--data", "folder", "--data-path", labelled_folder, "--image-size", 12, "--out",
                     tmp_path / "r.npz", "--inception", inception_file[0], "--batch-size", 7, capsys=capsys).returncode == 0
    stats = np.load(tmp_path / "r.npz")
    net = FIDInceptionV3().eval()
    net.load_state_dict(inception_file[1])
    features = {}
    for path in sorted(glob.glob(str(labelled_folder / "*" / "*" / "*.png"))):
        image = Image.open(path).convert("RGB").resize((12, 12), Image.BICUBIC)     # ADM's resize of a 16 px square
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            features.setdefault(path.split(os.sep)[-3], []).append(net(x)[0].double().numpy())
    names = json.loads(str(stats["hierarchy"]))["superclass_names"]
    for s, name in enumerate(names):
        assert np.allclose(stats[f"mu_{s}"], np.mean(features[name], axis=0), rtol=1e-4, atol=1e-4)
    spread = np.linalg.norm(np.mean(features["Birds"], axis=0) - np.mean(features["Plants"], axis=0))
    assert spread > 1.0                                   # superclasses' images differ: a mix-up would be seen


RECORD_BATCHES = """import os, sys, torch
sys.path.insert(0, {here!r})
import train
step, seen = train.train_step, []
def recording(net, diffusion, opt, scaler, x, y, autocast):    # what reaches the DiT, as it reaches it
    seen.append((x.detach().cpu().clone(), y.detach().cpu().clone()))
    return step(net, diffusion, opt, scaler, x, y, autocast)
train.train_step = recording
try:
    train.main(sys.argv[2:])
finally:
    torch.save(seen, os.path.join(sys.argv[1], "rank" + os.environ.get("RANK", "0") + ".pt"))
"""


def batches_reaching_the_dit(tmp_path, *argv):
    """Train on 2 processes (torchrun, gloo) with the default DataLoader workers; [rank 0's, rank 1's] [(x, y)] of
    every step, as train_step received them."""
    (tmp_path / "record.py").write_text(RECORD_BATCHES.format(here=HERE))
    (tmp_path / "seen").mkdir()
    proc = run_script("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                      tmp_path / "record.py", tmp_path / "seen", *argv, "--run-dir", tmp_path / "run",
                      "--log-every", 1000, "--ckpt-every", 1000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp_path / "seen" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def assert_every_item_once_per_epoch(items, epochs, per_epoch, num_items):
    """items[rank][step]: the dataset indices a rank's step trained on; each epoch covers every item once."""
    for e in range(epochs):
        seen = [i for rank in items for step in rank[e * per_epoch:(e + 1) * per_epoch] for i in step]
        assert sorted(seen) == list(range(num_items)), f"epoch {e}"


def test_every_training_image_reaches_the_dit_once_per_epoch_across_ranks_flipped_half_the_time(tmp_path):
    toy = toy_module.toy_dataset("toy", 16, flip=False)                                   # 32 classes x 50, as trained on
    originals = torch.stack([toy[i][0] for i in range(len(toy))])                   # (1600, 3, 16, 16)
    lookup = {x.numpy().tobytes(): (i, False) for i, x in enumerate(originals)}
    lookup.update({x.flip(-1).numpy().tobytes(): (i, True) for i, x in enumerate(originals)})
    ranks = batches_reaching_the_dit(tmp_path, "--data", "toy", "--model", "DiT-T/4", "--image-size", 16,
                                     "--init", "none", "--global-batch-size", 64, "--max-steps", 50)
    found = [[[lookup[x.numpy().tobytes()] for x in xs] for xs, _ in rank] for rank in ranks]
    assert all(int(y) == toy.targets[i] for rank, seen in zip(ranks, found) for (_, ys), step in zip(rank, seen)
               for y, (i, _) in zip(ys, step))                                       # each image with its own class
    assert_every_item_once_per_epoch([[[i for i, _ in step] for step in rank] for rank in found], 2, 25, 1600)
    flips = {}
    for rank in found:
        for s, step in enumerate(rank):
            for i, flipped in step:
                flips.setdefault(i, []).append(flipped)
    assert 0.45 < np.mean([f for both in flips.values() for f in both]) < 0.55      # DiT's p = 1/2, on the fly
    assert 0.4 < np.mean([a == b for a, b in flips.values()]) < 0.6                 # drawn afresh every epoch


def test_every_cached_latent_reaches_the_dit_once_per_epoch_across_ranks_mirrored_half_the_time(tmp_path):
    write_tiny_vae(tmp_path / "vae")
    state = load_safetensors(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    state["quant_conv.bias"][4:] = -40.0                 # log-variance at the clamp: each latent is its mean
    save_safetensors(state, tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    proc = run_script("data.py", "cache", "--data", "toy", "--image-size", 16, "--vae", tmp_path / "vae", "--out",
                      tmp_path / "cache", "--batch-size", 400, "--num-workers", 0)
    assert proc.returncode == 0, proc.stderr
    moments = torch.from_numpy(np.load(tmp_path / "cache" / "moments.npy").astype(np.float32))   # (1600, 2, 8, 2, 2)
    candidates = (0.18215 * moments[:, :, :4]).reshape(3200, -1)      # item i: row 2i its image, 2i + 1 its mirror
    ranks = batches_reaching_the_dit(tmp_path, "--latent-cache", tmp_path / "cache", "--model", "DiT-T/2", "--init",
                                     "none", "--global-batch-size", 64, "--max-steps", 50)
    labels = np.load(tmp_path / "cache" / "labels.npy")
    found = []
    for rank in ranks:
        found.append([])
        for xs, ys in rank:
            distance, row = torch.cdist(xs.reshape(len(xs), -1), candidates).min(dim=1)
            assert distance.max() < 1e-4 and (labels[row // 2] == ys.numpy()).all()
            found[-1].append(row.tolist())
    assert_every_item_once_per_epoch([[[r // 2 for r in step] for step in rank] for rank in found], 2, 25, 1600)
    mirrored = [r % 2 for rank in found for step in rank for r in step]
    assert 0.45 < np.mean(mirrored) < 0.55                       # the stored mirror, drawn with p = 1/2


# ------------------------------------------------------------------------------------------------------------
# Pre-emption as schedulers send it, names that are not patterns, one writer per folder
# ------------------------------------------------------------------------------------------------------------

DEFAULT_WORKERS_TRAIN = ["--data", "toy", "--model", "DiT-T/4", "--image-size", "16", "--init", "none",
                         "--global-batch-size", "4", "--log-every", "1"]        # no --num-workers: the default


def start_in_its_own_group(argv, torchrun=False):
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"] if torchrun else []
    return subprocess.Popen([sys.executable, *launcher, os.path.join(HERE, "train.py"), *map(str, argv)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_log_lines(run_dir, lines, proc):
    for _ in range(1200):
        log = run_dir / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= lines:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("the run did not start training")


@pytest.mark.parametrize("torchrun", [False, True], ids=["1 process", "2 under torchrun"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_process_group_saves_and_the_run_resumes_bit_for_bit(signum, torchrun, tmp_path):
    """Slurm, torchrun and Ctrl-C signal every process of the group, the DataLoader workers too."""
    run_dir = tmp_path / "run"
    proc = start_in_its_own_group([*DEFAULT_WORKERS_TRAIN, "--max-steps", 100000, "--run-dir", run_dir], torchrun)
    wait_for_log_lines(run_dir, 3, proc)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    if not torchrun:
        assert proc.returncode == 75 and error_lines(subprocess.CompletedProcess([], 0, "", err)) == [], err
        assert f"stopped: {signal.Signals(signum).name} after step" in err
    saved = glob.glob(str(run_dir / "checkpoints" / "*.pt"))
    assert len(saved) == 1, err[-4000:]
    step = torch.load(saved[0], weights_only=True)["step"]
    assert step >= 3
    finish = ["--max-steps", step + 2, "--num-workers", 2]
    for argv, folder in ((["--resume", run_dir], run_dir), ([*DEFAULT_WORKERS_TRAIN, "--run-dir", tmp_path / "whole"],
                                                           tmp_path / "whole")):
        done = start_in_its_own_group([*argv, *finish], torchrun)
        assert done.wait(timeout=300) == 0, done.communicate()[1][-3000:]
    resumed, whole = (torch.load(folder / "checkpoints" / f"{step + 2:07d}.pt", weights_only=True)
                      for folder in (run_dir, tmp_path / "whole"))
    assert tensors_equal(resumed["model"], whole["model"]) and tensors_equal(resumed["ema"], whole["ema"])


def test_a_stop_signal_caught_while_the_ranks_compare_requests_stops_them_all_at_the_next_step(monkeypatch):
    """The signal lands during the all-reduce (as it did under torchrun, where ranks wait there): no rank had asked
    when the request was read, so none stops now, and every rank stops after the next step."""
    stop = hardening.StopRequest(world=1)
    stop.group = "world"                                                 # as with more ranks

    def all_reduce(asked, op, group):                                    # the others had not been asked either
        stop.signal = signal.SIGTERM                                     # the handler, mid-collective

    monkeypatch.setattr(hardening.dist, "all_reduce", all_reduce)
    assert not stop.agreed()
    monkeypatch.setattr(hardening.dist, "all_reduce", lambda asked, op, group: None)
    assert stop.agreed() and stop.name == "SIGTERM"


def test_a_run_killed_with_sigkill_resumes_at_once_though_its_workers_outlive_it(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_in_its_own_group([*DEFAULT_WORKERS_TRAIN, "--max-steps", 100000, "--ckpt-every", 2, "--run-dir",
                                   run_dir])
    wait_for_log_lines(run_dir, 4, proc)
    proc.kill()                                  # kill -9 of the main process alone: its workers are orphaned
    proc.wait()
    newest = max(glob.glob(str(run_dir / "checkpoints" / "*.pt")))
    step = torch.load(newest, weights_only=True)["step"]
    assert run_train("--resume", run_dir, "--max-steps", step + 1, "--num-workers", 0)["step"] == step + 1
    os.killpg(proc.pid, signal.SIGKILL)          # the orphans, if any are left


def test_a_run_folder_named_like_a_pattern_is_found_by_name_and_never_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "exp[1]"
    argv = [*TINY_TRAIN, "--init", "none", "--global-batch-size", 4, "--ckpt-every", 1, "--log-every", 1]
    run_train(*argv, "--max-steps", 2, "--run-dir", run_dir)
    kept = lambda: {name: content for name, content in file_contents(run_dir).items() if name != ".lock"}
    before = kept()
    with pytest.raises(UserError, match=re.escape(f"{run_dir} already holds checkpoints")):
        run_train(*argv, "--max-steps", 1, "--seed", 1, "--run-dir", run_dir)
    assert kept() == before                              # no checkpoint or log line touched (.lock: who held it)
    proc = run_main(sample_module, "--ckpt", run_dir, "--class-id", 3, "--guidance", "null", "--steps", 2, "--out",
                    tmp_path / "s.png", capsys=capsys)
    assert proc.returncode == 0 and f"from {run_dir / 'checkpoints' / '0000002.pt'}" in proc.stderr
    assert run_train("--resume", run_dir, "--max-steps", 3)["step"] == 3


def test_every_path_flag_takes_names_with_brackets_stars_and_question_marks(labelled_folder, inception_file, tmp_path,
                                                                             capsys):
    odd = tmp_path / "a[1]*?b"
    for superclass in ("Birds", "Fungi"):                              # 3 classes, 18 images
        shutil.copytree(labelled_folder / superclass, odd / "images[1]" / superclass)
    write_tiny_vae(odd / "vae?")
    shutil.copy(inception_file[0], odd / "inception[1].pth")
    common = ["--data", "folder", "--data-path", odd / "images[1]", "--vae", odd / "vae?", "--model", "DiT-T/2",
              "--image-size", 16, "--global-batch-size", 4, "--num-workers", 0]
    run = run_train(*common, "--init", "none", "--max-steps", 2, "--run-dir", odd / "run*")
    assert run_train("--resume", odd / "run*", "--max-steps", 3)["step"] == 3
    assert run_train("--resume", odd / "run*", "--export", odd / "x[1].pt")["step"] == 3
    assert run_train(*common, "--init", odd / "x[1].pt", "--max-steps", 1, "--results-dir", odd / "res*")["step"] == 1
    def ok(module, *argv):
        proc = run_main(module, *argv, capsys=capsys)
        assert proc.returncode == 0, proc.stderr
        return True
    assert ok(sample_module, "--ckpt", odd / "run*", "--class-id", 1, "--guidance", "null", "--steps", 2, "--out",
              odd / "s[1].png", "--per-sample-dir", odd / "each?")
    assert os.listdir(odd / "each?") and (odd / "s[1].png").exists()
    assert ok(data, "cache", "--data", "folder", "--data-path", odd / "images[1]", "--image-size", 16, "--vae",
              odd / "vae?", "--out", odd / "cache[2]", "--num-workers", 0)
    assert run_train("--latent-cache", odd / "cache[2]", "--vae", odd / "vae?", "--model", "DiT-T/2", "--init", "none",
                     "--global-batch-size", 4, "--num-workers", 0, "--max-steps", 1, "--run-dir", odd / "run?2")
    assert ok(evaluate, "generate", "--ckpt", run["final_ckpt"], "--vae", odd / "vae?", "--out", odd / "gen[3]",
              "--per-class", 2, "--guidance", "null", "--steps", 2, "--pairs", 0, "--npz", odd / "g*.npz")
    assert ok(evaluate, "stats", "--data", "folder", "--data-path", odd / "images[1]", "--image-size", 16, "--out",
              odd / "r?.npz", "--inception", odd / "inception[1].pth", "--workers", 0)
    assert ok(evaluate, "fid", "--real", odd / "r?.npz", "--fake", odd / "gen[3]", "--inception",
              odd / "inception[1].pth", "--out-csv", odd / "t*.csv", "--out-json", odd / "t[1].json", "--workers", 0,
              "--pairs", 0, "--overall-only")
    assert json.loads((odd / "t[1].json").read_text())["rows"][-1]["count_fake"] == 6
    assert ok(evaluate, "embeddings", "--ckpt", odd / "run*", "--out", odd / "e[1].png", "--iters", 50)
    assert ok(evaluate, "curves", "--runs", odd / "run*", "--out", odd / "c?.png")
    assert ok(evaluate, "grid", "--ckpt", odd / "run*", "--vae", odd / "vae?", "--class-ids", 0, 1, "--steps", 2,
              "--out", odd / "g[1].png")


def test_generate_over_a_folder_linked_out_of_out_deletes_nothing_outside(tmp_path, capsys):
    write_our_checkpoint(tmp_path / "ckpt.pt")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "000000.png").write_bytes(b"somebody else's image")
    argv = ["generate", "--ckpt", tmp_path / "ckpt.pt", "--out", tmp_path / "gen", "--per-class", 1, "--steps", 2,
            "--pairs", 0]
    assert run_main(evaluate, *argv, capsys=capsys).returncode == 0
    shutil.rmtree(tmp_path / "gen" / "00003")
    os.symlink(outside, tmp_path / "gen" / "00003")          # a class folder that leads out of --out
    proc = run_main(evaluate, *argv, "--cfg-scale", 2, "--overwrite", capsys=capsys)
    assert_one_line_error(proc, "samples.json", "00003/000000.png", "not [a file name inside")
    assert (outside / "000000.png").read_bytes() == b"somebody else's image"


def test_a_second_generate_into_a_folder_in_use_is_refused_and_a_resume_redraws_what_other_settings_drew(tmp_path,
                                                                                                       capsys):
    write_our_checkpoint(tmp_path / "ckpt.pt")
    gen = tmp_path / "gen"
    argv = ["generate", "--ckpt", tmp_path / "ckpt.pt", "--out", gen, "--per-class", 1, "--steps", 2, "--pairs", 0]
    holder = subprocess.Popen([sys.executable, os.path.join(HERE, "evaluate.py"), *map(str, argv[:-6]), "--per-class",
                               "200", "--steps", "50", "--seed", "1"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):                                   # it holds the folder once its manifest is written
            if (gen / "samples.json").exists():
                break
            time.sleep(0.1)
        proc = run_main(evaluate, *argv, "--seed", 2, capsys=capsys)
        assert_one_line_error(proc, f"{gen} is in use by another evaluate.py generate (pid {holder.pid} on")
    finally:
        holder.kill()
        holder.wait()
    shutil.rmtree(gen)
    assert run_main(evaluate, *argv, "--seed", 1, capsys=capsys).returncode == 0
    seed_1 = generated_pixels(gen)
    manifest = json.loads((gen / "samples.json").read_text())
    manifest["made_by"]["seed"] = 2            # a manifest that says seed 2 over images of seed 1 (the race's result)
    (gen / "samples.json").write_text(json.dumps(manifest))
    assert run_main(evaluate, *argv, "--seed", 2, capsys=capsys).returncode == 0
    assert run_main(evaluate, *argv, "--seed", 2, "--out", tmp_path / "fresh", capsys=capsys).returncode == 0
    redrawn, fresh = generated_pixels(gen), generated_pixels(tmp_path / "fresh")
    assert all(np.array_equal(redrawn[k], fresh[k]) and not np.array_equal(redrawn[k], seed_1[k]) for k in fresh)


def child_processes():
    """The pids of this process's children (Linux's /proc)."""
    pids = []
    for task in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        pids += [int(p) for p in open(task).read().split()]
    return pids


def test_the_stop_save_is_written_even_if_a_dataloader_worker_dies_while_it_saves(tmp_path, monkeypatch, capsys):
    signal_at_step(monkeypatch, 2)
    save, killed = train.save, []

    def save_while_workers_die(run):                          # a worker that dies now must not break the save
        for pid in child_processes():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.5)                                       # torch's SIGCHLD handler would raise by now
        save(run)
    monkeypatch.setattr(train, "save", save_while_workers_die)
    proc = run_main(train, *TINY_TRAIN[:-4], "--num-workers", 2, "--init", "none", "--global-batch-size", 4,
                    "--max-steps", 5, "--run-dir", tmp_path / "run", capsys=capsys)
    assert proc.returncode == 75 and "stopped: SIGTERM after step 2" in proc.stderr, proc.stderr
    assert torch.load(tmp_path / "run" / "checkpoints" / "0000002.pt", weights_only=True)["step"] == 2


def test_a_stop_request_that_lands_just_after_the_ranks_agreed_is_taken_at_the_next_step_and_saved(tmp_path,
                                                                                                   monkeypatch, capsys):
    agreed, calls = hardening.StopRequest.agreed, []

    def agreed_then_signalled(self):                    # SIGTERM arrives right after the ranks' answer for step 2
        answer = agreed(self)
        calls.append(answer)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return answer
    monkeypatch.setattr(hardening.StopRequest, "agreed", agreed_then_signalled)
    proc = run_main(train, *TINY_TRAIN, "--init", "none", "--global-batch-size", 4, "--max-steps", 10, "--run-dir",
                    tmp_path / "run", capsys=capsys)
    assert proc.returncode == 75 and "stopped: SIGTERM after step 3" in proc.stderr, proc.stderr
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["0000003.pt"]


# ------------------------------------------------------------------------------------------------------------
# Tiers beyond the superclass: ranks in the hierarchy, their rows in the label table, guidance from any of them
# ------------------------------------------------------------------------------------------------------------

INAT_RANKED = {  # folder name -> (json supercategory, genus, family): a beech and two oaks of one family, a sunfish
    "05729_Plantae_Tracheophyta_Magnoliopsida_Fagales_Fagaceae_Fagus_sylvatica": ("Plants", "Fagus", "Fagaceae"),
    "05730_Plantae_Tracheophyta_Magnoliopsida_Fagales_Fagaceae_Quercus_alba": ("Plants", "Quercus", "Fagaceae"),
    "05731_Plantae_Tracheophyta_Magnoliopsida_Fagales_Fagaceae_Quercus_rubra": ("Plants", "Quercus", "Fagaceae"),
    "02756_Animalia_Chordata_Actinopterygii_Perciformes_Centrarchidae_Lepomis_macrochirus":
        ("Ray-finned Fishes", "Lepomis", "Centrarchidae"),
}


def make_ranked_inat21(root):
    """iNat21's layout with a json whose categories carry their whole taxonomy, as the published one does."""
    categories = []
    for k, folder in enumerate(sorted(INAT_RANKED)):
        for j in range(2):
            write_image(os.path.join(root, "train_mini", folder, f"img{j}.jpg"), (50 * k, 90, 30 * j))
        supercategory, genus, family = INAT_RANKED[folder]
        _, kingdom, phylum, klass, order, _, _, epithet = folder.split("_")
        categories.append({"id": int(folder[:5]), "name": f"{genus} {epithet}", "supercategory": supercategory,
                           "kingdom": kingdom, "phylum": phylum, "class": klass, "order": order, "family": family,
                           "genus": genus, "specific_epithet": epithet, "image_dir_name": folder})
    with open(os.path.join(root, "train_mini.json"), "w", encoding="utf-8") as f:
        json.dump(dict(categories=categories, images=[], annotations=[]), f)


def test_an_inat21_json_puts_each_species_in_its_genus_and_family_and_the_table_gets_a_row_for_each(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_ranked_inat21("data/inat21")
    os.makedirs("pretrained")
    torch.save(DiT_models["DiT-T/2"](input_size=2, num_classes=1000).state_dict(), "pretrained/DiT-XL-2-256x256.pt")
    write_tiny_vae("pretrained/sd-vae-ft-ema")
    proc = run_main(train, "--data", "inat21", "--tiers", "genus,family,superclass", "--max-steps", "1",
                    "--global-batch-size", "2", "--num-workers", "0", "--run-dir", "run", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    model, _ = load_model("run")
    # ids by folder name: the sunfish (02756) first, then beech, oak, oak
    assert model.hierarchy["class_names"] == ["Lepomis macrochirus", "Fagus sylvatica", "Quercus alba", "Quercus rubra"]
    ranks = {r["rank"]: [r["names"][i] for i in r["of"]] for r in model.hierarchy["ranks"]}
    assert ranks["genus"] == ["Lepomis", "Fagus", "Quercus", "Quercus"]
    assert ranks["family"] == ["Centrarchidae", "Fagaceae", "Fagaceae", "Fagaceae"]
    assert ranks["kingdom"] == ["Animalia", "Plantae", "Plantae", "Plantae"]
    assert [model.hierarchy["superclass_names"][s] for s in model.hierarchy["superclass_of"]] == \
        ["Ray-finned Fishes", "Plants", "Plants", "Plants"]
    emb, y = model.y_embedder, torch.arange(4)
    assert emb.embedding_table.weight.shape[0] == 4 + 3 + 2 + 11      # species, genera, families, superclasses
    assert emb.tier_ids(y, "genus").tolist() == [4, 5, 6, 6]
    assert emb.tier_ids(y, "family").tolist() == [7, 8, 8, 8]
    assert emb.tier_ids(y, "superclass").tolist() == [9 + 6, 9 + 0, 9 + 0, 9 + 0]    # the authors' superclass order


def test_a_hierarchy_csv_names_its_ranks_in_its_header_and_the_superclass_comes_last(tmp_path, capsys):
    species = {"Quercus alba": ("Quercus", "Fagaceae", "Plants"), "Quercus rubra": ("Quercus", "Fagaceae", "Plants"),
               "Fagus sylvatica": ("Fagus", "Fagaceae", "Plants"),
               "Lepomis macrochirus": ("Lepomis", "Centrarchidae", "Ray-finned Fishes")}
    for k, name in enumerate(species):
        write_image(str(tmp_path / "flat" / name / "a.jpg"), (60 * k, 20, 20))
    with open(tmp_path / "tree.csv", "w", encoding="utf-8") as f:
        f.write("class,genus,family,superclass\n" + "".join(f"{c},{','.join(v)}\n" for c, v in species.items()))
    ds = data.build_dataset("folder", str(tmp_path / "flat"), image_size=16, hierarchy_csv=str(tmp_path / "tree.csv"))
    h = ds.hierarchy()
    assert [r["rank"] for r in h["ranks"]] == ["genus", "family"]
    for rank, column in (("genus", 0), ("family", 1), ("superclass", 2)):
        names, of = model_module.nodes_at(h, rank)
        assert [names[i] for i in of] == [species[c][column] for c in h["class_names"]]
    proc = run_main(data, "info", "--data", "folder", "--data-path", tmp_path / "flat", "--hierarchy-csv",
                    tmp_path / "tree.csv", capsys=capsys)
    assert "4 classes, 3 genus nodes, 2 family nodes, 2 superclasses" in proc.stdout, proc.stdout


def test_a_three_column_csv_without_a_header_is_one_error_line(tmp_path, capsys):
    write_image(str(tmp_path / "flat" / "Quercus alba" / "a.jpg"))
    (tmp_path / "tree.csv").write_text("Quercus alba,Quercus,Plants\n")
    proc = run_main(data, "info", "--data", "folder", "--data-path", tmp_path / "flat", "--hierarchy-csv",
                    tmp_path / "tree.csv", capsys=capsys)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        f"error: {tmp_path / 'tree.csv'}:1: expected `class,superclass`, got 'Quercus alba,Quercus,Plants'"


@pytest.mark.parametrize("header", ["class,superclass,genus", "class,genus,genus,superclass"])
def test_a_csv_header_that_names_a_rank_twice_or_the_superclass_before_the_last_column_is_one_error_line(
        tmp_path, capsys, header):
    write_image(str(tmp_path / "flat" / "Quercus alba" / "a.jpg"))
    (tmp_path / "tree.csv").write_text(f"{header}\n" + ",".join(["Quercus alba", "Quercus", "Quercus", "Plants"]
                                                                [:len(header.split(","))]) + "\n")
    proc = run_main(data, "info", "--data", "folder", "--data-path", tmp_path / "flat", "--hierarchy-csv",
                    tmp_path / "tree.csv", capsys=capsys)
    assert_one_line_error(proc, f"its header '{header}' must name each rank once, the superclass last")


def test_blank_lines_before_a_csv_header_are_skipped_as_blank_lines_anywhere(tmp_path):
    for name in ("Quercus alba", "Lepomis macrochirus"):
        write_image(str(tmp_path / "flat" / name / "a.jpg"))
    rows = "class,genus,superclass\nQuercus alba,Quercus,Plants\nLepomis macrochirus,Lepomis,Ray-finned Fishes\n"
    hierarchies = []
    for k, text in enumerate([rows, "\n\n" + rows]):
        (tmp_path / f"{k}.csv").write_text(text)
        hierarchies.append(data.build_dataset("folder", str(tmp_path / "flat"), image_size=16,
                                              hierarchy_csv=str(tmp_path / f"{k}.csv")).hierarchy())
    assert hierarchies[0] == hierarchies[1] and hierarchies[0]["class_names"] == ["Quercus alba", "Lepomis macrochirus"]


def toy_embedder(superclass_prob, tier_probs=None, tiers=("genus", "superclass")):
    toy = toy_module.ToyDataset("toy", image_size=8, images_per_class=1).hierarchy()
    sizes = {r: len(model_module.nodes_at(toy, r)[0]) for r in tiers}
    return model_module.TieredEmbedder(32, 8, sizes, toy, null_class=False, superclass_prob=superclass_prob,
                                       tier_probs=tier_probs), toy


@pytest.mark.parametrize("tier_probs, genus_share", [(None, 0.5), ([1.0, 3.0], 0.25)])
def test_substitution_swaps_a_label_for_its_own_node_at_each_tier_at_the_rate_asked(tier_probs, genus_share):
    emb, toy = toy_embedder(0.3, tier_probs)
    torch.manual_seed(0)
    y = torch.randint(0, 32, (200_000,))
    out = emb.substitute(y)
    genus, superclass = torch.tensor(toy["ranks"][0]["of"]), torch.tensor(toy["superclass_of"])
    to_genus, to_super = out == 32 + genus[y], out == 32 + 16 + superclass[y]
    assert ((out == y) | to_genus | to_super).all()                  # a label's own genus or superclass, or itself
    sigma = math.sqrt(0.25 / len(y))
    assert abs(to_genus.float().mean().item() - 0.3 * genus_share) < 5 * sigma
    assert abs(to_super.float().mean().item() - 0.3 * (1 - genus_share)) < 5 * sigma


def test_the_paper_s_one_tier_draws_the_same_substitutions_as_before_tiers_existed():
    emb, toy = toy_embedder(0.1, tiers=("superclass",))
    torch.manual_seed(3)
    y = torch.randint(0, 32, (1000,))
    out = emb.substitute(y)
    torch.manual_seed(3)                                       # the paper's rule, written out: one uniform per label
    torch.randint(0, 32, (1000,))
    expected = torch.where(torch.rand(1000) < 0.1, 32 + torch.tensor(toy["superclass_of"])[y], y)
    assert torch.equal(out, expected)


@pytest.fixture(scope="module")
def tiered_delta(tmp_path_factory):
    """A FineDiffusion run with --tiers genus,superclass on the toy data, from a base trained on toy-base: a delta."""
    root = tmp_path_factory.mktemp("tiered")
    base = run_train(*TINY_TRAIN, "--data", "toy-base", "--init", "none", "--global-batch-size", "4", "--max-steps", "1",
                     "--run-dir", root / "base")["final_ckpt"]
    run_train(*TINY_TRAIN, "--init", base, "--tiers", "genus,superclass", "--global-batch-size", "4", "--max-steps",
              "2", "--ckpt-every", "1", "--run-dir", root / "fine")
    return root / "fine"


@pytest.mark.parametrize("guidance", ["genus", "superclass"])
def test_sample_py_guides_from_the_rank_asked_and_the_console_names_the_row_and_node_the_dit_receives(
        tiered_delta, tmp_path, capsys, label_lookups, guidance):
    names = toy_module.ToyDataset("toy", images_per_class=1).class_names
    proc = run_main(sample_module, "--ckpt", tiered_delta, "--class-id", 29, "--guidance", guidance, "--num-samples", 2,
                    "--steps", 2, "--out", tmp_path / "s.png", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    conditional, guide = guide_halves(label_lookups)
    # rows: 32 species, then 16 genera (a genus: a shape and pattern, in both tints), then 8 shape families
    row, node = dict(genus=(32 + 29 // 2, names[29].rsplit("/", 1)[0]),
                     superclass=(32 + 16 + 29 // 4, names[29].split("/")[0]))[guidance]
    assert (conditional == 29).all() and (guide == row).all()
    assert f"guided by {guidance} row {row} ({node}), w = 4" in proc.stderr


@pytest.mark.parametrize("command", ["grid", "generate"])
def test_grid_and_generate_guide_from_the_genus_rows(tiered_delta, tmp_path, capsys, label_lookups, command):
    argv = dict(grid=("grid", "--class-ids", 0, 5, 29, "--out", tmp_path / "g.png"),
                generate=("generate", "--per-class", 1, "--out", tmp_path / "gen"))[command]
    proc = run_main(evaluate, *argv, "--ckpt", tiered_delta, "--guidance", "genus", "--steps", 2, capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    conditional, guide = guide_halves(label_lookups)
    assert guide.tolist() == [32 + c // 2 for c in conditional.tolist()]


def test_a_tiered_run_resumes_and_still_guides_from_its_genus_rows(tiered_delta, tmp_path, capsys, label_lookups):
    run = tmp_path / "run"
    shutil.copytree(tiered_delta, run)
    assert run_train("--resume", run / "checkpoints" / "0000001.pt", "--max-steps", 3)["step"] == 3
    label_lookups.clear()
    proc = run_main(sample_module, "--ckpt", run, "--class-id", 6, "--guidance", "genus", "--num-samples", 1,
                    "--steps", 2, "--out", tmp_path / "s.png", capsys=capsys)
    assert proc.returncode == 0 and "from " + str(run / "checkpoints" / "0000003.pt") in proc.stderr, proc.stderr
    assert (guide_halves(label_lookups)[1] == 32 + 3).all()
    assert_one_line_error(run_main(train, "--resume", run / "checkpoints" / "0000003.pt", "--tiers", "superclass",
                                   "--max-steps", 4, capsys=capsys),
                          "--tiers superclass: the resumed run has genus,superclass and cannot change it")


def test_train_substitutes_to_the_tier_tier_probs_asks_for(tmp_path, capsys, label_lookups):
    base = run_train(*TINY_TRAIN, "--data", "toy-base", "--init", "none", "--global-batch-size", "4", "--max-steps", "1",
                     "--run-dir", tmp_path / "base")["final_ckpt"]
    for probs, block in (("1,0", range(32, 48)), ("0,1", range(48, 56))):
        label_lookups.clear()
        run_train(*TINY_TRAIN, "--init", base, "--tiers", "genus,superclass", "--superclass-prob", 1, "--tier-probs",
                  probs, "--global-batch-size", "4", "--max-steps", "2", "--run-dir", tmp_path / probs)
        trained = torch.cat([rows for _, rows in label_lookups[:2]])        # the two steps' labels, as looked up
        assert len(trained) == 8 and all(r in block for r in trained.tolist()), (probs, trained)


@pytest.mark.parametrize("flags, words", [(["--tiers", "family,superclass"], ["no rank family", "genus, superclass"]),
                                          (["--tiers", "genus,superclass", "--tier-probs", "1"], ["1 weights", "2 tiers"]),
                                          (["--tiers", "genus,genus"], ["distinct ranks"]),
                                          (["--tiers", "genus,superclass", "--table", "null"], ["--table tiered"])])
def test_tiers_the_data_does_not_have_are_one_error_line(tmp_path, capsys, flags, words):
    proc = run_main(train, *TINY_TRAIN, "--init", "none", "--tune", "finediffusion", *flags, "--max-steps", 1,
                    "--run-dir", tmp_path / "run", capsys=capsys)
    assert_one_line_error(proc, *words)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_the_default_tiers_make_the_same_checkpoint_as_naming_the_superclass(tmp_path):
    runs = [run_train(*TINY_TRAIN, "--init", "none", *flag, "--global-batch-size", "4", "--max-steps", "2",
                      "--run-dir", tmp_path / str(k))["final_ckpt"] for k, flag in enumerate([[], ["--tiers", "superclass"]])]
    a, b = (torch.load(path, weights_only=True) for path in runs)
    assert a["config"] == b["config"] and "tiers" not in a["config"]
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_a_checkpoint_whose_hierarchy_has_no_ranks_resumes_on_data_that_has_them(tmp_path):
    out = run_train(*TINY_TRAIN, "--init", "none", "--global-batch-size", "4", "--max-steps", "1", "--ckpt-every", "1",
                    "--run-dir", tmp_path / "run")
    ckpt = torch.load(out["final_ckpt"], weights_only=True)
    ckpt["hierarchy"] = {k: ckpt["hierarchy"][k] for k in ("class_names", "superclass_names", "superclass_of")}
    torch.save(ckpt, out["final_ckpt"])                           # as written before ranks existed
    assert run_train("--resume", out["final_ckpt"], "--max-steps", 2)["step"] == 2


def test_a_hierarchy_whose_rank_points_past_its_nodes_is_one_error_line(tmp_path, capsys):
    path = toy_checkpoint(tmp_path / "fd.pt", "finediffusion", tiers=["genus", "superclass"])
    ckpt = torch.load(path, weights_only=True)
    ckpt["hierarchy"]["ranks"][0]["of"][5] = 16                  # genus 16 of 16
    torch.save(ckpt, path)
    proc = run_main(sample_module, "--ckpt", path, "--class-id", 1, "--steps", 2, "--out", tmp_path / "s.png",
                    capsys=capsys)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(f"error: {path}: its hierarchy is damaged"), proc.stderr


def test_embeddings_report_the_neighbour_share_at_every_rank(tmp_path):
    path = toy_checkpoint(tmp_path / "fd.pt", "finediffusion", tiers=["genus", "superclass"])
    ckpt = torch.load(path, weights_only=True)
    table = ckpt["model"][model_module.LABEL_TABLE]                # 32 species, 16 genera, 8 superclasses
    with torch.no_grad():                                         # each species beside its genus' other tint
        table[:32] = 10 * torch.randn(16, table.shape[1]).repeat_interleave(2, 0) + torch.randn(32, table.shape[1])
    torch.save(ckpt, path)
    evaluate.main(["embeddings", "--ckpt", path, "--out", str(tmp_path / "f.png"), "--neighbours", "1",
                   "--iters", "250", "--device", "cpu"])
    with open(tmp_path / "f.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["same_genus_original"]) == 1.0 and float(row["chance_genus"]) == pytest.approx(1 / 31)
    assert float(row["same_superclass_original"]) == 1.0          # a genus lies inside its shape family


def test_tint_accuracy_is_the_classifiers_choice_between_the_two_species_of_the_true_genus():
    labels = torch.tensor([0, 0, 5, 5, 29, 29])
    logits = torch.zeros(6, 32)
    for i, ranked in enumerate([[0], [1], [9, 5, 4], [9, 4, 5], [29], [28]]):   # each image's classes, best first
        logits[i, ranked] = torch.arange(len(ranked), 0, -1, dtype=torch.float)

    class Net:                                     # a classifier whose choices are known: the logits above
        def __call__(self, x):
            return logits, torch.randn(6, 4, generator=torch.Generator().manual_seed(0))

        def feature_maps(self, x):
            return [x]

    hierarchy = toy_module.ToyDataset("toy", image_size=8, images_per_class=1).hierarchy()
    found = toy_module.toy_metrics(Net(), torch.randn(6, 3, 4, 4), labels, hierarchy, np.random.randn(50, 4), pairs=6)
    # species 2k and 2k+1 form genus k: right tint in images 0, 2 (9 is another genus; 5 beats 4) and 4
    assert found["tint_acc"] == pytest.approx(3 / 6) and found["sub_acc"] == pytest.approx(2 / 6)

"""Tests for evaluate.py: Frechet distance, the FID Inception, per-superclass statistics, LPIPS and the CLI.

All weights are random and written by the tests in the published key layouts (nothing is downloaded);
images are tiny. Run: python -m pytest -q test_evaluate_part.py
"""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.models import alexnet
from torchvision.models.inception import Inception3

import evaluate
from evaluate import (EvalError, FIDInceptionV3, LPIPS, compute_stats, feature_stats, fid_table, frechet_distance,
                      inception_features, load_inception, lpips_diversity, open_images, sample_pairs)

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """Random FID-Inception weights in the published layout, with BatchNorm statistics moved off identity."""
    torch.manual_seed(0)
    state = FIDInceptionV3().state_dict()
    for key, value in state.items():
        if key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
        elif key.endswith("running_mean") or key.endswith("bn.bias"):
            value.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("weights") / evaluate.FID_WEIGHTS
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random AlexNet (torchvision layout) and non-negative LPIPS heads (lin{i}.model.1.weight, [1, C, 1, 1])."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lpips")
    torch.save(alexnet().state_dict(), folder / evaluate.ALEXNET_WEIGHTS)
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS.channels)}
    torch.save(lins, folder / evaluate.LPIPS_LIN_WEIGHTS)
    return folder / evaluate.ALEXNET_WEIGHTS, folder / evaluate.LPIPS_LIN_WEIGHTS


class MeanColour(nn.Module):
    """Stand-in feature extractor (3-d): keeps grouping tests fast and their covariances full rank."""

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # [N, 3]


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


def test_feature_stats_is_mean_and_unbiased_covariance():
    features = np.random.default_rng(3).standard_normal((30, 4))
    mu, sigma = feature_stats(features)
    assert np.allclose(mu, features.mean(0)) and np.allclose(sigma, np.cov(features.T, ddof=1))


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
    assert torch.equal(evaluate.tf_avg_pool(torch.ones(1, 1, 4, 4)), torch.ones(1, 1, 4, 4))


@pytest.fixture
def one_thread():
    """Tiny batches run faster on one thread; on a busy 2-core machine, thread hand-offs cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    with pytest.raises(EvalError, match="Mixed_6c.branch7x7_2.conv.weight"):
        load_inception(str(tmp_path / "broken.pth"))


def test_missing_inception_weights_error_names_the_published_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EvalError, match="pt_inception-2015-12-05-6726825d.pth") as error:
        load_inception()
    assert "github.com/mseitzer/pytorch-fid/releases" in str(error.value)


def test_inception_weights_are_found_in_torch_home(inception_file, tmp_path, monkeypatch):
    path, _ = inception_file
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    os.symlink(path, tmp_path / "hub" / "checkpoints" / evaluate.FID_WEIGHTS)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert isinstance(load_inception(), FIDInceptionV3)


def test_inception_features_accept_a_tensor_or_a_loader_of_uint8_batches():
    model = MeanColour()
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    from_loader = inception_features(model, [(images[:3], None), (images[3:], None)], "cpu", progress=False)
    from_tensor = inception_features(model, images.float() / 255, "cpu", batch_size=2, progress=False)
    assert from_loader.shape == (5, 3) and np.allclose(from_loader, from_tensor, atol=1e-6)


# ---- per-superclass statistics and the Table 1 layout -----------------------------------------------------------

def test_two_level_folder_gives_classes_and_superclasses(labelled_folder):
    source = open_images(str(labelled_folder), image_size=0)
    assert source.superclass_names == ["Birds", "Fungi", "Plants"]
    assert len(source) == 30 and len(set(source.labels)) == 5
    assert list(np.bincount(source.superclasses)) == [12, 6, 12]


def test_class_folders_take_superclasses_from_a_hierarchy_file(tmp_path):
    for class_dir in ("00000_a", "00001_b", "00002_c"):
        (tmp_path / "gen" / class_dir).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "gen" / class_dir / "0.png")
    (tmp_path / "h.json").write_text(json.dumps({"superclass_names": ["Fungi", "Birds"], "superclass_of": [1, 0, 1]}))
    source = open_images(str(tmp_path / "gen"), 0, evaluate.load_hierarchy(str(tmp_path / "h.json")))
    assert list(source.labels) == [0, 1, 2] and list(source.superclasses) == [1, 0, 1]


def test_stats_are_grouped_per_superclass(labelled_folder):
    stats = compute_stats(open_images(str(labelled_folder), 0), MeanColour(), progress=False)
    assert int(stats["count"]) == 30 and list(stats["superclass_names"]) == ["Birds", "Fungi", "Plants"]
    assert [int(stats[f"count_{s}"]) for s in range(3)] == [12, 6, 12]
    assert stats["mu_1"].shape == (3,) and stats["sigma_1"].shape == (3, 3)
    assert stats["mu_2"][0] > stats["mu_0"][0]  # Plants were tinted redder than Birds


def test_fid_table_has_every_superclass_then_overall(labelled_folder):
    stats = compute_stats(open_images(str(labelled_folder), 0), MeanColour(), progress=False)
    rows = fid_table(stats, stats)
    assert [r["superclass"] for r in rows] == ["Birds", "Fungi", "Plants", "Overall"]
    assert all(abs(r["fid"]) < 1e-6 for r in rows)


def test_fid_table_needs_per_superclass_reference_statistics(labelled_folder):
    stats = compute_stats(open_images(str(labelled_folder), 0), MeanColour(), progress=False)
    overall_only = {k: stats[k] for k in ("mu", "sigma", "count")}
    with pytest.raises(EvalError, match="per-superclass"):
        fid_table(overall_only, stats)
    assert [r["superclass"] for r in fid_table(overall_only, stats, overall_only=True)] == ["Overall"]


def test_npz_images_carry_labels_and_hierarchy(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "fake.npz", arr_0=images, labels=np.array([0, 0, 1, 1, 2, 2]),
             superclass_of=np.array([1, 0, 1]), superclass_names=np.array(["Insects", "Birds"]))
    source = open_images(str(tmp_path / "fake.npz"))
    assert list(source.superclasses) == [1, 1, 0, 0, 1, 1]
    image, label = source[2]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and label == 1


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
    with pytest.raises(EvalError, match="lin3.model.1.weight"):
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

def run_cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), *args], capture_output=True,
                          text=True, cwd=cwd, env=env)


def test_cli_on_a_missing_file_exits_2_with_one_error_line(tmp_path):
    result = run_cli("fid", "--real", str(tmp_path / "missing.npz"), "--fake", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert "missing.npz" in result.stderr and "Traceback" not in result.stderr


def test_cli_without_inception_weights_names_the_file_and_exits_2(labelled_folder, tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path)}
    result = run_cli("stats", "--images", str(labelled_folder), "--out", str(tmp_path / "ref.npz"), cwd=tmp_path,
                     env=env)
    assert result.returncode == 2 and "pt_inception-2015-12-05-6726825d.pth" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_unreadable_image_in_a_worker_is_one_error_line(labelled_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_inception", lambda path=None: MeanColour())
    (labelled_folder / "Birds" / "wren" / "9.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["stats", "--images", str(labelled_folder), "--out", str(tmp_path / "ref.npz"),
                       "--image-size", "16", "--workers", "1"])
    stderr = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and stderr[-1].startswith("error: cannot read image") and "9.png" in stderr[-1]
    assert not any("Traceback" in line for line in stderr)


def test_cli_stats_then_fid_writes_table1_csv_and_json(labelled_folder, lpips_files, tmp_path, monkeypatch,
                                                       one_thread):
    monkeypatch.setattr(evaluate, "load_inception", lambda path=None: MeanColour())
    ref = tmp_path / "ref.npz"
    evaluate.main(["stats", "--images", str(labelled_folder), "--out", str(ref), "--image-size", "64",
                   "--workers", "0"])
    assert {"mu", "sigma", "count", "superclass_names", "mu_0", "sigma_2", "count_1"} <= set(np.load(ref).files)
    evaluate.main(["fid", "--real", str(ref), "--fake", str(labelled_folder), "--image-size", "64",
                   "--workers", "0", "--lpips-alex", str(lpips_files[0]), "--lpips-lin", str(lpips_files[1]),
                   "--pairs", "20", "--out-csv", str(tmp_path / "t.csv"), "--out-json", str(tmp_path / "t.json")])
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["superclass"] for r in rows] == ["Birds", "Fungi", "Plants", "Overall"]
    assert abs(rows[-1]["fid"]) < 1e-6 and rows[-1]["lpips"] > 0
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == "superclass,fid,lpips,count_real,count_fake"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic writes left no temp files

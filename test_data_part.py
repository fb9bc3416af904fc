"""Tests of data.py: hierarchies of every dataset kind, preprocessing, the toy set, the latent cache.

Run: python -m pytest -q test_data_part.py   (CPU, a few seconds; every fixture is written into tmp_path)
"""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data

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
    return data.ToyDataset(num_superclasses=2, subclasses_per_superclass=2, image_size=image_size,
                           images_per_class=3, flip=False)  # 12 images


def cache_meta(vae="sha256:stand-in-0"):
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
    assert ds.class_folders == folders and len(ds) == 8 and ds.targets == [0, 0, 1, 1, 2, 2, 3, 3]
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
    with pytest.raises(data.DataError, match="visipedia/inat_comp"):
        data.build_dataset("inat21", str(tmp_path / "nowhere"), split="train_mini")
    (tmp_path / "train_mini").mkdir()
    with pytest.raises(data.DataError, match="train_mini"):
        data.build_dataset("inat21", str(tmp_path), split="train_mini")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="empty.*no superclass folders"):
        data.build_dataset("folder", str(tmp_path / "empty"))
    with pytest.raises(data.DataError, match="no data path"):
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


def test_coarse_mode_relabels_folder_items_with_superclass_ids(tmp_path):
    for sup, cls in [("citrus", "lemon"), ("citrus", "orange"), ("melon", "cantaloupe")]:
        write_image(str(tmp_path / sup / cls / "a.jpg"))
    ds = data.build_dataset("folder", str(tmp_path), image_size=16, coarse=True)
    assert ds.targets == [0, 0, 1] and ds.class_names == ["citrus", "melon"] and ds.superclass_of == [0, 1]
    assert ds[2][1] == 1


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
    x = data.dit_transform(32, flip=False)(Image.new("RGB", (100, 70), (255, 0, 128)))
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1 and x[0].mean() == 1.0


# ---------------------------------------------------------------------------------------------------------------
# toy
# ---------------------------------------------------------------------------------------------------------------

def test_toy_is_deterministic_per_seed():
    a, b, c = (data.ToyDataset(images_per_class=4, seed=s, flip=False) for s in (0, 0, 1))
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    rng = np.random.default_rng([0, 0, 5, 3])  # (seed, split train, class 5, instance 3) = item 5*4+3
    assert np.array_equal(data.toy_image(5, rng), a.images[5 * 4 + 3])


def test_toy_subclasses_differ_and_share_their_family_look():
    ds = data.ToyDataset(images_per_class=64, flip=False)
    means = ds.images.reshape(16, 64, -1).astype(np.float64).mean(1)  # class-mean image, 16 x (32*32*3)
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)  # 16 x 16
    same_family = np.equal.outer(np.arange(16) // 4, np.arange(16) // 4)
    off_diag = ~np.eye(16, dtype=bool)
    assert dist[off_diag].min() > 100  # every class differs from every other
    assert dist[same_family & off_diag].mean() < dist[~same_family].mean()  # siblings look alike
    assert ds.class_names[:4] == ["disc/plain", "disc/striped", "disc/spotted", "disc/eyed"]
    assert ds.superclass_names == ["disc", "square", "triangle", "cross"]


def test_toy_coarse_labels_are_superclass_ids():
    fine = data.ToyDataset(images_per_class=2)
    coarse = data.ToyDataset(images_per_class=2, coarse=True)
    assert coarse.num_classes == 4 and coarse.class_names == fine.superclass_names
    assert coarse.targets == [fine.superclass_of[t] for t in fine.targets]
    assert np.array_equal(coarse.images, fine.images)


def test_toy_items_are_float_images_in_range():
    ds = data.build_dataset("toy", image_size=32)
    assert len(ds) == 16 * 256 and ds.num_classes == 16 and ds.num_superclasses == 4
    x, y = ds[1000]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y == 1000 // 256
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0


# ---------------------------------------------------------------------------------------------------------------
# latent cache
# ---------------------------------------------------------------------------------------------------------------

def test_cache_moments_match_a_direct_encode(toy_cache):
    out, dataset, vae = toy_cache
    moments = np.load(os.path.join(out, "moments.npy"))  # N x 2 x 8 x 2 x 2
    labels = np.load(os.path.join(out, "labels.npy"))
    assert moments.shape == (12, 2, 8, 2, 2) and moments.dtype == np.float16
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
    assert meta["complete"] and meta["num_images"] == 12 and meta["latent_shape"] == [4, 2, 2]
    assert meta["image_size"] == 16 and meta["vae"] == "sha256:stand-in-0" and meta["hierarchy"] == dataset.hierarchy()


def test_cache_resumes_without_re_encoding_done_items(tmp_path):
    dataset = small_toy()
    with pytest.raises(RuntimeError, match="simulated"):  # probe + 2 batches of 4, then the run dies
        data.build_latent_cache(dataset, FailingVAE(fail_at=4), str(tmp_path / "a"), batch_size=4, num_workers=0,
                                meta=cache_meta(), progress=False)
    done = np.load(str(tmp_path / "a" / "done.npy"))
    assert done.sum() == 8
    with pytest.raises(data.DataError, match="incomplete.*resume"):
        data.LatentCacheDataset(str(tmp_path / "a"))
    vae = StandInVAE()
    meta = data.build_latent_cache(dataset, vae, str(tmp_path / "a"), batch_size=4, num_workers=0,
                                   meta=cache_meta(), progress=False)
    assert meta["complete"]
    assert sum(vae.batch_sizes) - 1 == 2 * (12 - 8)  # one probe image + both views of each remaining item
    data.build_latent_cache(dataset, StandInVAE(), str(tmp_path / "b"), batch_size=5, num_workers=0,
                            meta=cache_meta(), progress=False)
    for name in ("moments.npy", "labels.npy", "done.npy"):
        assert np.array_equal(np.load(str(tmp_path / "a" / name)), np.load(str(tmp_path / "b" / name)))


def test_cache_built_for_another_vae_or_size_is_refused(toy_cache, tmp_path):
    out, dataset, _ = toy_cache
    with pytest.raises(data.DataError, match="vae=.*rebuild"):
        data.LatentCacheDataset(out, expect=dict(vae="sha256:other", image_size=16))
    with pytest.raises(data.DataError, match="image_size=16 .*image_size=32"):
        data.LatentCacheDataset(out, expect=dict(vae="sha256:stand-in-0", image_size=32))
    data.LatentCacheDataset(out, expect=dict(vae="sha256:stand-in-0", image_size=16, data="toy"))  # all match
    with pytest.raises(data.DataError, match="another latent cache.*vae"):  # resuming into it with another VAE
        data.build_latent_cache(dataset, StandInVAE(), out, num_workers=0, meta=cache_meta("sha256:other"),
                                progress=False)


def test_latent_dataset_samples_the_scaled_posterior(toy_cache):
    out, dataset, _ = toy_cache
    moments = torch.from_numpy(np.load(os.path.join(out, "moments.npy"))[5, 0].astype(np.float32))
    mean, logvar = moments.chunk(2)
    ds = data.LatentCacheDataset(out, flip=False)
    assert ds.hierarchy() == dataset.hierarchy() and ds.targets == dataset.targets
    torch.manual_seed(0)
    z = torch.stack([ds[5][0] for _ in range(4000)])  # 4000 x 4 x 2 x 2
    std = data.LATENT_SCALE * torch.exp(0.5 * logvar)
    assert torch.allclose(z.mean(0), data.LATENT_SCALE * mean, atol=0.03)
    assert torch.allclose(z.std(0), std, rtol=0.1)


def test_latent_dataset_draws_both_views_when_flipping(toy_cache):
    out, _, _ = toy_cache
    moments = torch.from_numpy(np.load(os.path.join(out, "moments.npy"))[2].astype(np.float32))  # 2 x 8 x 2 x 2
    ds = data.LatentCacheDataset(out, flip=True)
    torch.manual_seed(0)
    z = torch.stack([ds[2][0] for _ in range(4000)])
    assert torch.allclose(z.mean(0), data.LATENT_SCALE * moments[:, :4].mean(0), atol=0.03)


def test_vae_identity_is_the_weights_content(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights-1")
    (tmp_path / "b.safetensors").write_bytes(b"weights-1")
    (tmp_path / "c.bin").write_bytes(b"weights-2")
    assert data.vae_identity(str(tmp_path / "a")) == data.vae_identity(str(tmp_path / "b.safetensors"))
    assert data.vae_identity(str(tmp_path / "a")) != data.vae_identity(str(tmp_path / "c.bin"))
    with pytest.raises(data.DataError, match="not found"):
        data.vae_identity(str(tmp_path / "missing"))


def test_cache_command_line_builds_a_loadable_cache(tmp_path, monkeypatch):
    for sup, cls in [("citrus", "lemon"), ("melon", "cantaloupe")]:
        for j in range(2):
            write_image(str(tmp_path / "data" / sup / cls / f"{j}.jpg"), (90 * j, 50, 200), size=(20, 24))
    (tmp_path / "vae.safetensors").write_bytes(b"stand-in")
    monkeypatch.setattr(data, "_load_vae", lambda path: StandInVAE())
    args = ["cache", "--data", "folder", "--data-path", str(tmp_path / "data"), "--out", str(tmp_path / "cache"),
            "--vae", str(tmp_path / "vae.safetensors"), "--image-size", "16", "--batch-size", "3", "--num-workers", "0"]
    assert data.main(args) == 0
    expect = dict(vae=data.vae_identity(str(tmp_path / "vae.safetensors")), image_size=16, data="folder",
                  data_path=str(tmp_path / "data"))
    ds = data.LatentCacheDataset(str(tmp_path / "cache"), expect=expect)
    assert len(ds) == 4 and ds.superclass_names == ["citrus", "melon"] and ds[0][0].shape == (4, 2, 2)
    assert "python data.py cache --data folder" in ds.meta["command"]
    assert data.main(args) == 0  # a second run finds nothing left to do


def test_cache_with_a_tiny_real_autoencoder(tmp_path):
    model = pytest.importorskip("model")
    if not hasattr(model, "AutoencoderKL"):
        pytest.skip("model.AutoencoderKL not written yet")
    torch.manual_seed(0)
    vae = model.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1)
    dataset = small_toy()
    meta = data.build_latent_cache(dataset, vae, str(tmp_path), batch_size=8, num_workers=0, meta=cache_meta(),
                                   progress=False)
    c, h, w = meta["latent_shape"]
    assert (h, w) == (8, 8)  # two resolution levels: one 2x downsampling
    moments = np.load(str(tmp_path / "moments.npy"))
    with torch.no_grad():
        mean, logvar = vae.encode(dataset[4][0][None])
    np.testing.assert_allclose(moments[4, 0], torch.cat([mean, logvar], 1)[0].numpy(), rtol=5e-3, atol=5e-3)

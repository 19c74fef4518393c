"""Datasets and the dataset tool: round trips, labels, clear errors naming the file."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fdm_fast.data import DatasetError, DigitsDataset, ImageFolderDataset, open_dataset
from fdm_fast.dataset_tool import convert


def make_folder(root, n=7, size=(20, 12), labels=True):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for k in range(n):
        name = f"sub/img{k}.png"
        os.makedirs(os.path.join(root, "sub"), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(os.path.join(root, name))
        names.append(name)
    if labels:
        with open(os.path.join(root, "dataset.json"), "w") as f:
            json.dump({"labels": [[nm, k % 3] for k, nm in enumerate(names)]}, f)
    return names


@pytest.mark.parametrize("dest", ["out.zip", "outdir"])
def test_folder_to_dataset_round_trip_keeps_labels(tmp_path, dest):
    src = tmp_path / "src"
    make_folder(src)
    s = convert(str(src), str(tmp_path / dest), resolution=8, progress=False)
    assert s == dict(count=7, resolution=8, channels=3, labelled=True)
    ds = ImageFolderDataset(str(tmp_path / dest))
    assert len(ds) == 7 and ds.resolution == 8 and ds.num_channels == 3 and ds.label_dim == 3
    img, onehot = ds[4]
    assert img.shape == (3, 8, 8) and img.dtype == np.uint8 and onehot.argmax() == 4 % 3
    # zip -> zip keeps the labels too
    s2 = convert(str(tmp_path / dest), str(tmp_path / "again.zip"), progress=False)
    assert s2["labelled"] and ImageFolderDataset(str(tmp_path / "again.zip")).label_dim == 3


def test_corrupt_image_names_the_file(tmp_path):
    src = tmp_path / "src"
    make_folder(src, labels=False)
    (src / "sub" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"broken\.png: cannot read this image"):
        convert(str(src), str(tmp_path / "o.zip"), resolution=8, progress=False)
    assert not (tmp_path / "o.zip").exists()  # nothing half-written at the destination
    with pytest.raises(DatasetError, match=r"broken\.png: cannot read this image"):
        ImageFolderDataset(str(src))
    r = subprocess.run([sys.executable, "-m", "fdm_fast.dataset_tool", "--source", str(src), "--dest",
                        str(tmp_path / "o2.zip"), "--resolution", "8"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert r.returncode == 2 and "broken.png" in r.stderr and "Traceback" not in r.stderr


def test_unequal_sizes_need_resolution(tmp_path):
    src = tmp_path / "src"
    make_folder(src, n=2, size=(8, 8), labels=False)
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(src / "big.png")
    with pytest.raises(DatasetError, match="--resolution"):
        convert(str(src), str(tmp_path / "o.zip"), progress=False)


def test_cifar_tarball(tmp_path):
    import io
    import pickle
    import tarfile

    rng = np.random.default_rng(1)
    batch = {b"data": rng.integers(0, 255, (5, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3, 4]}
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        data = pickle.dumps(batch)
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    s = convert(str(tar_path), str(tmp_path / "c.zip"), progress=False)
    assert s == dict(count=5, resolution=32, channels=3, labelled=True)
    ds = ImageFolderDataset(str(tmp_path / "c.zip"))
    assert ds.label_dim == 5 and np.array_equal(ds[2][0], batch[b"data"][2].reshape(3, 32, 32))


def test_digits_embedded():
    ds = DigitsDataset(resolution=16)
    assert len(ds) == 1797 and ds.num_channels == 1 and ds.resolution == 16 and ds.label_dim == 10
    assert open_dataset("digits").label_dim == 0  # labels only when asked for


def test_missing_named_dataset_says_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=r"(?s)datasets/cifar10-32x32.zip not found.*fdm_fast.dataset_tool"):
        open_dataset("cifar10")
    with pytest.raises(DatasetError, match="no such file"):
        open_dataset("ffhq", data="nowhere.zip")


def _blob(n=2, res=32):
    import torch

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, res), torch.linspace(-1, 1, res), indexing="ij")
    return (torch.exp(-((xx - 0.2) ** 2 + 2 * (yy + 0.1) ** 2) / 0.1) * 2 - 1)[None, None].repeat(n, 3, 1, 1)


def test_augment_pipe_transforms_and_labels():
    import torch

    from fdm_fast.data.augment import AUGMENT_DIM, NUM_UNIFORMS, AugmentPipe

    x = _blob()
    u = torch.rand(2, NUM_UNIFORMS, generator=torch.Generator().manual_seed(0))
    y, labels = AugmentPipe(0.0)(x, u)
    assert torch.equal(y, x) and labels.shape == (2, AUGMENT_DIM) and not labels.any()  # p = 0: nothing
    only = dict(xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)
    u[:, 0] = 0.2
    y, labels = AugmentPipe(1.0, **dict(only, xflip=1e8))(x, u)
    assert (y - x.flip(3)).abs().max() < 1e-4 and labels[:, 0].eq(1).all()  # identity resampling is ~exact
    u[:, 6] = 0.75  # a quarter turn
    y, labels = AugmentPipe(1.0, **dict(only, rotate_frac=1))(x, u)
    assert (y - torch.rot90(x, 1, (2, 3))).abs().max() < 0.05
    assert torch.allclose(labels[:, 3:5], torch.tensor([[-1.0, 1.0]] * 2), atol=1e-6)  # cos - 1, sin
    # every image's augmentation depends on its own uniforms only
    full = AugmentPipe(0.7)
    u = torch.rand(3, NUM_UNIFORMS, generator=torch.Generator().manual_seed(1))
    both, lab = full(_blob(3), u)
    alone, lab1 = full(_blob(1), u[1:2])
    assert torch.allclose(both[1], alone[0], atol=1e-5) and torch.equal(lab[1], lab1[0])

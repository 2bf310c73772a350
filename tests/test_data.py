"""Tests for twolevel_dist.data: arrays, synthetic, CIFAR pickles, image folders, loaders.

Everything runs offline on CPU. The real-data test reads ../shared/data/cifar10-jpeg.tar.gz
(relative to the repository) and skips, with the reason, where it is absent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import shutil
import sys
import tarfile
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import twolevel_dist.data as data
from twolevel_dist.data import (
    DataError,
    DeviceLoader,
    ImageArrays,
    crop_and_flip,
    is_streaming,
    load_arrays,
    load_cifar,
    load_image_folder,
    make_streaming_loader,
    make_synthetic,
    verify_and_extract,
)
from twolevel_dist.data import cifar as cifar_module
from twolevel_dist.data import image_folder as image_folder_module
from twolevel_dist.data import streaming as streaming_module

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR_JPEG = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


# ============================================================================ helpers


def random_arrays(n: int, num_classes: int = 4, size: int = 8, seed: int = 0) -> ImageArrays:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return ImageArrays(images, labels, [f"c{i}" for i in range(num_classes)])


def identity_arrays(n: int, size: int = 8, seed: int = 0) -> ImageArrays:
    """Label i == sample i (one class per sample), so labels identify samples exactly."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return ImageArrays(images, torch.arange(n), [f"s{i}" for i in range(n)])


# Normalising with mean 0 and std 1/255 maps pixels back to their uint8 values.
RAW_PIXELS = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))


def as_pixels(batch: torch.Tensor) -> torch.Tensor:
    return batch.float().round().to(torch.int64)


def write_png(path: Path, pixels: np.ndarray) -> None:
    """pixels: uint8 [H, W, 3]. PNG is lossless, so decoding must return exactly these."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)


def make_image_folder(
    root: Path, classes=("cat", "ant", "bee"), per_class=(3, 2), size=(6, 5), seed=0
):
    """A tiny train/test image folder of random PNGs; returns {split: [(label, pixels HWC)]}."""
    rng = np.random.default_rng(seed)
    expected: dict[str, list[tuple[int, np.ndarray]]] = {"train": [], "test": []}
    for split, count in zip(("train", "test"), per_class):
        for label, name in enumerate(sorted(classes)):
            for i in range(count):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                write_png(root / split / name / f"{i:03d}.png", pixels)
                expected[split].append((label, pixels))
    return expected


def make_tar_gz(archive: Path, source_dir: Path, arcname_root: str | None = None) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for entry in sorted(source_dir.iterdir()):
            tar.add(
                entry,
                arcname=entry.name if arcname_root is None else f"{arcname_root}/{entry.name}",
            )
    return archive


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- CIFAR pickles


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def dump_official(path: Path, obj: dict) -> None:
    # The official files are Python 2 pickles; protocol 2 is what they use.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, per_batch: int = 20, test_size: int = 20) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows, labels = [], []
    for i in range(1, 6):
        batch_rows = cifar_rows(per_batch, seed=i)
        batch_labels = [(i * 7 + j) % 10 for j in range(per_batch)]
        dump_official(
            folder / f"data_batch_{i}",
            {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": batch_labels,
                b"data": batch_rows,
                b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
            },
        )
        rows.append(batch_rows)
        labels.extend(batch_labels)
    test_rows = cifar_rows(test_size, seed=99)
    test_labels = [j % 10 for j in range(test_size)]
    dump_official(
        folder / "test_batch",
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": test_labels,
            b"data": test_rows,
            b"filenames": [f"t{j}.png".encode() for j in range(test_size)],
        },
    )
    dump_official(
        folder / "batches.meta",
        {
            b"num_cases_per_batch": per_batch,
            b"label_names": [c.encode() for c in CIFAR10_CLASSES],
            b"num_vis": 3072,
        },
    )
    return {
        "train_rows": np.concatenate(rows),
        "train_labels": np.array(labels),
        "test_rows": test_rows,
        "test_labels": np.array(test_labels),
    }


def write_cifar100(root: Path, train_size: int = 30, test_size: int = 12) -> dict[str, np.ndarray]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n, seed in (("train", train_size, 1), ("test", test_size, 2)):
        rows = cifar_rows(n, seed)
        fine = [(j * 37) % 100 for j in range(n)]
        dump_official(
            folder / split,
            {
                b"filenames": [b"x.png"] * n,
                b"batch_label": split.encode(),
                b"fine_labels": fine,
                b"coarse_labels": [f % 20 for f in fine],
                b"data": rows,
            },
        )
        out[f"{split}_rows"], out[f"{split}_labels"] = rows, np.array(fine)
    dump_official(
        folder / "meta",
        {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    )
    return out


def pixel_at(row: np.ndarray, c: int, y: int, x: int) -> int:
    """The official layout by definition: R plane, then G, then B; each 32x32 row-major."""
    return int(row[c * 1024 + y * 32 + x])


# ============================================================================ ImageArrays


def test_image_arrays_accepts_valid_and_reports_basic_properties():
    arrays = random_arrays(10, num_classes=4, size=8)
    assert len(arrays) == 10
    assert arrays.num_classes == 4
    assert arrays.image_size == (8, 8)


def test_image_arrays_makes_non_contiguous_images_contiguous():
    base = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
    arrays = ImageArrays(base.permute(0, 3, 1, 2), torch.zeros(4, dtype=torch.int64), ["a"])
    assert arrays.images.is_contiguous()
    assert arrays.images.shape == (4, 3, 8, 8)


@pytest.mark.parametrize(
    "images, labels, classes, message",
    [
        (torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64), ["a"], "uint8"),
        (
            torch.zeros(2, 4, 4, 3, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.int64),
            ["a"],
            "permute",
        ),
        (
            torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.int32),
            ["a"],
            "labels.long()",
        ),
        (
            torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
            torch.zeros(3, dtype=torch.int64),
            ["a"],
            "one label per image",
        ),
        (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), ["a", "b"], "[0, 1]"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, -1]), ["a", "b"], "[0, 1]"),
        (
            torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.int64),
            [],
            "at least one class",
        ),
        (
            torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.int64),
            ["a", "a"],
            "duplicate",
        ),
        (
            np.zeros((2, 3, 4, 4), np.uint8),
            torch.zeros(2, dtype=torch.int64),
            ["a"],
            "torch.from_numpy",
        ),
    ],
)
def test_image_arrays_rejects_bad_input_with_fix(images, labels, classes, message):
    with pytest.raises(DataError) as info:
        ImageArrays(images, labels, classes)
    assert message in str(info.value)


def test_mean_std_matches_direct_float_computation():
    arrays = random_arrays(50, size=8, seed=3)
    x = arrays.images.double() / 255
    mean, std = arrays.mean_std()
    assert np.allclose(mean, x.mean(dim=(0, 2, 3)).numpy(), atol=1e-12)
    assert np.allclose(std, x.std(dim=(0, 2, 3), unbiased=False).numpy(), atol=1e-9)
    assert all(isinstance(v, float) for v in (*mean, *std))


def test_mean_std_of_empty_arrays_explains_fix():
    empty = ImageArrays(
        torch.zeros(0, 3, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), ["a"]
    )
    with pytest.raises(DataError, match="pass mean= and std="):
        empty.mean_std()


def test_balanced_subset_takes_the_first_images_of_each_class_in_stored_order():
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2, 1, 1, 0, 2])
    images = torch.arange(12, dtype=torch.uint8).view(12, 1, 1, 1).expand(12, 3, 2, 2)
    subset = ImageArrays(images, labels, ["a", "b", "c"]).balanced_subset(6)
    # The first two of each class, kept in their stored order (indices 0, 1, 2, 3, 4, 5).
    assert subset.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert subset.labels.tolist() == [2, 0, 1, 0, 2, 1]
    assert torch.bincount(subset.labels).tolist() == [2, 2, 2]


@pytest.mark.parametrize(
    "count, message",
    [(7, "positive multiple of 3"), (0, "positive multiple"), (15, "give at most 12")],
)
def test_balanced_subset_refuses_impossible_sizes_with_the_fix(count, message):
    arrays = ImageArrays(
        torch.zeros(12, 3, 2, 2, dtype=torch.uint8), torch.arange(12) % 3, ["a", "b", "c"]
    )
    with pytest.raises(DataError, match=message):
        arrays.balanced_subset(count)


# ============================================================================ synthetic


def test_synthetic_is_bit_identical_for_same_seed_and_differs_across_seeds():
    a_train, a_test = make_synthetic(train_size=500, test_size=100, seed=7)
    b_train, b_test = make_synthetic(train_size=500, test_size=100, seed=7)
    c_train, _ = make_synthetic(train_size=500, test_size=100, seed=8)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(
        a_train.labels, b_train.labels
    )
    assert torch.equal(a_test.images, b_test.images) and torch.equal(a_test.labels, b_test.labels)
    assert not torch.equal(a_train.images, c_train.images)
    # Train and test share templates but not noise.
    assert not torch.equal(a_train.images[:100], a_test.images)


def test_synthetic_test_set_does_not_depend_on_train_size():
    _, test_small = make_synthetic(train_size=100, test_size=50, seed=1)
    _, test_large = make_synthetic(train_size=900, test_size=50, seed=1)
    assert torch.equal(test_small.images, test_large.images)


def test_synthetic_shapes_dtypes_and_balanced_classes():
    train, test = make_synthetic(num_classes=5, train_size=103, test_size=20, image_size=24, seed=0)
    assert train.images.shape == (103, 3, 24, 24) and train.images.dtype == torch.uint8
    assert test.images.shape == (20, 3, 24, 24)
    assert train.classes == test.classes == [f"class_{i}" for i in range(5)]
    counts = torch.bincount(train.labels, minlength=5)
    assert counts.max() - counts.min() <= 1
    # Pixels use the range (not collapsed to a constant, not all saturated).
    assert 10 < train.images.float().std() < 120


def test_synthetic_is_learnable_but_not_trivial():
    """A nearest-class-mean classifier is far above chance (1/10) yet well short of 100%:
    the class structure is real, and noise/shift/distractors keep it from being trivial."""
    train, test = make_synthetic(train_size=3000, test_size=1000, seed=0)
    features = train.images.float().flatten(1)
    means = torch.stack([features[train.labels == c].mean(0) for c in range(10)])
    predictions = torch.cdist(test.images.float().flatten(1), means).argmin(1)
    accuracy = (predictions == test.labels).float().mean().item()
    assert 0.5 < accuracy < 0.99, accuracy


def test_synthetic_generation_is_fast():
    make_synthetic(train_size=100, test_size=10)  # warm up lazy torch initialisation
    start = time.perf_counter()
    make_synthetic(train_size=10_000, test_size=1)
    # Measured ~0.5 s on 2 cores; generous bound for loaded CI machines.
    assert time.perf_counter() - start < 4.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_classes=1), "num_classes"),
        (dict(train_size=0), "train_size"),
        (dict(image_size=2), "image_size"),
        (dict(seed="0"), "seed"),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs, message):
    with pytest.raises(DataError, match=message):
        make_synthetic(**kwargs)


# ============================================================================ CIFAR pickles


def test_cifar10_pickles_load_with_pixels_at_the_right_positions(tmp_path):
    written = write_cifar10(tmp_path)
    train, test = load_cifar(tmp_path, "cifar10")
    assert train.images.shape == (100, 3, 32, 32) and test.images.shape == (20, 3, 32, 32)
    assert train.classes == CIFAR10_CLASSES
    assert train.labels.tolist() == written["train_labels"].tolist()
    assert test.labels.tolist() == written["test_labels"].tolist()
    # Spot checks against the layout's definition, including every corner and a batch seam.
    for index in (0, 19, 20, 57, 99):
        for c, y, x in ((0, 0, 0), (1, 0, 31), (2, 31, 0), (2, 31, 31), (1, 5, 17), (0, 30, 2)):
            assert int(train.images[index, c, y, x]) == pixel_at(
                written["train_rows"][index], c, y, x
            )
    # And one full image, pixel by pixel.
    row = written["test_rows"][13]
    reference = np.array(
        [[[pixel_at(row, c, y, x) for x in range(32)] for y in range(32)] for c in range(3)]
    )
    assert np.array_equal(test.images[13].numpy(), reference)


def test_cifar100_uses_fine_labels_and_names(tmp_path):
    written = write_cifar100(tmp_path)
    train, test = load_cifar(tmp_path, "cifar100")
    assert train.num_classes == 100 and train.classes[3] == "fine3"
    assert train.labels.tolist() == written["train_labels"].tolist()
    assert int(test.images[5, 2, 7, 9]) == pixel_at(written["test_rows"][5], 2, 7, 9)
    assert len(train) == 30 and len(test) == 12


def test_cifar_missing_files_name_path_layout_and_download_fix(tmp_path):
    with pytest.raises(DataError) as info:
        load_cifar(tmp_path, "cifar10")
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in message
    assert "batches.meta" in message and "dataset.download=true" in message


def test_cifar_unknown_variant_lists_valid_ones(tmp_path):
    with pytest.raises(DataError, match="cifar10.*cifar100"):
        load_cifar(tmp_path, "cifar1000")


def test_cifar_corrupt_pickle_names_the_file(tmp_path):
    write_cifar10(tmp_path)
    broken = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    broken.write_bytes(b"not a pickle at all")
    with pytest.raises(DataError) as info:
        load_cifar(tmp_path, "cifar10")
    assert str(broken) in str(info.value) and "dataset.download=true" in str(info.value)


class _Payload:
    """Pickles as a call of ``pathlib.Path.touch`` on ``marker``: code that runs while loading."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_cifar_pickle_carrying_code_is_refused_and_the_code_never_runs(tmp_path, protocol):
    write_cifar10(tmp_path)
    marker = tmp_path / "payload_ran"
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    rows = np.zeros((20, 3072), np.uint8)
    with open(path, "wb") as f:
        pickle.dump(
            {b"labels": [0] * 20, b"data": rows, b"extra": _Payload(marker)}, f, protocol=protocol
        )
    with pytest.raises(DataError) as info:
        load_cifar(tmp_path, "cifar10")
    assert not marker.exists()  # the payload did not run
    assert str(path) in str(info.value) and "which no CIFAR pickle holds" in str(info.value)
    assert "could run code" in str(info.value)
    # The same file without the payload, in either protocol (numpy arrays included), loads.
    with open(path, "wb") as f:
        pickle.dump({b"labels": [0] * 20, b"data": rows}, f, protocol=protocol)
    load_cifar(tmp_path, "cifar10")


def test_cifar_wrong_data_shape_is_reported(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    dump_official(path, {b"labels": [0, 1], b"data": np.zeros((2, 3000), np.uint8)})
    with pytest.raises(DataError) as info:
        load_cifar(tmp_path, "cifar10")
    assert str(path) in str(info.value) and "3072" in str(info.value)


def test_cifar_label_count_mismatch_is_reported(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    dump_official(path, {b"labels": [0, 1, 2], b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(DataError, match="2 images"):
        load_cifar(tmp_path, "cifar10")


def test_verify_and_extract_extracts_a_good_archive(tmp_path):
    source = tmp_path / "source"
    write_cifar10(source)
    archive = make_tar_gz(tmp_path / "cifar-10-python.tar.gz", source)
    root = tmp_path / "root"
    verify_and_extract(archive, root, md5(archive))
    train, _ = load_cifar(root, "cifar10")
    expected, _ = load_cifar(source, "cifar10")
    assert torch.equal(train.images, expected.images)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no staging left


def test_verify_and_extract_rejects_wrong_md5_and_extracts_nothing(tmp_path):
    source = tmp_path / "source"
    write_cifar10(source)
    archive = make_tar_gz(tmp_path / "cifar-10-python.tar.gz", source)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataError) as info:
        verify_and_extract(archive, root, "0" * 32)
    message = str(info.value)
    assert str(archive) in message and "0" * 32 in message and md5(archive) in message
    assert "delete" in message and "retry" in message
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("bad_name", ["../escape.txt", "/abs/escape.txt", "ok/../../escape.txt"])
def test_extraction_rejects_unsafe_member_paths(tmp_path, bad_name):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("cifar-10-batches-py/fine.txt", bad_name):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataError, match="refusing to extract"):
        verify_and_extract(archive, root, md5(archive))
    assert list(root.iterdir()) == []  # not even the safe member was kept
    assert not (tmp_path / "escape.txt").exists()


def test_extraction_rejects_symlinks(tmp_path):
    archive = tmp_path / "links.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        link = tarfile.TarInfo("data/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(DataError, match="link or special file"):
        verify_and_extract(archive, tmp_path / "root", md5(archive))


def test_corrupt_archive_with_matching_md5_leaves_nothing(tmp_path):
    archive = tmp_path / "truncated.tar.gz"
    source = tmp_path / "source"
    write_cifar10(source)
    full = make_tar_gz(tmp_path / "full.tar.gz", source).read_bytes()
    archive.write_bytes(full[: len(full) // 2])
    root = tmp_path / "root"
    with pytest.raises(DataError, match="corrupt or incomplete"):
        verify_and_extract(archive, root, md5(archive))
    assert list(root.iterdir()) == []


def _offline_cifar10_archive(tmp_path: Path, monkeypatch) -> tuple[Path, list[str]]:
    """A local official-format archive, with the spec's md5 pointed at it and the fetch
    replaced by a copy that records the URLs it was asked for."""
    source = tmp_path / "source"
    write_cifar10(source)
    archive = make_tar_gz(tmp_path / "local.tar.gz", source)
    spec = cifar_module.CIFAR_SPECS["cifar10"]
    monkeypatch.setitem(
        cifar_module.CIFAR_SPECS, "cifar10", dataclasses.replace(spec, md5=md5(archive))
    )
    fetched: list[str] = []

    def fake_fetch(url: str, destination: Path) -> None:
        fetched.append(url)
        shutil.copyfile(archive, destination)

    monkeypatch.setattr(cifar_module, "_fetch_url", fake_fetch)
    return archive, fetched


def test_download_fetches_verifies_extracts_once(tmp_path, monkeypatch):
    _, fetched = _offline_cifar10_archive(tmp_path, monkeypatch)
    root = tmp_path / "root"
    train, test = load_cifar(root, "cifar10", download=True)
    assert fetched == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert len(train) == 100 and len(test) == 20
    assert (root / "cifar-10-python.tar.gz").is_file()
    load_cifar(root, "cifar10", download=True)  # files present: no second fetch
    assert len(fetched) == 1


def test_download_with_corrupt_fetch_reports_md5(tmp_path, monkeypatch):
    _, fetched = _offline_cifar10_archive(tmp_path, monkeypatch)
    monkeypatch.setattr(
        cifar_module, "_fetch_url", lambda url, dest: Path(dest).write_bytes(b"garbage")
    )
    root = tmp_path / "root"
    with pytest.raises(DataError, match="checksum mismatch.*delete it and retry"):
        load_cifar(root, "cifar10", download=True)
    assert not (root / "cifar-10-batches-py").exists()


def test_official_specs_hold_the_official_urls_and_checksums():
    specs = cifar_module.CIFAR_SPECS
    assert specs["cifar10"].url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert specs["cifar10"].md5 == "c58f30108f718f92721af3b95e74349a"
    assert specs["cifar100"].url == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    assert specs["cifar100"].md5 == "eb9058c3a382ffc7106e4002c42a8d85"


def test_fetch_failure_is_a_clear_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(cifar_module.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="could not download https://example.invalid/x.tar.gz"):
        cifar_module._fetch_url("https://example.invalid/x.tar.gz", tmp_path / "x.tar.gz")
    assert list(tmp_path.iterdir()) == []


# ============================================================================ image folders


def test_image_folder_loads_exact_pixels_in_sorted_class_order(tmp_path):
    expected = make_image_folder(tmp_path / "set")
    train, test = load_image_folder(tmp_path / "set", cache_dir=tmp_path / "cache")
    assert train.classes == test.classes == ["ant", "bee", "cat"]
    for arrays, split in ((train, "train"), (test, "test")):
        assert arrays.labels.tolist() == [label for label, _ in expected[split]]
        assert arrays.images.shape == (len(expected[split]), 3, 5, 6)  # [N, 3, H, W]
        for i, (_, pixels) in enumerate(expected[split]):
            assert np.array_equal(arrays.images[i].numpy(), pixels.transpose(2, 0, 1))


def test_image_folder_cache_is_written_then_read_without_decoding(tmp_path, monkeypatch):
    root = tmp_path / "set"
    make_image_folder(root)
    calls = []
    real_decode = image_folder_module.decode.decode_chunk

    def counting_decode(paths, image_size):
        calls.append(len(paths))
        return real_decode(paths, image_size)

    monkeypatch.setattr(image_folder_module.decode, "decode_chunk", counting_decode)
    first = load_image_folder(root)
    assert calls, "first load must decode"
    cache_files = list((root / ".twolevel_cache").glob("*.npz"))
    assert len(cache_files) == 1  # default cache dir: root/.twolevel_cache

    def no_decoding(paths, image_size):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(image_folder_module.decode, "decode_chunk", no_decoding)
    second = load_image_folder(root)
    for a, b in zip(first, second):
        assert (
            torch.equal(a.images, b.images)
            and torch.equal(a.labels, b.labels)
            and a.classes == b.classes
        )
    # Loading did not leave temporary files next to the cache.
    assert [p.suffix for p in (root / ".twolevel_cache").iterdir()] == [".npz"]


def test_image_folder_cache_is_invalidated_by_a_changed_file(tmp_path, monkeypatch):
    root = tmp_path / "set"
    make_image_folder(root)
    load_image_folder(root)
    changed = root / "train" / "bee" / "001.png"
    new_pixels = np.full((5, 6, 3), 7, np.uint8)
    write_png(changed, new_pixels)
    os.utime(changed, ns=(1, 1))  # a new mtime even on coarse-timestamp file systems
    train, _ = load_image_folder(root)
    index = 2 + 1  # ant has 3 train images, then bee/000, bee/001
    assert np.array_equal(train.images[index + 1].numpy(), new_pixels.transpose(2, 0, 1))
    # The stale cache was replaced, not accumulated.
    assert len(list((root / ".twolevel_cache").glob("*.npz"))) == 1


def test_image_folder_cache_depends_on_image_size(tmp_path):
    root = tmp_path / "set"
    make_image_folder(root)
    native, _ = load_image_folder(root)
    resized, _ = load_image_folder(root, image_size=4)
    assert native.images.shape[2:] == (5, 6) and resized.images.shape[2:] == (4, 4)
    assert len(list((root / ".twolevel_cache").glob("*.npz"))) == 2


def test_image_folder_falls_back_to_user_cache_when_root_is_not_writable(tmp_path, monkeypatch):
    root = tmp_path / "set"
    make_image_folder(root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(image_folder_module, "_is_writable_dir", lambda folder: False)
    load_image_folder(root)
    assert len(list((tmp_path / "xdg" / "twolevel_dist").glob("set-*.npz"))) == 1
    assert not (root / ".twolevel_cache").exists()


def test_image_folder_use_cache_false_writes_nothing(tmp_path):
    root = tmp_path / "set"
    make_image_folder(root)
    load_image_folder(root, use_cache=False)
    assert not (root / ".twolevel_cache").exists()


def test_image_folder_uses_val_when_there_is_no_test(tmp_path):
    root = tmp_path / "set"
    make_image_folder(root)
    (root / "test").rename(root / "val")
    _, val = load_image_folder(root, use_cache=False)
    assert len(val) == 6


def test_image_folder_resizes_mixed_sizes_only_when_asked(tmp_path):
    root = tmp_path / "set"
    make_image_folder(root)
    odd = root / "train" / "cat" / "999.png"
    write_png(odd, np.zeros((9, 11, 3), np.uint8))
    with pytest.raises(DataError) as info:
        load_image_folder(root, use_cache=False)
    assert str(odd) in str(info.value) and "image_size" in str(info.value)
    train, test = load_image_folder(root, image_size=8, use_cache=False)
    assert train.images.shape[1:] == (3, 8, 8) and test.images.shape[1:] == (3, 8, 8)


def test_image_folder_converts_grayscale_and_rgba_to_rgb(tmp_path):
    root = tmp_path / "set"
    make_image_folder(root)
    Image.fromarray(np.full((5, 6), 200, np.uint8), "L").save(root / "train" / "ant" / "gray.png")
    Image.fromarray(np.full((5, 6, 4), 50, np.uint8), "RGBA").save(
        root / "test" / "ant" / "rgba.png"
    )
    train, test = load_image_folder(root, use_cache=False)
    assert (train.images[3] == 200).all()  # ant: 000, 001, 002, gray
    assert (test.images[2] == 50).all()  # ant: 000, 001, rgba


def test_image_folder_errors_name_the_problem_and_the_layout(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as info:
        load_image_folder(missing)
    assert str(missing) in str(info.value) and "root/train/<class>" in str(info.value)

    root = tmp_path / "set"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_image_folder(root)

    (root / "train" / "a").mkdir()
    (root / "test" / "a").mkdir()
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as info:
        load_image_folder(root)
    assert str(root / "train" / "a") in str(info.value) and "no images" in str(info.value)

    only_train = tmp_path / "only_train"
    (only_train / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="neither test/ nor val/"):
        load_image_folder(only_train)


def test_image_folder_requires_the_same_classes_in_both_splits(tmp_path):
    root = tmp_path / "set"
    make_image_folder(root)
    (root / "test" / "cat").rename(root / "test" / "dog")
    with pytest.raises(DataError) as info:
        load_image_folder(root, use_cache=False)
    assert "missing ['cat']" in str(info.value) and "unexpected ['dog']" in str(info.value)


def test_image_folder_names_an_unreadable_image(tmp_path):
    root = tmp_path / "set"
    make_image_folder(root)
    broken = root / "test" / "bee" / "000.png"
    broken.write_bytes(b"\x89PNG but truncated")
    with pytest.raises(DataError) as info:
        load_image_folder(root, use_cache=False)
    assert str(broken) in str(info.value) and "Delete or replace" in str(info.value)


def test_image_folder_parallel_decode_matches_serial(tmp_path, monkeypatch):
    root = tmp_path / "set"
    make_image_folder(root, per_class=(5, 3))
    serial_train, serial_test = load_image_folder(root, use_cache=False, workers=1)
    monkeypatch.setattr(image_folder_module, "_MIN_IMAGES_FOR_POOL", 0)
    monkeypatch.setattr(image_folder_module, "_IMAGES_PER_TASK", 4)  # several chunks per worker
    parallel_train, parallel_test = load_image_folder(root, use_cache=False, workers=2)
    assert torch.equal(serial_train.images, parallel_train.images)
    assert torch.equal(serial_test.images, parallel_test.images)


def test_image_folder_accepts_an_archive_and_extracts_it_once(tmp_path, monkeypatch):
    source = tmp_path / "set"
    make_image_folder(source)
    archive = make_tar_gz(tmp_path / "set.tar.gz", source)
    cache = tmp_path / "cache"
    from_archive, _ = load_image_folder(archive, cache_dir=cache)
    from_folder, _ = load_image_folder(source, use_cache=False)
    assert torch.equal(from_archive.images, from_folder.images)
    extracted = list((cache / "extracted").iterdir())
    assert len(extracted) == 1 and (extracted[0] / ".complete").is_file()
    # A second start neither extracts nor reads the archive: its digest is remembered.
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: (
        reads.append(Path(path)), real_open(path, *a, **k))[1])
    load_image_folder(archive, cache_dir=cache)
    monkeypatch.undo()
    assert list((cache / "extracted").iterdir()) == extracted
    assert archive not in reads
    # The same archive staged elsewhere for another job (a new path and mtime): the same copy.
    staged = tmp_path / "node-local" / archive.name
    staged.parent.mkdir()
    staged.write_bytes(archive.read_bytes())
    load_image_folder(staged, cache_dir=cache)
    assert list((cache / "extracted").iterdir()) == extracted
    # A changed archive: a copy of its own, with the new content.
    (next((source / "train").iterdir()) / "extra.png").write_bytes(
        next(next((source / "train").iterdir()).iterdir()).read_bytes())
    changed, _ = load_image_folder(make_tar_gz(staged, source), cache_dir=cache)
    assert len(list((cache / "extracted").iterdir())) == 2
    assert len(changed.images) == len(from_folder.images) + 1


def _loads_in_turns(fail_on):
    """Two nodes of two ranks (LOCAL_RANK = rank % 2): each rank's load times, and whether a
    DataError on rank ``fail_on`` (None: none) stopped it."""
    import torch.distributed as dist

    from twolevel_dist.engine.loaders import load_in_turns
    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ["LOCAL_RANK"] = str(rank % 2)
    times = []

    def load():
        times.append(time.monotonic())
        time.sleep(0.3)
        times.append(time.monotonic())
        if rank == fail_on:
            raise DataError(f"rank {rank} cannot read the set")
        return rank
    results = []
    for failing in (None, fail_on):
        fail_on = failing
        try:
            results.append(load_in_turns(load, rank, world))
        except DataError as error:
            results.append(str(error))
    return times[:2], results


def test_ranks_load_in_turns_rank_0_then_each_nodes_first_then_the_rest():
    from distributed import run_on_ranks

    ranks = run_on_ranks(4, _loads_in_turns, 3)
    (start0, end0), (start1, end1), (start2, end2), (start3, end3) = (r[0] for r in ranks)
    # Rank 0 fills a shared cache alone; node 2's first rank its node-local one; then the rest.
    assert end0 <= start2 and end2 <= min(start1, start3), [r[0] for r in ranks]
    assert [r[1][0] for r in ranks] == [0, 1, 2, 3]
    # A rank that cannot load stops every rank, each with that rank's message.
    assert [r[1][1] for r in ranks] == ["rank 3 cannot read the set"] * 4


def test_extract_tar_helper(tmp_path):
    source = tmp_path / "set"
    make_image_folder(source)
    archive = make_tar_gz(tmp_path / "set.tar.gz", source)
    destination = data.extract_tar(archive, tmp_path / "out")
    assert sorted(p.name for p in destination.iterdir()) == ["test", "train"]


# ---------------------------------------------------------------------------- real CIFAR-10 JPEGs


@pytest.fixture(scope="session")
def cifar10_jpeg_root() -> Path:
    """The real archive extracted as training extracts it: once per machine, into the user's
    cache (extracting is tested on small archives above; 60,000 files take many seconds)."""
    if not SHARED_CIFAR_JPEG.is_file():
        pytest.skip(
            f"real-data archive {SHARED_CIFAR_JPEG} is absent (it lives in ../shared/data on the "
            "dev machines)"
        )
    return image_folder_module._extracted_archive(SHARED_CIFAR_JPEG, None)


def test_real_cifar10_jpeg_folder_loads_and_caches(cifar10_jpeg_root, tmp_path, monkeypatch):
    # Decoded here, into a cache of this test's own (the extracted copy may hold one already).
    train, test = load_image_folder(cifar10_jpeg_root, cache_dir=tmp_path)
    assert train.classes == CIFAR10_CLASSES
    assert train.images.shape == (50_000, 3, 32, 32) and test.images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # The well-known CIFAR-10 channel statistics (JPEG re-compression shifts them slightly).
    mean, std = train.mean_std()
    assert np.allclose(mean, (0.4914, 0.4822, 0.4465), atol=0.01), mean
    assert np.allclose(std, (0.2470, 0.2435, 0.2616), atol=0.02), std

    def no_decoding(paths, image_size):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(image_folder_module.decode, "decode_chunk", no_decoding)
    cached_train, cached_test = load_image_folder(cifar10_jpeg_root, cache_dir=tmp_path)
    assert torch.equal(cached_train.images, train.images) and torch.equal(
        cached_test.labels, test.labels
    )


# ============================================================================ DeviceLoader


def batches(loader: DeviceLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def test_device_loader_same_seed_gives_identical_batches_and_epochs_differ():
    arrays = random_arrays(40)
    def make():
        return DeviceLoader(arrays, 8, train=True, device="cpu", seed=3, dp_rank=1, dp_size=2)

    a, b = make(), make()
    first_a, first_b = batches(a), batches(b)
    assert len(first_a) == len(a) == 2  # 20 samples per replica, 8 per batch, drop_last
    for (xa, ya), (xb, yb) in zip(first_a, first_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    a.set_epoch(1)
    second = batches(a)
    assert not torch.equal(second[0][0], first_a[0][0])
    a.set_epoch(0)
    again = batches(a)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(again, first_a))
    other_seed = batches(
        DeviceLoader(arrays, 8, train=True, device="cpu", seed=4, dp_rank=1, dp_size=2)
    )
    assert not torch.equal(other_seed[0][0], first_a[0][0])


def test_device_loader_train_shards_are_disjoint_equal_and_from_one_permutation():
    arrays = identity_arrays(103)
    seen = []
    for rank in range(4):
        loader = DeviceLoader(arrays, 5, train=True, device="cpu", seed=0, dp_rank=rank, dp_size=4)
        assert len(loader) == 25 // 5 and loader.num_samples == 25
        labels = torch.cat([y for _, y in loader]).tolist()
        assert len(labels) == 25
        seen.append(set(labels))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not seen[i] & seen[j]
    assert len(set().union(*seen)) == 100  # 103 // 4 * 4; the 3 left over are dropped this epoch
    # The shards interleave one shared permutation: rank r holds perm[r::4].
    perms = [
        DeviceLoader(
            arrays, 5, train=True, device="cpu", seed=0, dp_rank=r, dp_size=4
        ).shard_indices()
        for r in range(4)
    ]
    interleaved = torch.stack(perms, dim=1).flatten()
    assert sorted(interleaved.tolist()) == sorted(set(interleaved.tolist()))


def test_device_loader_eval_covers_every_sample_exactly_once_in_order():
    arrays = identity_arrays(23)
    collected = []
    for rank in range(3):
        loader = DeviceLoader(
            arrays, 4, train=False, device="cpu", seed=0, dp_rank=rank, dp_size=3, **RAW_PIXELS
        )
        got = batches(loader)
        assert (
            len(got) == len(loader) == -(-len(range(rank, 23, 3)) // 4)
        )  # last partial batch kept
        labels = torch.cat([y for _, y in got])
        assert labels.tolist() == list(range(rank, 23, 3))  # no shuffle
        images = torch.cat([x for x, _ in got])
        assert torch.equal(as_pixels(images), arrays.images[labels].long())  # no augmentation
        collected.extend(labels.tolist())
    assert sorted(collected) == list(range(23))


def test_device_loader_train_images_are_real_crops_and_flips_of_their_source():
    """Each output must equal one of the (2*pad+1)^2 * 2 crop/flip variants of its source
    image (computed here with plain slicing), and across a batch both flips and several
    offsets must occur."""
    pad, size = 2, 8
    arrays = identity_arrays(64, size=size, seed=5)
    loader = DeviceLoader(arrays, 64, train=True, device="cpu", seed=1, pad=pad, **RAW_PIXELS)
    ((images, labels),) = batches(loader)
    images = as_pixels(images)
    padded = torch.nn.functional.pad(arrays.images.long(), (pad,) * 4)
    used = set()
    for image, label in zip(images, labels):
        matches = []
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                crop = padded[label, :, dy : dy + size, dx : dx + size]
                for flipped in (False, True):
                    candidate = crop.flip(-1) if flipped else crop
                    if torch.equal(candidate, image):
                        matches.append((dy, dx, flipped))
        assert len(matches) >= 1, f"sample {int(label)} is not a crop/flip of its source"
        used.add(matches[0])
    assert {flipped for _, _, flipped in used} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in used}) >= 8


def test_crop_and_flip_matches_per_image_slicing():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 5, 7), generator=g, dtype=torch.uint8)
    offsets_y = torch.tensor([0, 1, 2, 3, 4, 6])
    offsets_x = torch.tensor([6, 0, 3, 2, 1, 6])
    flips = torch.tensor([False, True, False, True, True, False])
    out = crop_and_flip(images, offsets_y, offsets_x, flips, pad=3, height=5, width=7)
    padded = torch.nn.functional.pad(images, (3, 3, 3, 3))
    for i in range(6):
        y, x = int(offsets_y[i]), int(offsets_x[i])
        reference = padded[i, :, y : y + 5, x : x + 7]
        if flips[i]:
            reference = reference.flip(-1)
        assert torch.equal(out[i], reference)
    assert out.dtype == torch.uint8


def test_device_loader_same_dp_rank_same_augmentation_other_rank_differs():
    arrays = random_arrays(32)
    kwargs = dict(train=True, device="cpu", seed=9, dp_size=2)
    rank0_a = batches(DeviceLoader(arrays, 16, dp_rank=0, **kwargs))
    rank0_b = batches(DeviceLoader(arrays, 16, dp_rank=0, **kwargs))
    rank1 = batches(DeviceLoader(arrays, 16, dp_rank=1, **kwargs))
    assert torch.equal(rank0_a[0][0], rank0_b[0][0])
    assert not torch.equal(rank0_a[0][0], rank1[0][0])


def test_device_loader_does_not_touch_the_global_rng():
    state = torch.get_rng_state()
    loader = DeviceLoader(random_arrays(32), 8, train=True, device="cpu", seed=0)
    batches(loader)
    assert torch.equal(torch.get_rng_state(), state)


def test_device_loader_normalises_then_casts_and_sets_memory_format():
    arrays = random_arrays(10)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    loader = DeviceLoader(arrays, 10, train=False, device="cpu", seed=0, mean=mean, std=std)
    ((x, y),) = batches(loader)
    expected = (arrays.images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std
    ).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and torch.allclose(x, expected, atol=1e-6)
    assert y.dtype == torch.int64 and torch.equal(y, arrays.labels)

    default = DeviceLoader(arrays, 10, train=False, device="cpu", seed=0)
    ((x_default, _),) = batches(default)
    assert abs(float(x_default.mean())) < 1e-4  # default mean/std come from the data
    assert abs(float(x_default.std(unbiased=False)) - 1) < 1e-2

    fast = DeviceLoader(
        arrays, 4, train=True, device="cpu", seed=0, dtype=torch.bfloat16, channels_last=True
    )
    x_fast, _ = next(iter(fast))
    assert x_fast.dtype == torch.bfloat16 and x_fast.shape == (4, 3, 8, 8)
    assert x_fast.is_contiguous(memory_format=torch.channels_last)


def test_device_loader_without_augmentation_in_train_mode_only_shuffles():
    arrays = identity_arrays(12)
    loader = DeviceLoader(
        arrays, 12, train=True, device="cpu", seed=0, pad=0, flip=False, **RAW_PIXELS
    )
    ((x, y),) = batches(loader)
    assert sorted(y.tolist()) == list(range(12)) and y.tolist() != list(range(12))
    assert torch.equal(as_pixels(x), arrays.images[y].long())


def test_device_loader_drop_last_false_in_train_keeps_partial_batch():
    loader = DeviceLoader(random_arrays(10), 4, train=True, device="cpu", seed=0, drop_last=False)
    assert len(loader) == 3 and [len(y) for _, y in loader] == [4, 4, 2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size must be an int >= 1"),
        (dict(dp_rank=2, dp_size=2), r"dp_rank must be an int in \[0, 1\]"),
        (dict(dp_size=0), "dp_size"),
        (dict(batch_size=16, dp_size=4), "no full batch; lower the batch size"),
        (dict(dp_rank=10, dp_size=11, train=False), "shard 10 of 11 is empty"),
        (dict(mean=(0.5, 0.5)), "one value per RGB channel"),
        (dict(std=(0.5, 0.0, 0.5)), "std must be positive"),
        (dict(pad=-1), "pad"),
        (dict(dtype=torch.int32), "floating-point"),
    ],
)
def test_device_loader_rejects_bad_arguments(kwargs, message):
    options = dict(batch_size=4, train=True, device="cpu", seed=0)
    options.update(kwargs)
    batch_size = options.pop("batch_size")
    with pytest.raises(DataError, match=message):
        DeviceLoader(random_arrays(10), batch_size, **options)


def test_device_loader_rejects_negative_epoch():
    loader = DeviceLoader(random_arrays(10), 4, train=True, device="cpu", seed=0)
    with pytest.raises(DataError, match="epoch"):
        loader.set_epoch(-1)


# ============================================================================ streaming


@pytest.fixture()
def streaming_root(tmp_path) -> Path:
    """Images of assorted sizes (ImageNet is never uniform) in root/train and root/val."""
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (24, 64), (50, 50), (33, 21)]
    for split, count in (("train", 6), ("val", 3)):
        for name in ("n01", "n02"):
            for i in range(count):
                w, h = sizes[i % len(sizes)]
                write_png(
                    tmp_path / split / name / f"{i}.png",
                    rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                )
    return tmp_path


def loader_batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, y) for x, y in loader]


def test_streaming_train_batches_are_uint8_normalised_on_the_device_and_deterministic(
    streaming_root,
):
    def make(**kw):
        return make_streaming_loader(
            streaming_root,
            "train",
            4,
            train=True,
            image_size=16,
            workers=0,
            seed=1,
            epoch=0,
            backend="pil",
            **kw,
        )

    first, again = loader_batches(make()), loader_batches(make())
    assert len(first) == 3  # 12 images, batch 4, drop_last
    x, y = first[0]
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.uint8 and y.dtype == torch.int64
    normalised = streaming_module.normalise(x)  # where the batch lands (the device)
    assert normalised.dtype == torch.float32
    assert -2.2 < float(normalised.min()) and float(normalised.max()) < 2.7  # ImageNet range
    for (xa, ya), (xb, yb) in zip(first, again):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    next_epoch = loader_batches(
        make_streaming_loader(
            streaming_root,
            "train",
            4,
            train=True,
            image_size=16,
            workers=0,
            seed=1,
            epoch=1,
            backend="pil",
        )
    )
    assert not torch.equal(next_epoch[0][0], first[0][0])


def test_streaming_augmentation_depends_on_sample_not_on_batching_or_workers(streaming_root):
    common = dict(train=True, image_size=16, seed=5, epoch=2, backend="pil")
    in_process = make_streaming_loader(streaming_root, "train", 4, workers=0, **common)
    with_workers = make_streaming_loader(streaming_root, "train", 2, workers=2, **common)
    order = list(in_process.sampler)
    a = torch.cat([x for x, _ in in_process])
    b = torch.cat([x for x, _ in with_workers])
    assert torch.equal(a, b)
    assert torch.equal(in_process.dataset[order[0]][0], a[0])


def test_streaming_sampler_shards_are_disjoint_and_shared_within_a_dp_rank():
    samplers = [
        streaming_module.ShardedSampler(103, shuffle=True, seed=0, epoch=4, dp_rank=r, dp_size=4)
        for r in range(4)
    ]
    shards = [list(s) for s in samplers]
    assert all(len(s) == len(sampler) == 25 for s, sampler in zip(shards, samplers))
    assert len(set().union(*map(set, shards))) == 100
    same_rank = list(
        streaming_module.ShardedSampler(103, shuffle=True, seed=0, epoch=4, dp_rank=2, dp_size=4)
    )
    assert same_rank == shards[2]
    other_epoch = list(
        streaming_module.ShardedSampler(103, shuffle=True, seed=0, epoch=5, dp_rank=2, dp_size=4)
    )
    assert other_epoch != shards[2]
    evaluation = [
        list(
            streaming_module.ShardedSampler(
                10, shuffle=False, seed=0, epoch=0, dp_rank=r, dp_size=3
            )
        )
        for r in range(3)
    ]
    assert sorted(sum(evaluation, [])) == list(range(10))


def test_streaming_sampler_parts_split_each_full_batch_between_the_gp_ranks():
    common = dict(shuffle=True, seed=0, epoch=3, dp_rank=1, dp_size=2, batch_size=8)
    whole = list(streaming_module.ShardedSampler(43, **common))  # 21: 2 full batches
    parts = [list(streaming_module.ShardedSampler(43, part=p, parts=4, **common)) for p in range(4)]
    assert all(len(p) == 4 for p in parts)  # 2 per batch each
    batches = [sum((p[2 * b : 2 * b + 2] for p in parts), []) for b in range(2)]
    assert batches == [whole[:8], whole[8:16]]  # gathered in part order: the whole batches
    resumed = streaming_module.ShardedSampler(43, skip=8, part=1, parts=4, **common)
    assert list(resumed) == parts[1][2:] and len(resumed) == 2


def _gp_batches(root):
    import torch.distributed as dist

    loader = streaming_module.StreamingEpochLoader(
        root,
        "train",
        4,
        train=True,
        device="cpu",
        image_size=16,
        workers=0,
        seed=1,
        gp_group=dist.group.WORLD,
    )
    loader.set_epoch(2)
    return [(x, y) for x, y in loader], loader.gp_group is not None


def test_gp_ranks_decode_a_slice_each_and_gather_the_batch_of_one_decoder(streaming_root):
    from distributed import run_on_ranks

    one = streaming_module.StreamingEpochLoader(
        streaming_root, "train", 4, train=True, device="cpu", image_size=16, workers=0, seed=1
    )
    one.set_epoch(2)
    expected = list(one)
    for batches, split in run_on_ranks(2, _gp_batches, streaming_root):
        assert split and len(batches) == len(expected) == 3
        for (x, y), (ex, ey) in zip(batches, expected):
            assert torch.equal(x, ex) and torch.equal(y, ey)


def test_streamed_files_are_held_in_one_buffer_and_any_path_round_trips(tmp_path):
    # Not a list of Python strings (forked workers would copy them: see ImageFileDataset).
    for name in ("café/ñ.png", "plain/a.png"):
        write_png(tmp_path / "val" / name, np.full((9, 7, 3), len(name), np.uint8))
    loader = make_streaming_loader(tmp_path, "val", 2, train=False, image_size=4, workers=0,
                                   backend="pil")
    assert loader.dataset.files.dtype.kind == "S" and loader.dataset.labels.dtype == np.int64
    ((x, y),) = loader_batches(loader)
    assert y.tolist() == [0, 1] and x[:, 0, 0, 0].tolist() == [len("café/ñ.png"), 11]


def test_a_streamed_eval_split_without_a_training_class_is_refused(streaming_root):
    from twolevel_dist.config import DatasetConfig
    from twolevel_dist.engine.loaders import build_loaders
    config = DatasetConfig(name="imagenet", root=str(streaming_root), workers=0, image_size=16)
    train, test = build_loaders(config, seed=0, device=torch.device("cpu"), per_replica=4)
    assert test.classes == train.classes == ["n01", "n02"] and test.num_classes == 2
    (streaming_root / "val" / "n01").rename(streaming_root / "val" / "n00")  # n02 would be 1
    with pytest.raises(DataError, match=r"val must have the same class folders as .*train: "
                                        r"missing \['n01'\], unexpected \['n00'\]"):
        build_loaders(config, seed=0, device=torch.device("cpu"), per_replica=4)


def _loaders_where_rank_1_lists_one_image_less(root):
    import torch.distributed as dist

    from twolevel_dist.config import DatasetConfig
    from twolevel_dist.engine.loaders import build_loaders
    listing = streaming_module.list_image_files
    if dist.get_rank() == 1:        # a node whose file system cache is stale
        streaming_module.list_image_files = lambda *a: tuple(x[:-1] for x in listing(*a))
    config = DatasetConfig(name="imagenet", root=str(root), workers=0, image_size=16)
    try:
        build_loaders(config, seed=0, device=torch.device("cpu"), rank=dist.get_rank(),
                      world=2, dp_rank=dist.get_rank(), dp_size=2, per_replica=2)
    except DataError as error:
        return str(error)
    return None


def test_ranks_that_list_different_streamed_images_are_stopped(streaming_root):
    from distributed import run_on_ranks

    for error in run_on_ranks(2, _loaders_where_rank_1_lists_one_image_less, streaming_root):
        assert error.startswith(f"the ranks list different images under {streaming_root}: "
                                f"rank 0 sees 12 / 6 (train / val), rank 1 11 / 5;"), error


def test_streaming_eval_is_resize_then_center_crop(streaming_root, tmp_path):
    # Geometry: short side 32 resized to round(16 * 256/224) = 18, a centred 16/18 of it kept.
    assert streaming_module.center_crop_box((64, 32), 16) == (18, 2, 28, 28)
    assert streaming_module.center_crop_box((224, 224), 224) == (14, 14, 196, 196)
    # Pixels: a constant-colour image stays that colour, normalised with ImageNet statistics.
    root = tmp_path / "constant"
    write_png(root / "val" / "a" / "0.png", np.full((30, 50, 3), (255, 0, 128), np.uint8))
    ((x, y),) = loader_batches(
        make_streaming_loader(root, "val", 1, train=False, image_size=8, workers=0, backend="pil")
    )
    expected = (
        torch.tensor([255, 0, 128]) / 255 - torch.tensor(data.IMAGENET_MEAN)
    ) / torch.tensor(data.IMAGENET_STD)
    assert torch.equal(
        x[0], torch.tensor([255, 0, 128], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8)
    )
    assert torch.allclose(
        streaming_module.normalise(x)[0], expected.view(3, 1, 1).expand(3, 8, 8), atol=1e-5
    )
    assert y.tolist() == [0]


def test_streaming_eval_keeps_order_and_partial_batch(streaming_root):
    loader = make_streaming_loader(
        streaming_root, "val", 4, train=False, image_size=8, workers=0, backend="pil"
    )
    got = loader_batches(loader)
    assert [len(y) for _, y in got] == [4, 2]
    assert torch.cat([y for _, y in got]).tolist() == [0, 0, 0, 1, 1, 1]


def test_random_resized_crop_boxes_respect_scale_ratio_and_bounds():
    rng = np.random.default_rng(0)
    for _ in range(300):
        left, top, w, h = streaming_module.random_resized_crop_box((120, 80), rng)
        assert 0 <= left and left + w <= 120 and 0 <= top and top + h <= 80
        assert 0.08 * 0.8 <= (w * h) / (120 * 80) <= 1.0
    # Extreme aspect ratio: every attempt fails, the fallback clamps the ratio to 4/3.
    assert streaming_module.random_resized_crop_box((1000, 10), rng) == (493, 0, 13, 10)


def test_streaming_errors_name_the_path(tmp_path):
    with pytest.raises(DataError) as info:
        make_streaming_loader(tmp_path, "train", 4, train=True, workers=0)
    assert str(tmp_path / "train") in str(info.value) and "<class>" in str(info.value)
    with pytest.raises(DataError, match="batch_size"):
        make_streaming_loader(tmp_path, "train", 0, train=True, workers=0)


def test_torchvision_loader_returns_none_when_the_import_fails(monkeypatch):
    # sys.modules[name] = None makes "import name" raise ImportError; the submodules too, since
    # where torchvision really imports (torch 2.11) an earlier test may have imported them.
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(streaming_module.importlib.util, "find_spec", lambda name: object())
    assert streaming_module.load_torchvision_functional() is None
    assert streaming_module._choose_backend("auto") == "pil"
    with pytest.raises(DataError, match="backend='pil'"):
        streaming_module._choose_backend("torchvision")


def test_streaming_uses_torchvision_kernels_where_torchvision_imports(streaming_root, monkeypatch):
    """A fake torchvision that records calls and delegates to simple tensor ops."""
    calls = []

    def pil_to_tensor(image):
        calls.append("pil_to_tensor")
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def resized_crop(pixels, top, left, height, width, size, antialias=True):
        calls.append(("resized_crop", top, left, height, width, tuple(size)))
        crop = pixels[:, top : top + height, left : left + width].float()[None]
        return (
            torch.nn.functional.interpolate(crop, size=tuple(size), mode="bilinear")[0]
            .round()
            .to(torch.uint8)
        )

    def hflip(pixels):
        calls.append("hflip")
        return pixels.flip(-1)

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.pil_to_tensor, functional.resized_crop, functional.hflip = (
        pil_to_tensor,
        resized_crop,
        hflip,
    )
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.transforms", transforms)
    monkeypatch.setitem(sys.modules, "torchvision.transforms.functional", functional)
    monkeypatch.setattr(streaming_module.importlib.util, "find_spec", lambda name: object())

    assert streaming_module.load_torchvision_functional() is functional
    loader = make_streaming_loader(streaming_root, "val", 2, train=False, image_size=8, workers=0)
    assert loader.dataset.backend == "torchvision"
    x, _ = next(iter(loader))
    assert x.shape == (2, 3, 8, 8)
    # val/n01/0.png is 40x30: short side 30 -> crop of 30 * 8/9 = 26.67 -> 27 px, centred:
    # left = (40 - 26.67) / 2 = 6.67 -> 7, top = (30 - 26.67) / 2 = 1.67 -> 2.
    assert ("resized_crop", 2, 7, 27, 27, (8, 8)) in calls
    train = make_streaming_loader(
        streaming_root, "train", 12, train=True, image_size=8, workers=0, drop_last=False
    )
    next(iter(train))
    assert "hflip" in calls  # 12 samples: at least one flipped (p = 1 - 2**-12)


def test_torchvision_is_not_imported_on_the_cpu_path(tmp_path, monkeypatch):
    # Where torchvision imports (torch 2.11), another test may have imported it already.
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    train, test = load_arrays("synthetic", synthetic_train_size=64, synthetic_test_size=16)
    for x, _ in DeviceLoader(train, 16, train=True, device="cpu", seed=0):
        pass
    make_image_folder(tmp_path / "set")
    load_image_folder(tmp_path / "set")
    assert "torchvision" not in sys.modules


# ============================================================================ registry


def test_load_arrays_synthetic_forwards_options():
    train, test = load_arrays(
        "Synthetic",
        seed=3,
        image_size=16,
        synthetic_train_size=40,
        synthetic_test_size=8,
        num_classes=4,
    )
    assert train.images.shape == (40, 3, 16, 16) and len(test) == 8 and train.num_classes == 4
    expected, _ = make_synthetic(num_classes=4, train_size=40, test_size=8, image_size=16, seed=3)
    assert torch.equal(train.images, expected.images)


def test_load_arrays_dispatches_to_cifar_and_imagefolder(tmp_path):
    write_cifar10(tmp_path / "cifar")
    write_cifar100(tmp_path / "cifar")
    assert len(load_arrays("cifar10", root=tmp_path / "cifar")[0]) == 100
    assert load_arrays("cifar100", root=tmp_path / "cifar")[0].num_classes == 100
    make_image_folder(tmp_path / "folder")
    train, _ = load_arrays(
        "imagefolder", root=tmp_path / "folder", image_size=4, cache_dir=tmp_path / "c"
    )
    assert train.images.shape[1:] == (3, 4, 4)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("mnist", {}, "valid names are synthetic, cifar10, cifar100, imagefolder, imagenet"),
        ("imagenet", {}, "make_streaming_loader"),
        ("cifar10", {}, "dataset.root"),
        ("cifar10", {"root": "x", "image_size": 64}, "null or 32"),
        ("imagefolder", {"root": "x", "download": True}, "cannot be downloaded"),
    ],
)
def test_load_arrays_errors(name, kwargs, message):
    with pytest.raises(DataError, match=message):
        load_arrays(name, **kwargs)


def test_load_arrays_checks_num_classes_against_the_data(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match="has 10 classes but num_classes=100"):
        load_arrays("cifar10", root=tmp_path, num_classes=100)


def test_is_streaming():
    assert is_streaming("imagenet") and is_streaming("ImageNet")
    assert not any(is_streaming(n) for n in ("synthetic", "cifar10", "cifar100", "imagefolder"))
    with pytest.raises(DataError, match="valid names"):
        is_streaming("svhn")

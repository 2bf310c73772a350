"""Nothing silent, nothing left: long work says how far it is with true times (decoding a data
set, evaluating, compress's phases), the ETA counts the evaluations, and a refused run leaves
no directory, says why once (under torchrun too) and a finished run leaves no lock."""

import logging

import torch
from test_data import make_image_folder, make_tar_gz

from twolevel_dist.data import image_folder
from twolevel_dist.data.image_folder import load_image_folder


def _messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records]


# --- data preparation ----------------------------------------------------------------------------

def test_decoding_reports_progress_and_a_cached_start_says_where_it_read(tmp_path, monkeypatch,
                                                                         caplog):
    root = tmp_path / "set"
    make_image_folder(root, per_class=(4, 2))                # 12 train, 6 test images
    monkeypatch.setattr(image_folder, "_IMAGES_PER_TASK", 4)
    monkeypatch.setattr(image_folder, "PROGRESS_EVERY_S", 0.0)
    caplog.set_level(logging.INFO)
    load_image_folder(root, cache_dir=tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("*.npz")
    what = f"decoding 18 images of {root} (12 train, 6 test) into the cache {cache}"
    assert _messages(caplog) == [f"{what} ...", f"{what}: 4/18 images (22%), 0 s",
                                 f"{what}: 8/18 images (44%), 0 s",
                                 f"{what}: 12/18 images (67%), 0 s",
                                 f"{what}: 16/18 images (89%), 0 s",
                                 f"{what}: done in 0 s (0 MB written)"]
    caplog.clear()
    load_image_folder(root, cache_dir=tmp_path / "cache")
    (line,) = _messages(caplog)
    assert line.startswith(f"read 18 decoded images of {root} from the cache {cache} (0 MB) in")


def test_the_cache_moves_with_twolevel_cache_or_dataset_cache_dir(tmp_path, monkeypatch, caplog):
    from twolevel_dist.config import DatasetConfig
    from twolevel_dist.engine.loaders import build_loaders
    root = tmp_path / "set"
    make_image_folder(root)
    monkeypatch.setenv("TWOLEVEL_CACHE", str(tmp_path / "env"))
    caplog.set_level(logging.INFO)
    archive = make_tar_gz(tmp_path / "set.tar.gz", root)
    load_image_folder(archive)
    load_image_folder(archive)
    (extracted,) = (tmp_path / "env" / "extracted").iterdir()
    assert len(list((tmp_path / "env").glob("*.npz"))) == 1
    lines = _messages(caplog)
    assert lines[0] == (f"extracting {archive} into {extracted} (once: later starts reuse it) "
                        f"...") and "done in" in lines[1]
    assert f"{archive}: using its extracted copy {extracted}" in lines
    load_image_folder(root)                                  # a plain folder: there too
    assert len(list((tmp_path / "env").glob("*.npz"))) == 2
    assert not (root / ".twolevel_cache").exists()
    config = DatasetConfig(name="imagefolder", root=str(root), cache_dir=str(tmp_path / "key"))
    build_loaders(config, seed=0, device=torch.device("cpu"), per_replica=2)
    assert len(list((tmp_path / "key").glob("set-*.npz"))) == 1   # the key wins

"""The dataset layer end to end on tiny datasets written in the real on-disk formats.

tonic accepts a dataset folder only when it holds the full number of files (e.g.
1000 ``.aedat4``); like tonic's own tests, these tests patch the dataset class's
``_check_exists``. msgsnn's own layout check is never patched.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import aedat
import numpy as np
import pytest
import tonic
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader

from msgcli.config import ConfigError, RunConfig, apply_overrides
from msgcli.data import build_datasets, check_datasets, list_datasets, resolve_root
from msgcli.data import clips as clips_module
from msgcli.data.augment import ClipAugment, rotate_nearest, shift_with_zeros
from msgcli.data.emulator import SaccadeDVS
from msgcli.data.cache import cache_stem
from msgcli.data.frames import FRAME_FORMAT_VERSION, FrameSpec, event_counts, events_to_frames, resize
from msgcli.data.split import class_balanced_weights, split_per_class
from msgcli.data.registry import worker_processes
from msgcli.errors import BadSample, DatasetMissing
from tests.conftest import group_of_one
from tests.formats import write_aedat4, write_atis_bin, write_cifar10, write_gesture_npy

SAMPLE_NMNIST = Path(__file__).resolve().parent / "data" / "sample_nmnist.bin"  # a real N-MNIST recording (ATIS .bin)


def config(tmp_path: Path, name: str, T: int = 4, size: int = 16, **data) -> RunConfig:
    """A config reading ``tmp_path/data`` and caching in ``tmp_path/cache``, augmentation off."""
    cfg = RunConfig(T=T)
    cfg.data.name = name
    cfg.data.size = size
    cfg.data.root = str(tmp_path / "data")
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.num_workers = 0
    cfg.data.augment.crop = cfg.data.augment.flip = cfg.data.augment.autoaugment = False
    cfg.data.augment.rotate = 0.0
    cfg.data.augment.cutout = 0
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def random_events(rng: np.random.Generator, n: int, width: int, height: int):
    """``n`` events inside a ``width`` x ``height`` sensor as (x, y, t, p), t sorted, in us."""
    return rng.integers(0, width, n), rng.integers(0, height, n), np.sort(rng.integers(0, 200_000, n)), rng.integers(0, 2, n)


@pytest.fixture
def data_tonic_accepts_few_files(monkeypatch):
    """tonic's "is it downloaded?" check, patched as tonic's own tests do; downloads fail loudly."""
    for cls in (tonic.datasets.CIFAR10DVS, tonic.datasets.NCALTECH101, tonic.datasets.DVSGesture, tonic.datasets.NMNIST):
        monkeypatch.setattr(cls, "_check_exists", lambda self: True)
    monkeypatch.setattr(tonic.dataset, "download_and_extract_archive", _no_download)


def _no_download(*args, **kwargs):
    raise AssertionError("tonic tried to download")


def write_cifar10dvs(root: Path, per_class: dict[str, int], seed: int = 0) -> dict[str, list[int]]:
    """AEDAT4 recordings ``<class>/<k>.aedat4`` whose event count is ``20 + k`` (to recognise them)."""
    rng = np.random.default_rng(seed)
    base = root / "CIFAR10DVS"
    base.mkdir(parents=True)
    (base / "CIFAR10DVS.zip").touch()
    counts = {}
    for name, n in per_class.items():
        counts[name] = [20 + k for k in range(n)]
        for k in range(n):
            write_aedat4(base / name / f"cifar10_{name}_{k}.aedat4", *random_events(rng, 20 + k, 128, 128))
    return counts


def write_nmnist(root: Path, recordings: dict[tuple[str, str, str], tuple]) -> None:
    """``NMNIST/{Train,Test}/<digit>/<name>.bin`` from {(folder, digit, name): (x, y, t, p)}."""
    base = root / "NMNIST"
    base.mkdir(parents=True)
    (base / "train.zip").touch()
    (base / "test.zip").touch()
    for (folder, digit, name), events in recordings.items():
        write_atis_bin(base / folder / digit / f"{name}.bin", *events)


# ------------------------------------------------------------------ registry and errors


def test_registry_has_every_dataset():
    assert set(list_datasets()) >= {
        "cifar10dvs", "ncaltech101", "dvsgesture", "nmnist", "cifar10", "cifar100", "imagenet",
        "digits-dvs", "digits-dvs-hard", "synthetic",
    }


def test_unknown_dataset_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'nmnist'"):
        build_datasets(config(tmp_path, "nmnsit"))


def test_resolve_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("MSGSNN_DATA", str(tmp_path))
    assert resolve_root("") == tmp_path
    assert resolve_root("/elsewhere") == Path("/elsewhere")
    monkeypatch.delenv("MSGSNN_DATA")
    assert resolve_root("") == Path.home() / "datasets"


@pytest.mark.parametrize(
    "name, layout",
    [
        ("cifar10dvs", "CIFAR10DVS/CIFAR10DVS.zip"),
        ("ncaltech101", "NCALTECH101/Caltech101/<class>/*.bin"),
        ("dvsgesture", "DVSGesture/ibmGestureTrain.tar.gz"),
        ("nmnist", "NMNIST/train.zip"),
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("imagenet", "imagenet/train/<wnid>/*.JPEG"),
    ],
)
def test_missing_dataset_names_layout_without_downloading(tmp_path, monkeypatch, name, layout):
    monkeypatch.setattr(tonic.dataset, "download_and_extract_archive", _no_download)
    with pytest.raises(DatasetMissing) as err:
        build_datasets(config(tmp_path, name))
    message = str(err.value)
    assert "\n" not in message and message.startswith(name) and layout in message and "http" in message


@pytest.mark.parametrize("name", ["cifar10dvs", "ncaltech101", "dvsgesture", "nmnist", "cifar10", "cifar100", "imagenet"])
def test_check_datasets_stops_as_the_builder_does_without_reading(tmp_path, monkeypatch, name):
    monkeypatch.setattr(tonic.dataset, "download_and_extract_archive", _no_download)
    with pytest.raises(DatasetMissing) as checked:
        check_datasets(config(tmp_path, name))
    with pytest.raises(DatasetMissing) as built:
        build_datasets(config(tmp_path, name))
    assert str(checked.value) == str(built.value)


def test_check_datasets_passes_when_the_files_are_in_place(tmp_path):
    write_cifar10dvs(tmp_path / "data", {"airplane": 2})
    check_datasets(config(tmp_path, "cifar10dvs"))  # the full count is the builder's business
    check_datasets(config(tmp_path, "synthetic"))  # generated: nothing to check


def test_partly_extracted_dataset_is_missing_not_downloaded(tmp_path, monkeypatch):
    """Archive and some files present, but fewer than tonic wants: tonic would download."""
    monkeypatch.setattr(tonic.dataset, "download_and_extract_archive", _no_download)
    write_cifar10dvs(tmp_path / "data", {"airplane": 2})
    with pytest.raises(DatasetMissing, match="only 2 \\*.aedat4 files"):
        build_datasets(config(tmp_path, "cifar10dvs"))


# ------------------------------------------------------------------ frames


def test_sample_nmnist_frames_drop_the_last_event_as_tonic_or_keep_it(tmp_path, data_tonic_accepts_few_files):
    """The real N-MNIST recording through the N-MNIST path: by default tonic's counts exactly (its
    bins drop the last event, as the release's frames do); ``data.frame_tail=keep`` counts every event."""
    for folder in ("Train", "Test"):
        target = tmp_path / "data" / "NMNIST" / folder / "3" / "00001.bin"
        target.parent.mkdir(parents=True)
        shutil.copy(SAMPLE_NMNIST, target)
    for archive in ("train.zip", "test.zip"):
        (tmp_path / "data" / "NMNIST" / archive).touch()
    events = tonic.io.read_mnist_file(str(SAMPLE_NMNIST), dtype=tonic.datasets.NMNIST.dtype)
    tonic_frames = tonic.transforms.ToFrame(sensor_size=(34, 34, 2), n_time_bins=10)(events)
    assert tonic_frames.sum() == len(events) - 1  # the event tonic's last bin ends before

    bundle = build_datasets(config(tmp_path, "nmnist", T=10, size=34))
    frames, label = bundle.train[0]
    assert frames.shape == (10, 2, 34, 34) and label == 3
    assert frames.dtype == torch.float32 and torch.equal(frames, torch.from_numpy(tonic_frames.astype(np.float32)))
    assert bundle.info.classes[3] == "3 - three" and bundle.info.sensor_size == (34, 34, 2)

    kept, _ = build_datasets(config(tmp_path, "nmnist", T=10, size=34, frame_tail="keep")).train[0]
    assert kept.sum().item() == len(events)
    last = events[-1]
    where = (9, int(last["p"]), int(last["y"]), int(last["x"]))
    expected = torch.from_numpy(tonic_frames.astype(np.float32))
    expected[where] += 1
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("tail, last_bin", [("drop", [0, 0, 0, 0, 0, 1, 0, 0]), ("keep", [0, 0, 0, 0, 0, 1, 1, 0])])
def test_event_counts_drop_the_tail_as_tonic_or_keep_it_in_the_last_bin(tail, last_bin):
    events = np.zeros(7, dtype=tonic.io.events_struct)
    events["t"] = [0, 10, 20, 30, 40, 50, 69]  # bins of (69 - 0) // 3 = 23 us end at 69, before the last event
    events["x"] = np.arange(7)
    counts = event_counts(events, (8, 1, 2), 3, tail)
    assert counts.dtype == np.int16
    assert counts[:, 0, 0].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0], last_bin]
    if tail == "drop":
        assert np.array_equal(counts, tonic.transforms.ToFrame(sensor_size=(8, 1, 2), n_time_bins=3)(events))
    else:
        assert counts.sum() == len(events)


def test_frame_tail_is_a_validated_config_key(tmp_path):
    assert RunConfig().data.frame_tail == "drop"
    assert apply_overrides(RunConfig(), {"data.frame_tail": "keep"}).data.frame_tail == "keep"
    with pytest.raises(ConfigError, match="data.frame_tail: .last. is not allowed; choose one of drop, keep"):
        apply_overrides(RunConfig(), {"data.frame_tail": "last"})
    with pytest.raises(ValueError, match="tail must be one of drop, keep"):
        FrameSpec(4, 16, (34, 34, 2), tail="last")


def test_resize_is_the_releases_bilinear_interpolation_bit_for_bit():
    frames = np.random.default_rng(0).random((3, 2, 34, 20)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(frames), size=(16, 16), mode="bilinear", align_corners=True)
    np.testing.assert_allclose(resize(frames, 16), expected.numpy(), atol=1e-5)
    counts = np.random.default_rng(1).poisson(3.0, (5, 2, 128, 128)).astype(np.int16)
    expected = F.interpolate(torch.tensor(counts, dtype=torch.float), size=[48, 48], mode="bilinear", align_corners=True)
    resized = resize(counts, 48)
    assert resized.dtype == np.float32 and np.array_equal(resized, expected.numpy())
    assert np.array_equal(resize(counts, 128), counts.astype(np.float32))


@pytest.mark.parametrize(
    "events, fault",
    [
        (dict(x=[1, 40], y=[1, 2]), "events outside the 34x34 sensor"),
        (dict(x=[], y=[]), "empty recording"),
    ],
)
def test_unusable_recordings_raise_bad_sample(events, fault):
    stream = np.zeros(len(events["x"]), dtype=tonic.io.events_struct)
    stream["x"], stream["y"], stream["t"] = events["x"], events["y"], np.arange(len(events["x"]))
    with pytest.raises(BadSample, match=f"^rec.bin: {fault}"):
        events_to_frames(stream, FrameSpec(4, 16, (34, 34, 2)), "rec.bin")


def test_bad_recordings_stop_or_are_skipped_and_counted(tmp_path, data_tonic_accepts_few_files, caplog):
    rng = np.random.default_rng(1)
    good = lambda: random_events(rng, 30, 34, 34)  # noqa: E731
    write_nmnist(tmp_path / "data", {
        ("Train", "0", "a"): good(), ("Train", "0", "b"): good(), ("Train", "1", "c"): good(),
        ("Train", "1", "wide"): (np.array([3, 60]), np.array([3, 3]), np.array([0, 10]), np.array([0, 1])),
        ("Test", "0", "d"): good(), ("Test", "1", "e"): good(),
    })
    (tmp_path / "data" / "NMNIST" / "Train" / "1" / "empty.bin").touch()
    with pytest.raises(BadSample, match=r"Train/1/empty\.bin: empty file"):
        build_datasets(config(tmp_path, "nmnist"))

    skip = config(tmp_path, "nmnist", skip_bad_samples=True)
    with caplog.at_level(logging.WARNING):
        bundle = build_datasets(skip)
    assert bundle.info.skipped == 2 and bundle.info.n_train == 3 and len(bundle.train) == 3
    assert "wide.bin: events outside the 34x34 sensor" in caplog.text
    assert build_datasets(skip).info.skipped == 2  # counted again from the cache
    with pytest.raises(BadSample, match="empty.bin"):  # and a run without skipping still stops
        build_datasets(config(tmp_path, "nmnist"))


# ------------------------------------------------------------------ real formats end to end


def test_aedat4_writer_reads_back_through_aedat_and_tonic(tmp_path):
    x, y, t, p = random_events(np.random.default_rng(2), 150, 128, 128)
    write_aedat4(tmp_path / "a.aedat4", x, y, t, p)
    assert aedat.Decoder(str(tmp_path / "a.aedat4")).id_to_stream()[0] == {"type": "events", "width": 128, "height": 128}
    events = tonic.io.read_aedat4(str(tmp_path / "a.aedat4"))
    assert (events["t"] == t).all() and (events["x"] == x).all() and (events["y"] == y).all() and (events["on"] == p).all()


def test_cifar10dvs_split_is_per_class_in_path_order(tmp_path, data_tonic_accepts_few_files, monkeypatch):
    counts = write_cifar10dvs(tmp_path / "data", {"airplane": 5, "truck": 5})
    real_walk = os.walk
    shuffle = random.Random(0).shuffle

    def shuffled_walk(top, *args, **kwargs):  # a filesystem that lists files in another order each time
        for path, dirs, files in real_walk(top, *args, **kwargs):
            shuffle(files)
            yield path, dirs, files

    monkeypatch.setattr(tonic.datasets.cifar10dvs.os, "walk", shuffled_walk)
    sums = []
    for attempt in range(2):
        cfg = config(tmp_path, "cifar10dvs", T=3, size=128, train_fraction=0.8, cache_dir=str(tmp_path / f"cache{attempt}"))
        bundle = build_datasets(cfg)
        sums.append([(round(frames.sum().item()), label) for frames, label in bundle.train])
        test = [(round(frames.sum().item()), label) for frames, label in bundle.test]
    assert sums[0] == sums[1]
    # files sort as cifar10_airplane_0 ... _4: the first four train, the last one tests;
    # each clip counts all events of its recording but the last (tonic's bins end before it)
    assert sums[0] == [(n - 1, 0) for n in counts["airplane"][:4]] + [(n - 1, 9) for n in counts["truck"][:4]]
    assert test == [(counts["airplane"][4] - 1, 0), (counts["truck"][4] - 1, 9)]
    info = bundle.info
    assert (info.n_train, info.n_test, info.num_classes, info.input_shape) == (8, 2, 10, (3, 2, 128, 128))


def test_ncaltech101_frames_each_recording_at_its_extent(tmp_path, data_tonic_accepts_few_files):
    base = tmp_path / "data" / "NCALTECH101"
    base.mkdir(parents=True)
    (base / "N-Caltech101-archive.zip").touch()
    rng = np.random.default_rng(3)
    for cls, n, (width, height) in (("Faces_easy", 4, (200, 150)), ("accordion", 2, (120, 170))):
        for k in range(n):
            x, y, t, p = random_events(rng, 80, width, height)
            x[0], y[0] = width - 1, height - 1  # the far corner of this recording's extent, in the first bin
            write_atis_bin(base / "Caltech101" / cls / f"image_{k:04d}.bin", x, y, t, p)
    cfg = config(tmp_path, "ncaltech101", T=5, size=24, train_fraction=0.5, balanced_sampler=True)
    bundle = build_datasets(cfg)
    assert bundle.info.classes == ["Faces_easy", "accordion"]
    assert [label for _, label in bundle.train] == [0, 0, 1] and bundle.info.n_test == 3
    frames, _ = bundle.train[2]
    assert frames.shape == (5, 2, 24, 24) and frames[0, :, -1, -1].sum() > 0
    torch.testing.assert_close(bundle.sample_weights, torch.tensor([0.5, 0.5, 1.0]))


def test_dvsgesture_uses_the_official_split(tmp_path, data_tonic_accepts_few_files):
    base = tmp_path / "data" / "DVSGesture"
    rng = np.random.default_rng(4)
    for folder, users in (("ibmGestureTrain", (1, 2)), ("ibmGestureTest", (24,))):
        base.mkdir(parents=True, exist_ok=True)
        (base / f"{folder}.tar.gz").touch()
        for user in users:
            for label in (0, 10):
                x, y, t, p = random_events(rng, 60, 128, 128)
                write_gesture_npy(base / folder / f"user{user:02d}_led" / f"{label}.npy", x, y, p, t // 1000)
    bundle = build_datasets(config(tmp_path, "dvsgesture", T=4, size=32))
    assert (bundle.info.n_train, bundle.info.n_test, bundle.info.num_classes) == (4, 2, 11)
    assert sorted(label for _, label in bundle.train) == [0, 0, 10, 10]
    assert bundle.test[0][0].shape == (4, 2, 32, 32)


def test_cifar10_from_torchvisions_pickled_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    rng = np.random.default_rng(5)
    classes = [f"class{i}" for i in range(10)]
    write_cifar10(
        tmp_path / "data",
        (rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), list(range(10))),
        (rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), [3, 1, 4, 1]),
        classes,
    )
    cfg = config(tmp_path, "cifar10")
    plain = build_datasets(cfg)
    assert plain.info.classes == classes and (plain.info.n_train, plain.info.n_test) == (10, 4)
    image, label = plain.test[2]
    assert image.shape == (3, 32, 32) and label == 4 and image.dtype == torch.float32
    cfg.data.augment.crop = cfg.data.augment.flip = cfg.data.augment.autoaugment = True
    cfg.data.augment.cutout = 16
    augmented = build_datasets(cfg)
    assert augmented.train[0][0].shape == (3, 32, 32)
    torch.testing.assert_close(augmented.test[2][0], image)  # the test split is only normalised


# ------------------------------------------------------------------ cache


def test_cache_is_reused_and_keyed_by_every_frame_parameter(tmp_path, data_tonic_accepts_few_files, monkeypatch, caplog):
    write_cifar10dvs(tmp_path / "data", {"airplane": 3, "cat": 3})
    cache = tmp_path / "cache"
    first = build_datasets(config(tmp_path, "cifar10dvs", train_fraction=0.67))
    expected = first.train[1][0]
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 4 and all(".tmp" not in name for name in files)

    def no_rendering(*args, **kwargs):
        raise AssertionError("rendered although cached")

    with monkeypatch.context() as patch:
        patch.setattr("msgcli.data.clips.render", no_rendering)
        again = build_datasets(config(tmp_path, "cifar10dvs", train_fraction=0.67))
    torch.testing.assert_close(again.train[1][0], expected)

    for changed in (dict(T=5), dict(size=20), dict(train_fraction=0.5)):
        cfg = config(tmp_path, "cifar10dvs", **{"train_fraction": 0.67, **changed})
        bundle = build_datasets(cfg)
        assert bundle.train[0][0].shape == (cfg.T, 2, cfg.data.size, cfg.data.size)
    assert len(list(cache.glob("*.npy"))) == 8

    for target in cache.glob("cifar10dvs-train-T4-s16-*.npy"):  # a new file: the old one stays mapped
        target.with_suffix(".bad").write_bytes(b"not a numpy file")
        os.replace(target.with_suffix(".bad"), target)
    with caplog.at_level(logging.WARNING):
        rebuilt = build_datasets(config(tmp_path, "cifar10dvs", train_fraction=0.67))
    assert "unreadable" in caplog.text and "rebuilding" in caplog.text
    torch.testing.assert_close(rebuilt.train[1][0], expected)


def test_a_cache_of_the_previous_frame_format_is_rebuilt_not_reused(tmp_path, data_tonic_accepts_few_files, monkeypatch, caplog):
    """Caches written before issue 25 (format 1: float16 clips, the tail kept, no ``tail`` in the key) are not read."""
    write_cifar10dvs(tmp_path / "data", {"airplane": 2, "cat": 2})
    cfg = config(tmp_path, "cifar10dvs", train_fraction=0.5)
    cache = tmp_path / "cache"
    current = build_datasets(cfg)
    expected = [x for x, _ in current.train]
    for meta_path in cache.glob("*.json"):  # each split as the previous version wrote it
        meta = json.loads(meta_path.read_text())
        assert meta["params"]["format"] == FRAME_FORMAT_VERSION == 2 and meta["params"]["tail"] == "drop"
        old_params = {**{k: v for k, v in meta["params"].items() if k != "tail"}, "format": 1}
        frames = np.load(meta_path.with_suffix(".npy"))
        old_stem = cache_stem(old_params)
        np.save(cache / f"{old_stem}.npy", (frames + 1).astype(np.float16))  # other numbers: a reuse would show
        (cache / f"{old_stem}.json").write_text(json.dumps({**meta, "params": old_params}))
        meta_path.unlink()
        meta_path.with_suffix(".npy").unlink()
    old_files = {p.name: p.read_bytes() for p in cache.iterdir()}

    rendered = []
    real_render = clips_module.render

    def counted_render(*args, **kwargs):
        rendered.append(args[1])
        return real_render(*args, **kwargs)

    monkeypatch.setattr(clips_module, "render", counted_render)
    rebuilt = build_datasets(cfg)
    assert len(rendered) == 2  # train and test rendered again
    assert all(torch.equal(x, e) for (x, _), e in zip(rebuilt.train, expected, strict=True))
    assert rebuilt.train.frames.dtype == np.float32
    assert {p.name: p.read_bytes() for p in cache.iterdir() if p.name in old_files} == old_files  # left as they were
    assert len(list(cache.glob("*.npy"))) == 4

    # the current key holding a float16 file (an interrupted downgrade, a hand copy) is rebuilt too
    current_files = [p for p in cache.glob("*.npy") if p.name not in old_files]
    target = next(p for p in current_files if p.name.startswith("cifar10dvs-train-"))
    np.save(target.with_suffix(".tmp.npy"), np.load(target).astype(np.float16))
    os.replace(target.with_suffix(".tmp.npy"), target)
    with caplog.at_level(logging.WARNING):
        again = build_datasets(cfg)
    assert "float16 clips" in caplog.text and "rebuilding" in caplog.text and len(rendered) == 3
    assert all(torch.equal(x, e) for (x, _), e in zip(again.train, expected, strict=True))


def test_a_recording_rewritten_at_the_same_size_is_rendered_again(tmp_path, data_tonic_accepts_few_files):
    write_cifar10dvs(tmp_path / "data", {"airplane": 2, "cat": 2})
    cfg = config(tmp_path, "cifar10dvs", train_fraction=0.5)
    before = build_datasets(cfg).train[0][0]
    path = next((tmp_path / "data" / "CIFAR10DVS" / "airplane").glob("*_0.aedat4"))
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    x, y, t, p = random_events(np.random.default_rng(99), 20, 128, 128)  # as many events as before, others
    write_aedat4(path, x, y, t, p)
    assert path.stat().st_size == size
    if path.stat().st_mtime_ns == mtime:  # a filesystem with coarse timestamps: the rewrite came later
        os.utime(path, ns=(mtime + 1_000_000, mtime + 1_000_000))
    after = build_datasets(cfg).train[0][0]
    expected = events_to_frames(tonic.io.make_structured_array(x, y, t, p), FrameSpec(4, 16, (128, 128, 2)), "new")
    assert not torch.equal(after, before)
    assert torch.equal(after, torch.from_numpy(expected))


def _global_random_states():
    return torch.get_rng_state(), pickle.dumps(np.random.get_state()), random.getstate()


@pytest.mark.parametrize("workers", [0, 2])
def test_building_datasets_draws_nothing_from_the_global_random_streams(tmp_path, data_tonic_accepts_few_files, workers):
    """A run that renders the frames (cold cache) and one that reads them start training from the same random state."""
    write_cifar10dvs(tmp_path / "data", {"airplane": 3, "cat": 3})
    cfg = config(tmp_path, "cifar10dvs", num_workers=workers, train_fraction=0.5)
    cfg.data.augment.crop = True
    built = {}
    for cache in ("cold", "warm"):
        torch.manual_seed(1), np.random.seed(1), random.seed(1)
        before = _global_random_states()
        bundle = build_datasets(cfg)
        after = _global_random_states()
        assert torch.equal(before[0], after[0]) and before[1:] == after[1:], cache
        built[cache] = np.asarray(bundle.test.frames)
    assert built["cold"].dtype == built["warm"].dtype == np.float32
    assert np.array_equal(built["cold"], built["warm"])
    for name in ("synthetic", "digits-dvs"):  # in memory, and the main job's dataset (emulator stubbed)
        before = _global_random_states()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(SaccadeDVS, "record", lambda self, images: [_one_event() for _ in images])
            build_datasets(config(tmp_path, name))
        after = _global_random_states()
        assert torch.equal(before[0], after[0]) and before[1:] == after[1:], name


def _one_event() -> np.ndarray:
    events = np.zeros(1, dtype=tonic.io.events_struct)
    events["x"] = events["y"] = 3
    return events


def test_cached_clips_load_in_worker_processes(tmp_path, data_tonic_accepts_few_files):
    write_cifar10dvs(tmp_path / "data", {"bird": 4})
    cfg = config(tmp_path, "cifar10dvs", num_workers=2, train_fraction=0.5)
    cfg.data.augment.crop = cfg.data.augment.flip = True
    bundle = build_datasets(cfg)  # rendered by two worker processes
    batches = list(DataLoader(bundle.train, batch_size=2, num_workers=2))
    assert batches[0][0].shape == (2, 4, 2, 16, 16) and batches[0][1].tolist() == [2, 2]
    assert pickle.loads(pickle.dumps(bundle.train)).__dict__["_frames"] is None  # re-mapped, not copied


def test_a_ranks_workers_from_the_fork_server_render_the_frames_the_process_renders(tmp_path, data_tonic_accepts_few_files):
    """In a rank, rendering workers receive tonic's dataset pickled (they are not forks of the rank)."""
    write_cifar10dvs(tmp_path / "data", {"bird": 2, "ship": 2})
    alone = build_datasets(config(tmp_path, "cifar10dvs", train_fraction=0.5, cache_dir=str(tmp_path / "alone")))
    with group_of_one():
        assert "multiprocessing_context" in worker_processes(2)
        ranked = build_datasets(config(tmp_path, "cifar10dvs", num_workers=2, train_fraction=0.5,
                                       cache_dir=str(tmp_path / "ranked")))
    for split in ("train", "test"):
        assert np.array_equal(np.asarray(getattr(ranked, split).frames), np.asarray(getattr(alone, split).frames))
    assert np.asarray(ranked.train.frames).sum() > 0


# ------------------------------------------------------------------ split, sampler, augmentation


def test_split_per_class_ignores_listing_order():
    keys = [f"{c}/{i:02d}" for c in "ab" for i in range(10)]
    labels = [0] * 10 + [1] * 10
    order = list(range(20))
    random.Random(0).shuffle(order)
    train, test = split_per_class([keys[i] for i in order], [labels[i] for i in order], 0.9)
    assert [keys[order[i]] for i in test] == ["a/09", "b/09"]
    assert [keys[order[i]] for i in train] == sorted(k for k in keys if not k.endswith("09"))


def test_class_balanced_weights():
    torch.testing.assert_close(class_balanced_weights([0, 0, 0, 1]), torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))


def test_clip_augment_transforms_all_frames_alike():
    torch.manual_seed(0)
    frame = np.random.default_rng(7).random((2, 12, 12), dtype=np.float32)
    clip = np.repeat(frame[None], 5, axis=0)
    for augment in (ClipAugment(crop_padding=4), ClipAugment(flip=True), ClipAugment(rotate=15), ClipAugment(roll=3)):
        out = augment(clip)
        assert out.shape == clip.shape
        assert all(np.array_equal(out[0], out[t]) for t in range(5))
    flips = {np.array_equal(ClipAugment(flip=True)(clip), clip[..., ::-1]) for _ in range(20)}
    assert flips == {True, False}


def test_clip_augment_matches_torchvisions_crop_and_rotation():
    clip = torch.rand(3, 2, 20, 20)
    padded = F.pad(clip, (4, 4, 4, 4))
    for top, left in ((0, 0), (8, 3), (2, 7)):
        expected = padded[..., top : top + 20, left : left + 20]
        np.testing.assert_array_equal(shift_with_zeros(clip.numpy(), 4 - top, 4 - left), expected.numpy())
    for degrees in (15.0, -9.5, 90.0):
        np.testing.assert_array_equal(rotate_nearest(clip.numpy(), degrees), TF.rotate(clip, degrees).numpy())


# ------------------------------------------------------------------ generated data


def test_emulated_dvs_is_deterministic_and_noise_only_adds_events():
    images = np.random.default_rng(6).random((3, 8, 8))
    sensor = SaccadeDVS(steps_per_saccade=4)
    first, again = sensor.record(images), sensor.record(images)
    noisy = SaccadeDVS(steps_per_saccade=4, noise_hz=20.0, hot_pixels=3, hot_pixel_hz=100.0).record(images)
    for events, same, more in zip(first, again, noisy):
        assert np.array_equal(events, same) and events.dtype == tonic.io.events_struct
        assert np.all(np.diff(events["t"]) >= 0) and set(np.unique(events["p"])) == {False, True}
        assert events["x"].max() < 34 and events["y"].max() < 34 and events["t"].max() < sensor.duration_us
        assert len(more) > len(events) and set(events.tolist()) <= set(more.tolist())


def test_digits_dvs_hard_trains_on_fewer_and_tests_on_the_same_digits(tmp_path, monkeypatch):
    """With the emulator replaced by one event a digit index, the frames tell which digit each sample is."""

    def one_event_per_index(self, images):
        # index + 1 events at t = 0 and a last one at t = 2, which tonic's bins (of 1 us at T = 2) leave out
        events = [np.zeros(index + 2, dtype=tonic.io.events_struct) for index in range(len(images))]
        for stream in events:
            stream["t"][-1] = 2
        return events

    monkeypatch.setattr(SaccadeDVS, "record", one_event_per_index)
    samples = {}
    for name in ("digits-dvs", "digits-dvs-hard"):
        bundle = build_datasets(config(tmp_path, name, T=2, size=34))
        assert bundle.info.classes == [str(d) for d in range(10)] and bundle.info.sensor_size == (34, 34, 2)
        for split in ("train", "test"):  # (digit index, label) of every sample
            samples[name, split] = [(round(x.sum().item()) - 1, y) for x, y in getattr(bundle, split)]
    easy_train, easy_test = samples["digits-dvs", "train"], samples["digits-dvs", "test"]
    hard_train, hard_test = samples["digits-dvs-hard", "train"], samples["digits-dvs-hard", "test"]
    assert len(easy_train) + len(easy_test) == 1797 and len(easy_test) == 179
    assert hard_test == easy_test
    assert set(hard_train) < set(easy_train) and 0.25 < len(hard_train) / len(easy_train) < 0.35


def test_the_digits_are_scikit_learns_read_without_importing_it():
    """The digits read from scikit-learn's file equal ``load_digits()``'s, bit for bit, in a process that then has
    not imported scikit-learn (whose import costs every training process seconds)."""
    code = ("import sys, pickle; from msgcli.data import digits; images, labels = digits.load_digits(); "
            "sys.stdout.buffer.write(pickle.dumps((images, labels, 'sklearn' in sys.modules)))")
    images, labels, imported = pickle.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                                           check=True).stdout)
    assert not imported
    from sklearn.datasets import load_digits

    reference = load_digits()
    assert images.dtype == reference.images.dtype and np.array_equal(images, reference.images)
    assert labels.dtype == np.int64 and np.array_equal(labels, reference.target)


def test_the_digits_fall_back_to_scikit_learns_loader_where_its_file_is_not_found(monkeypatch):
    from msgcli.data import digits

    read_from_file = digits.load_digits()
    monkeypatch.setattr(digits.importlib.util, "find_spec", lambda name: None)
    images, labels = digits.load_digits()
    assert np.array_equal(images, read_from_file[0]) and np.array_equal(labels, read_from_file[1])
    assert labels.dtype == np.int64


def test_synthetic_is_deterministic_and_separable(tmp_path):
    cfg = config(tmp_path, "synthetic", T=4, size=16)
    first, second = build_datasets(cfg), build_datasets(cfg)
    assert first.info.num_classes == 4 and first.info.input_shape == (4, 2, 16, 16)
    assert not (tmp_path / "cache").exists()
    clips = torch.stack([x for x, _ in first.train])
    torch.testing.assert_close(clips, torch.stack([x for x, _ in second.train]))
    labels = torch.tensor([y for _, y in first.train])
    quadrants = clips.sum((1, 2)).unflatten(1, (2, 8)).unflatten(3, (2, 8)).sum((2, 4)).flatten(1)
    assert (quadrants.argmax(1) == labels).float().mean() > 0.95

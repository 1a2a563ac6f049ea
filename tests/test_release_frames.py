"""msgsnn's event clips against the authors' release's frames, recomputed here from tonic.

The release (Brain-Cog-Lab/msg, ``dataset.py``) reads each recording through tonic's dataset
class with ``transform=ToFrame(sensor_size, n_time_bins=T)`` and, at load, turns the counts into
``F.interpolate(torch.tensor(counts, dtype=torch.float), size=[size, size], mode='bilinear',
align_corners=True)``. For every event dataset it reads, tiny datasets are written here in the
real on-disk format, msgsnn's clips are built through its real loading code (``build_datasets``,
augmentation off) from a cold cache and again from the warm one, and every clip must equal the
release's clip of its recording within 1e-5. ``data.frame_tail=keep`` is checked the same way
against counts binned here by hand with the tail in the last bin.

N-Caltech101 is framed at each recording's own extent, as the release does (tonic's
``NCALTECH101.sensor_size`` is None, so ``ToFrame`` sizes every recording by its events).
N-MNIST is framed at its own 34x34 sensor; the release's ``get_nmnist_data`` names
``tonic.datasets.NCARS.sensor_size`` instead (docs/differences.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tonic
import torch
import torch.nn.functional as F

from msgcli import config as config_io
from msgcli.data import build_datasets
from tests.formats import write_aedat4, write_atis_bin, write_gesture_npy
from tests.test_data import data_tonic_accepts_few_files  # noqa: F401  (a fixture)

TOLERANCE = 1e-5
EVENTS = 4000


@dataclass(frozen=True)
class ReleaseDataset:
    """An event dataset the release reads: msgsnn's name, tonic's class and the release's ``ToFrame`` sensor."""

    name: str
    tonic_class: type
    sensor_size: tuple[int, int, int] | None
    splits: tuple[dict, ...]  # keyword arguments of tonic's class, one per archive the release opens


DATASETS = {
    "cifar10dvs": ReleaseDataset("cifar10dvs", tonic.datasets.CIFAR10DVS, tonic.datasets.CIFAR10DVS.sensor_size, ({},)),
    "ncaltech101": ReleaseDataset("ncaltech101", tonic.datasets.NCALTECH101, tonic.datasets.NCALTECH101.sensor_size, ({},)),
    "dvsgesture": ReleaseDataset(
        "dvsgesture", tonic.datasets.DVSGesture, tonic.datasets.DVSGesture.sensor_size, ({"train": True}, {"train": False})
    ),
    "nmnist": ReleaseDataset("nmnist", tonic.datasets.NMNIST, tonic.datasets.NMNIST.sensor_size, ({"train": True}, {"train": False})),
}


def _events(rng: np.random.Generator, width: int, height: int, x0: int = 0, y0: int = 0, t_step: int = 60):
    """``EVENTS`` events (x, y, t, p), t sorted; most in a 2x2 blob, so a pixel counts dozens in a bin (as bright edges do)."""
    blob = EVENTS * 3 // 4
    x = np.concatenate([rng.integers(x0, x0 + width, EVENTS - blob), rng.integers(x0, x0 + 2, blob)])
    y = np.concatenate([rng.integers(y0, y0 + height, EVENTS - blob), rng.integers(y0, y0 + 2, blob)])
    x[0], y[0] = x0 + width - 1, y0 + height - 1  # the recording's full extent
    order = rng.permutation(EVENTS)
    x, y = x[order], y[order]
    x[-1], y[-1] = x0, y0  # the last event on a corner, a pixel the downsampling reads (it skips some)
    t = np.cumsum(rng.integers(0, t_step, EVENTS)) + 1000
    return x, y, t, rng.integers(0, 2, EVENTS)


def write_dataset(name: str, root: Path) -> None:
    """Two classes of three recordings (two per class and split where the split is official), in the real format."""
    rng = np.random.default_rng(["cifar10dvs", "ncaltech101", "dvsgesture", "nmnist"].index(name))
    if name == "cifar10dvs":
        base = root / "CIFAR10DVS"
        base.mkdir(parents=True)
        (base / "CIFAR10DVS.zip").touch()
        for cls in ("airplane", "truck"):
            for k in range(3):
                write_aedat4(base / cls / f"cifar10_{cls}_{k}.aedat4", *_events(rng, 128, 128), packet_events=1024)
    elif name == "ncaltech101":
        base = root / "NCALTECH101"
        base.mkdir(parents=True)
        (base / "N-Caltech101-archive.zip").touch()
        extents = {"Faces_easy": [(233, 171), (180, 240), (97, 64)], "accordion": [(300, 200), (150, 150), (48, 112)]}
        for cls, sizes in extents.items():
            for k, (width, height) in enumerate(sizes):
                x0, y0 = rng.integers(0, 304 - width + 1), rng.integers(0, 240 - height + 1)  # tonic moves it to 0, 0
                write_atis_bin(base / "Caltech101" / cls / f"image_{k:04d}.bin", *_events(rng, width, height, x0, y0))
    elif name == "dvsgesture":
        base = root / "DVSGesture"
        for folder, users in (("ibmGestureTrain", (1, 2)), ("ibmGestureTest", (24,))):
            base.mkdir(parents=True, exist_ok=True)
            (base / f"{folder}.tar.gz").touch()
            for user in users:
                for label in (0, 10):
                    x, y, t, p = _events(rng, 128, 128, t_step=3)  # ms: several events share the last timestamp
                    write_gesture_npy(base / folder / f"user{user:02d}_led" / f"{label}.npy", x, y, p, t)
    else:
        base = root / "NMNIST"
        base.mkdir(parents=True)
        for archive in ("train.zip", "test.zip"):
            (base / archive).touch()
        for folder, per_class in (("Train", 2), ("Test", 1)):
            for digit in ("3", "7"):
                for k in range(per_class):
                    write_atis_bin(base / folder / digit / f"{k:05d}.bin", *_events(rng, 34, 34))


def _resize(counts: np.ndarray, size: int) -> torch.Tensor:
    """The release's transform of tonic's frames."""
    return F.interpolate(torch.tensor(counts, dtype=torch.float), size=[size, size], mode="bilinear", align_corners=True)


def _counts_with_tail(events: np.ndarray, sensor_size: tuple[int, int, int] | None, T: int) -> np.ndarray:
    """``data.frame_tail=keep`` by hand: tonic's bins, and every event at or after their end in the last one."""
    if sensor_size is None:
        sensor_size = (int(events["x"].max()) + 1, int(events["y"].max()) + 1, 2)
    t = events["t"].astype(np.int64)
    window = (t[-1] - t[0]) // T
    bins = np.full(len(t), T - 1) if window == 0 else np.minimum((t - t[0]) // window, T - 1)
    counts = np.zeros((T, sensor_size[2], sensor_size[1], sensor_size[0]), dtype=np.int64)
    np.add.at(counts, (bins, events["p"].astype(np.int64), events["y"].astype(np.int64), events["x"].astype(np.int64)), 1)
    return counts


def release_clips(dataset: ReleaseDataset, root: Path, T: int, size: int, tail: str) -> list[tuple[torch.Tensor, object]]:
    """Every recording's clip as the release computes it (``tail="drop"``), or with the tail counted (``"keep"``)."""
    to_frame = tonic.transforms.ToFrame(sensor_size=dataset.sensor_size, n_time_bins=T)
    clips = []
    for kwargs in dataset.splits:
        if tail == "drop":
            recordings = dataset.tonic_class(str(root), transform=to_frame, **kwargs)
            clips += [(_resize(counts, size), target) for counts, target in recordings]
        else:
            recordings = dataset.tonic_class(str(root), **kwargs)
            clips += [(_resize(_counts_with_tail(events, dataset.sensor_size, T), size), target) for events, target in recordings]
    return clips


def _event_presets(name: str) -> list[config_io.RunConfig]:
    presets = [config_io.load_preset(preset) for preset in config_io.list_presets()]
    return [cfg for cfg in presets if cfg.data.name == name]


def _config(preset: config_io.RunConfig, tmp_path: Path, tail: str, workers: int) -> config_io.RunConfig:
    """The preset reading ``tmp_path/data``, caching under ``tmp_path``, augmentation off."""
    return config_io.apply_overrides(preset, {
        "data.root": str(tmp_path / "data"), "data.cache_dir": str(tmp_path / f"cache-{tail}"),
        "data.frame_tail": tail, "data.num_workers": workers,
        "data.augment.crop": False, "data.augment.flip": False, "data.augment.rotate": 0.0, "data.augment.roll": 0,
    })


def _msgsnn_clips(cfg: config_io.RunConfig) -> tuple[list[tuple[torch.Tensor, int]], list[str]]:
    bundle = build_datasets(cfg, progress=False)
    assert bundle.train.augment is None
    return [bundle.train[i] for i in range(len(bundle.train))] + [bundle.test[i] for i in range(len(bundle.test))], bundle.info.classes


def assert_same_clips(ours: list[tuple[torch.Tensor, int]], classes: list[str], theirs: list[tuple[torch.Tensor, object]]) -> None:
    """Every clip of ours equals a distinct one of theirs, of the same class, within the tolerance."""
    assert len(ours) == len(theirs)
    matched = set()
    for clip, label in ours:
        differences = [float((clip - other).abs().max()) if clip.shape == other.shape else np.inf for other, _ in theirs]
        best = int(np.argmin(differences))
        target = theirs[best][1]
        assert differences[best] <= TOLERANCE, f"largest difference {differences[best]:.3g} from the release's clip"
        assert label == (classes.index(target) if isinstance(target, str) else int(target))
        matched.add(best)
    assert len(matched) == len(theirs)


def _no_rendering(*args, **kwargs):
    raise AssertionError("rendered although cached")


@pytest.mark.parametrize("name", list(DATASETS))
def test_clips_equal_the_releases_frames_from_a_cold_and_a_warm_cache(tmp_path, data_tonic_accepts_few_files, monkeypatch, name):
    presets = _event_presets(name)
    assert presets, f"no preset reads {name}"
    write_dataset(name, tmp_path / "data")
    workers = 2 if name == "cifar10dvs" else 0  # rendering in worker processes too, where it costs little
    for preset in {(cfg.T, cfg.data.size, cfg.data.frame_tail): cfg for cfg in presets}.values():
        assert preset.data.frame_tail == "drop"  # every event preset frames as the release
        for tail in ("drop", "keep"):
            cfg = _config(preset, tmp_path, tail, workers)
            theirs = release_clips(DATASETS[name], tmp_path / "data", cfg.T, cfg.data.size, tail)
            cold, classes = _msgsnn_clips(cfg)
            assert cold[0][0].shape == (cfg.T, 2, cfg.data.size, cfg.data.size) and cold[0][0].dtype == torch.float32
            assert_same_clips(cold, classes, theirs)
            with monkeypatch.context() as patch:
                patch.setattr("msgcli.data.clips.render", _no_rendering)
                warm, _ = _msgsnn_clips(cfg)
            assert all(torch.equal(a, b) and la == lb for (a, la), (b, lb) in zip(cold, warm, strict=True))
        drop, keep = (_msgsnn_clips(_config(preset, tmp_path, tail, 0))[0] for tail in ("drop", "keep"))
        assert any(not torch.equal(a, b) for (a, _), (b, _) in zip(drop, keep))  # the recordings do have a tail


def test_the_comparison_catches_float16_rounding(tmp_path, data_tonic_accepts_few_files):
    """The comparison is sharp enough to see what issue 25 found: float16 storage alone misses by more than 1e-5."""
    write_dataset("cifar10dvs", tmp_path / "data")
    preset = _event_presets("cifar10dvs")[0]
    cfg = _config(preset, tmp_path, "drop", 0)
    theirs = release_clips(DATASETS["cifar10dvs"], tmp_path / "data", cfg.T, cfg.data.size, "drop")
    ours, classes = _msgsnn_clips(cfg)
    rounded = [(clip.half().float(), label) for clip, label in ours]
    with pytest.raises(AssertionError, match="largest difference"):
        assert_same_clips(rounded, classes, theirs)

"""Cached-frame loading throughput and disk size: can the data pipeline keep a training step fed?

Writes a frame cache of DVS-CIFAR10-shaped clips (``[T, 2, size, size]``, random
counts) to a temporary directory in msgsnn's cache format (float32 after the resize),
then reads it through the training path: memory-mapped clips, the training
augmentation of the default config (RandomCrop pad 4 + flip + rotation 15), a torch
DataLoader with the default number of workers, batch 64. Prints the cache's size and
samples/s for the first epoch (worker start-up included) and the steady state.

``--store counts`` measures the other way to keep the release's numbers exact, the
release's own (tonic's ``DiskCachedDataset``): int16 counts at the sensor's size
(``--sensor``, 128 for DVS-CIFAR10), resized to ``size`` at every load.

    python benchmarks/data.py                         # 512 clips, T=10, 48x48, batch 64, both stores
    python benchmarks/data.py --store float32         # msgsnn's cache only
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from msgcli.config import AugmentConfig
from msgcli.data.augment import ClipAugment, clip_augment
from msgcli.data.cache import build_clips
from msgcli.data.clips import FrameClips
from msgcli.data.frames import resize
from msgcli.data.registry import resolve_workers

STORES = ("float32", "counts")


def write_cache(directory: Path, clips: int, T: int, size: int) -> tuple[FrameClips, Path]:
    """A train split of random clips in msgsnn's on-disk cache format, augmented as in training."""
    rng = np.random.default_rng(0)
    params = {"dataset": "benchmark", "split": "train", "T": T, "size": size}

    def fill(out: np.ndarray) -> tuple[np.ndarray, list[str]]:
        for start in range(0, clips, 64):
            stop = min(start + 64, clips)
            out[start:stop] = rng.poisson(0.5, (stop - start, T, 2, size, size))
        return rng.integers(0, 10, clips), []

    cached = build_clips(directory, params, (clips, T, 2, size, size), fill)
    return FrameClips(cached, clip_augment(AugmentConfig())), cached.path


class CountsResizedAtLoad(Dataset):
    """The alternative store: int16 ``[N, T, 2, sensor, sensor]`` counts, memory-mapped, resized and augmented per load."""

    def __init__(self, path: Path, size: int, labels: np.ndarray, augment: ClipAugment | None):
        self.path, self.size, self.labels, self.augment = path, size, labels, augment
        self.counts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.counts is None:  # mapped in each worker
            self.counts = np.load(self.path, mmap_mode="r")
        clip = resize(self.counts[index], self.size)
        if self.augment is not None:
            clip = self.augment(clip)
        return torch.from_numpy(np.ascontiguousarray(clip)), int(self.labels[index])


def write_counts(directory: Path, clips: int, T: int, sensor: int, size: int) -> tuple[CountsResizedAtLoad, Path]:
    rng = np.random.default_rng(0)
    path = directory / "counts.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int16, shape=(clips, T, 2, sensor, sensor))
    for start in range(0, clips, 64):
        stop = min(start + 64, clips)
        out[start:stop] = rng.poisson(0.5 * (size / sensor) ** 2, (stop - start, T, 2, sensor, sensor))
    out.flush()
    del out
    return CountsResizedAtLoad(path, size, rng.integers(0, 10, clips), clip_augment(AugmentConfig())), path


def samples_per_second(loader: DataLoader) -> float:
    start = time.perf_counter()
    seen = sum(len(labels) for _, labels in loader)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=512)
    parser.add_argument("--T", type=int, default=10)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--sensor", type=int, default=128, help="the counts' size for --store counts")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=resolve_workers(None), help="default: what a run uses")
    parser.add_argument("--epochs", type=int, default=3, help="steady-state epochs after the first")
    parser.add_argument("--store", default=",".join(STORES), help=f"comma-separated, of {', '.join(STORES)}")
    args = parser.parse_args()
    stores = args.store.split(",")
    if not set(stores) <= set(STORES):
        parser.error(f"--store: choose from {', '.join(STORES)}")

    print(f"clips [{args.T}, 2, {args.size}, {args.size}], {args.clips} of them, augment {clip_augment(AugmentConfig())}, "
          f"batch {args.batch}, workers {args.workers}")
    for store in stores:
        with tempfile.TemporaryDirectory() as tmp:
            if store == "float32":
                dataset, path = write_cache(Path(tmp), args.clips, args.T, args.size)
                what = "float32 after the resize (msgsnn's cache)"
            else:
                dataset, path = write_counts(Path(tmp), args.clips, args.T, args.sensor, args.size)
                what = f"int16 counts at {args.sensor}x{args.sensor}, resized at load"
            loader = DataLoader(
                dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers, persistent_workers=args.workers > 0
            )
            first = samples_per_second(loader)
            steady = np.median([samples_per_second(loader) for _ in range(args.epochs)])
            per_clip = path.stat().st_size / args.clips
        print(f"{what}:")
        print(f"  disk: {per_clip / 1024:8.1f} KiB a clip ({per_clip * 10_000 / 2**30:.2f} GiB for DVS-CIFAR10's 10,000)")
        print(f"  first epoch (workers starting): {first:8.0f} samples/s")
        print(f"  steady state (median of {args.epochs}): {steady:8.0f} samples/s")


if __name__ == "__main__":
    main()

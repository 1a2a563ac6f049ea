"""Cached-frame loading throughput: can the data pipeline keep a training step fed?

Writes a frame cache of DVS-CIFAR10-shaped clips (``[T, 2, size, size]``, random
counts) to a temporary directory in msgsnn's cache format, then reads it through the
training path: memory-mapped clips, the training augmentation of the default config
(RandomCrop pad 4 + flip + rotation 15), a torch DataLoader with the default number
of workers, batch 64. Prints samples/s for the first epoch (worker start-up
included) and the steady state.

    python benchmarks/data.py            # 512 clips, T=10, 48x48, batch 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from msgcli.config import AugmentConfig
from msgcli.data.augment import clip_augment
from msgcli.data.cache import build_clips
from msgcli.data.clips import FrameClips
from msgcli.data.registry import resolve_workers


def write_cache(directory: Path, clips: int, T: int, size: int) -> FrameClips:
    """A train split of random event-count clips in the on-disk cache format, augmented as in training."""
    rng = np.random.default_rng(0)
    params = {"dataset": "benchmark", "split": "train", "T": T, "size": size}

    def fill(out: np.ndarray) -> tuple[np.ndarray, list[str]]:
        for start in range(0, clips, 64):
            stop = min(start + 64, clips)
            out[start:stop] = rng.poisson(0.5, (stop - start, T, 2, size, size))
        return rng.integers(0, 10, clips), []

    cached = build_clips(directory, params, (clips, T, 2, size, size), fill)
    return FrameClips(cached, clip_augment(AugmentConfig()))


def samples_per_second(loader: DataLoader) -> float:
    start = time.perf_counter()
    seen = sum(len(labels) for _, labels in loader)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=512)
    parser.add_argument("--T", type=int, default=10)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=resolve_workers(None), help="default: what a run uses")
    parser.add_argument("--epochs", type=int, default=3, help="steady-state epochs after the first")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        dataset = write_cache(Path(tmp), args.clips, args.T, args.size)
        loader = DataLoader(
            dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers, persistent_workers=args.workers > 0
        )
        first = samples_per_second(loader)
        steady = np.median([samples_per_second(loader) for _ in range(args.epochs)])
    print(
        f"cached clips [{args.T}, 2, {args.size}, {args.size}] float16, augment {dataset.augment}, "
        f"batch {args.batch}, workers {args.workers}"
    )
    print(f"first epoch (workers starting): {first:8.0f} samples/s")
    print(f"steady state (median of {args.epochs}): {steady:8.0f} samples/s")


if __name__ == "__main__":
    main()

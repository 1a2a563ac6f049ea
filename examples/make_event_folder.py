"""Write a tiny event folder: 3 classes of 40 recordings, each a .npy structured array with fields x, y, t, p.

Class c is a blob of events that moves across a 32x32 sensor in direction c (right, down, diagonal).
Usage: python examples/make_event_folder.py FOLDER   (then: msgsnn train --data-root FOLDER --set data.name=event-folder)
"""

import sys
from pathlib import Path

import numpy as np

folder = Path(sys.argv[1] if len(sys.argv) > 1 else "my-events")
rng = np.random.default_rng(0)
events = np.dtype([("x", "<i2"), ("y", "<i2"), ("t", "<i8"), ("p", "?")])  # tonic's layout
for label, direction in enumerate([(1, 0), (0, 1), (1, 1)]):
    (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
    for n in range(40):
        t = np.sort(rng.integers(0, 100_000, 600))  # microseconds
        start = rng.uniform(6, 10, 2)
        xy = start + np.outer(t / 100_000, np.multiply(direction, 16)) + rng.normal(0, 1.5, (len(t), 2))
        recording = np.empty(len(t), dtype=events)
        recording["x"], recording["y"] = np.clip(xy, 0, 31).astype(np.int16).T
        recording["t"], recording["p"] = t, rng.random(len(t)) < 0.5
        np.save(folder / f"class{label}" / f"{n:03d}.npy", recording)
print(f"wrote {folder}/class0..2/*.npy: 120 recordings of a 32x32 sensor")

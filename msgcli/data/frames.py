"""Event streams to frames exactly as the authors' release makes them: tonic's ``ToFrame`` counts, then a float32 bilinear resize.

A recording is a structured array with fields ``x, y, t, p`` (tonic's convention,
``t`` in microseconds). A clip is ``[T, P, size, size]`` float32. The release frames
with ``ToFrame(sensor_size, n_time_bins=T)`` and resizes with
``F.interpolate(torch.tensor(counts, dtype=torch.float), size=[size, size],
mode='bilinear', align_corners=True)``; :func:`events_to_frames` does the same, so a
clip equals the release's bit for bit. The one option, ``FrameSpec.tail``, decides
whether the last event (which tonic's last bin ends before) is counted.

Entry points for a new event dataset: build a :class:`FrameSpec` (``frame_spec`` in
``clips.py`` reads it from the run's config), give :func:`render` (or
``clips.event_bundle``, which adds the cache) your recordings as a :class:`Recordings`.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track
from torch.utils.data import DataLoader, Dataset
from tonic.transforms import ToFrame

from msgcli.errors import BadSample

from .registry import release_fork_server, start_loading, worker_processes

log = logging.getLogger(__name__)

# Part of every cache key: bump it whenever the frames computed here (or their stored dtype) change.
# 2: tonic's tail by default, the resize through F.interpolate, float32 clips.
FRAME_FORMAT_VERSION = 2
# ``drop``: tonic's (and the release's) last bin ends before the last event; ``keep``: that event is counted.
FRAME_TAILS = ("drop", "keep")


@dataclass(frozen=True)
class FrameSpec:
    """Everything that decides a clip's frames; all of it goes into the cache key.

    ``sensor_size`` is ``(W, H, P)``: every event must lie inside it. With
    ``fit_extent`` each recording is framed at its own x/y extent before the resize
    (N-Caltech101, whose recordings differ in size, as the release does with tonic's
    ``sensor_size=None``). ``tail`` is one of :data:`FRAME_TAILS`.
    """

    T: int
    size: int
    sensor_size: tuple[int, int, int]
    fit_extent: bool = False
    tail: str = "drop"

    def __post_init__(self) -> None:
        if self.tail not in FRAME_TAILS:
            raise ValueError(f"tail must be one of {', '.join(FRAME_TAILS)}, not {self.tail!r}")


class Recordings(Protocol):
    """Indexable recordings: ``read(i)`` gives the events, ``name(i)`` what to call them in errors."""

    def __len__(self) -> int: ...

    def name(self, index: int) -> str: ...

    def read(self, index: int) -> np.ndarray: ...


def event_counts(events: np.ndarray, sensor_size: tuple[int, int, int], T: int, tail: str = "drop") -> np.ndarray:
    """int16 ``[T, P, H, W]`` counts of time-sorted events in ``T`` equal time bins, as tonic's ``ToFrame`` gives them.

    tonic's bins end at ``t0 + T * ((t_last - t0) // T)``, which leaves out the last
    event (and any other at or after that end): ``tail="drop"`` leaves them out, as tonic
    and the release do; ``tail="keep"`` adds them to the last bin, so every event counts once.
    """
    counts = ToFrame(sensor_size=sensor_size, n_time_bins=T)(events)
    dropped = len(events) - int(counts.sum())
    if tail == "keep" and dropped:
        rest = events[-dropped:]
        np.add.at(counts, (T - 1, rest["p"].astype(np.int64), rest["y"].astype(np.int64), rest["x"].astype(np.int64)), 1)
    return counts


def resize(frames: np.ndarray, size: int) -> np.ndarray:
    """float32 ``[..., size, size]`` bilinear resize of ``[..., H, W]``, the release's call exactly.

    ``F.interpolate(..., mode="bilinear", align_corners=True)`` on the float32 frames:
    torch computes the interpolation weights in float32, so anything else (even exact
    weights) differs from the release by up to 5e-5 of a pixel's value. Every output
    pixel is computed on its own, so the result does not depend on the thread count.
    """
    height, width = frames.shape[-2:]
    planes = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)).reshape(-1, 1, height, width)
    resized = F.interpolate(planes, size=[size, size], mode="bilinear", align_corners=True)
    return resized.reshape(*frames.shape[:-2], size, size).numpy()


def _check_events(events: np.ndarray, sensor_size: tuple[int, int, int], source: str) -> None:
    if len(events) == 0:
        raise BadSample(f"{source}: empty recording (no events)")
    width, height, polarities = sensor_size
    x, y, p = (events[f].astype(np.int64) for f in ("x", "y", "p"))
    if x.min() < 0 or y.min() < 0 or x.max() >= width or y.max() >= height:
        raise BadSample(
            f"{source}: events outside the {width}x{height} sensor (x in [{x.min()}, {x.max()}], "
            f"y in [{y.min()}, {y.max()}]); is it a recording from another camera?"
        )
    if p.min() < 0 or p.max() >= polarities:
        raise BadSample(f"{source}: polarity values {sorted(set(np.unique(p).tolist()))} outside 0..{polarities - 1}")


def events_to_frames(events: np.ndarray, spec: FrameSpec, source: str) -> np.ndarray:
    """float32 ``[T, P, size, size]`` clip of one recording, the release's; :class:`BadSample` names ``source``.

    Events out of time order are sorted first (tonic's binning assumes sorted times).
    """
    _check_events(events, spec.sensor_size, source)
    times = events["t"].astype(np.int64)
    if np.any(np.diff(times) < 0):
        events = events[np.argsort(times, kind="stable")]
    sensor_size = spec.sensor_size
    if spec.fit_extent:
        sensor_size = (int(events["x"].max()) + 1, int(events["y"].max()) + 1, sensor_size[2])
    return resize(event_counts(events, sensor_size, spec.T, spec.tail), spec.size)


class _FrameJobs(Dataset):
    """One recording's clip (float32) or the reason it is unusable, for parallel rendering."""

    def __init__(self, recordings: Recordings, spec: FrameSpec):
        self.recordings = recordings
        self.spec = spec

    def __len__(self) -> int:
        return len(self.recordings)

    def __getitem__(self, index: int) -> tuple[np.ndarray | None, str | None]:
        name = self.recordings.name(index)
        try:
            events = self.recordings.read(index)
            return events_to_frames(events, self.spec, name), None
        except BadSample as err:
            return None, str(err)
        except Exception as err:  # a reader failing on a damaged file: report it as that file's fault
            return None, f"{name}: unreadable ({type(err).__name__}: {err})"


def _as_is(item):
    return item


def _show_progress(progress: bool) -> bool:
    """Progress bars only when asked for and stdout is a terminal."""
    return progress and sys.stdout.isatty()


def render(
    recordings: Recordings,
    spec: FrameSpec,
    out: np.ndarray,
    skip_bad_samples: bool,
    workers: int = 0,
    progress: bool = True,
    description: str = "frames",
) -> tuple[np.ndarray, list[str]]:
    """Write the clips of all usable recordings, in order, to ``out[:kept]``.

    ``out`` is ``[len(recordings), T, P, size, size]`` (an array or a memory map).
    Returns the indices of the recordings kept and one message per skipped recording;
    without ``skip_bad_samples`` the first bad recording raises :class:`BadSample`.
    """
    if multiprocessing.current_process().daemon:  # e.g. inside a DataLoader worker: no child processes allowed
        workers = 0
    # A DataLoader without a generator of its own draws its workers' base seed from torch's global
    # generator: a run that renders (cold cache) would then train from another random state than
    # one that reads the cache. Rendering draws nothing at random, so any fixed generator will do.
    jobs = DataLoader(_FrameJobs(recordings, spec), batch_size=None, **worker_processes(workers), collate_fn=_as_is,
                      worker_init_fn=release_fork_server, generator=torch.Generator())
    kept: list[int] = []
    problems: list[str] = []
    for index, (clip, problem) in enumerate(
        track(start_loading(jobs), description=description, total=len(recordings), disable=not _show_progress(progress))
    ):
        if problem is not None:
            if not skip_bad_samples:
                raise BadSample(problem)
            log.warning("skipping %s", problem)
            problems.append(problem)
            continue
        out[len(kept)] = clip
        kept.append(index)
    return np.array(kept, dtype=np.int64), problems


class EventList:
    """Recordings held in memory (generated ones): ``events[indices[i]]``, named ``<dataset> sample <n>``."""

    def __init__(self, events: list[np.ndarray], indices: np.ndarray, dataset: str):
        self.events = events
        self.indices = indices
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.indices)

    def name(self, index: int) -> str:
        return f"{self.dataset} sample {self.indices[index]}"

    def read(self, index: int) -> np.ndarray:
        return self.events[self.indices[index]]

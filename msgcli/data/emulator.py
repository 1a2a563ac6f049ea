"""An emulated DVS that records still images moved along N-MNIST's saccades.

N-MNIST was made by moving a camera in front of a screen in three straight saccades
of about 105 ms each, along a triangle (right-down, right-up, back left). Here the
image is moved instead, sampled bilinearly at each sub-step, and every pixel emits
one event each time its log intensity has changed by ``threshold`` since its last
event (ON for brighter, OFF for darker), as a DVS pixel does. Optional background
noise events and hot pixels make a harder sensor. Output is tonic's event format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tonic.io import events_struct

# Part of the cache key of emulated datasets: bump it whenever this code records other events.
EMULATOR_VERSION = 1
# The image offset (dx, dy) in pixels at the start and at the end of each saccade.
SACCADE_CORNERS = ((0.0, 0.0), (3.5, 7.0), (7.0, 0.0), (0.0, 0.0))
MAX_SHIFT = 7


@dataclass(frozen=True)
class SaccadeDVS:
    """Sensor and motion parameters; every one of them changes the events (and the cache key).

    The image is scaled to ``object_size`` pixels and placed at a random offset of up
    to ``canvas - object_size - MAX_SHIFT`` pixels on a ``canvas`` x ``canvas`` sensor,
    so the saccades keep it on the sensor.
    """

    canvas: int = 34
    object_size: int = 24
    saccade_us: int = 105_000
    steps_per_saccade: int = 12
    threshold: float = 0.4
    log_floor: float = 0.1
    noise_hz: float = 0.0
    hot_pixels: int = 0
    hot_pixel_hz: float = 0.0
    seed: int = 0

    @property
    def duration_us(self) -> int:
        return self.saccade_us * (len(SACCADE_CORNERS) - 1)

    @property
    def sensor_size(self) -> tuple[int, int, int]:
        return (self.canvas, self.canvas, 2)

    def record(self, images: np.ndarray) -> list[np.ndarray]:
        """One time-sorted event array (``x, y, t, p``; ``t`` in us) per image of ``[N, h, w]`` in [0, 1]."""
        rng = np.random.default_rng([self.seed, 0])
        noise_rng = np.random.default_rng([self.seed, 1])
        parts = [
            self._signal(self._place(images, rng), rng),
            self._background(len(images), noise_rng),
            self._hot_pixels(len(images), noise_rng),
        ]
        sample, x, y, t, p = (np.concatenate(field) for field in zip(*parts))
        order = np.argsort(sample.astype(np.int64) * self.duration_us + t)
        events = np.empty(len(order), dtype=events_struct)
        events["x"], events["y"], events["t"], events["p"] = x[order], y[order], t[order], p[order]
        bounds = np.searchsorted(sample[order], np.arange(len(images) + 1))
        return [events[start:end] for start, end in zip(bounds[:-1], bounds[1:])]

    def _place(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """float32 ``[N, canvas, canvas]`` intensities: each image scaled up and put at a random offset."""
        rows, columns = (_bilinear_weights(n, self.object_size) for n in images.shape[-2:])
        scaled = np.clip(rows @ images.astype(np.float32) @ columns.T, 0, 1)
        slack = self.canvas - self.object_size - MAX_SHIFT
        canvas = np.zeros((len(images), self.canvas, self.canvas), dtype=np.float32)
        for index, (top, left) in enumerate(rng.integers(0, slack + 1, size=(len(images), 2))):
            canvas[index, top : top + self.object_size, left : left + self.object_size] = scaled[index]
        return canvas

    def _path(self) -> np.ndarray:
        """``[steps + 1, 2]`` image offsets (dx, dy) at each sub-step boundary."""
        corners = np.array(SACCADE_CORNERS)
        fractions = np.linspace(0, 1, self.steps_per_saccade + 1)[1:, None]
        legs = [start + fractions * (end - start) for start, end in zip(corners[:-1], corners[1:])]
        return np.concatenate([corners[:1]] + legs)

    @staticmethod
    def _shift(padded: np.ndarray, dx: float, dy: float, size: int) -> np.ndarray:
        """The canvas moved by (dx, dy) >= 0 pixels, bilinearly; ``padded`` has MAX_SHIFT + 1 zero rows/columns in front."""
        pad = MAX_SHIFT + 1
        ix, iy = int(dx), int(dy)
        fx, fy = dx - ix, dy - iy
        moved = np.zeros((len(padded), size, size), dtype=np.float32)
        for ox, wx in ((ix, 1 - fx), (ix + 1, fx)):
            for oy, wy in ((iy, 1 - fy), (iy + 1, fy)):
                if wx * wy:
                    moved += np.float32(wx * wy) * padded[:, pad - oy : pad - oy + size, pad - ox : pad - ox + size]
        return moved

    def _signal(self, canvas: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """Threshold crossings of log intensity, as flat (sample, x, y, t, p) arrays."""
        step_us = self.saccade_us / self.steps_per_saccade
        padded = np.pad(canvas, ((0, 0), (MAX_SHIFT + 1, 0), (MAX_SHIFT + 1, 0)))
        reference = np.log(canvas + np.float32(self.log_floor))
        found = []
        for step, (dx, dy) in enumerate(self._path()[1:]):
            level = np.log(self._shift(padded, dx, dy, self.canvas) + np.float32(self.log_floor))
            crossings = np.trunc((level - reference) / np.float32(self.threshold))
            reference += crossings * np.float32(self.threshold)
            where = np.nonzero(crossings)
            value = crossings[where]
            sample, y, x, on = (np.repeat(a, np.abs(value).astype(np.int64)) for a in (*where, value > 0))
            times = (step + rng.random(len(sample))) * step_us
            found.append(_compact(sample, x, y, times, on))
        return tuple(np.concatenate(field) for field in zip(*found))

    def _uniform_events(self, samples: np.ndarray, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple:
        n = len(samples)
        return _compact(samples, x, y, rng.integers(0, self.duration_us, n), rng.random(n) < 0.5)

    def _background(self, n_images: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """Shot-noise events, uniform over pixels, time and polarity, at ``noise_hz`` a pixel."""
        rate = self.noise_hz * self.canvas**2 * self.duration_us * 1e-6
        samples = np.repeat(np.arange(n_images), rng.poisson(rate, n_images))
        x, y = rng.integers(0, self.canvas, (2, len(samples)))
        return self._uniform_events(samples, x, y, rng)

    def _hot_pixels(self, n_images: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """``hot_pixels`` fixed pixels of the sensor firing at ``hot_pixel_hz`` in every recording."""
        positions = rng.integers(0, self.canvas, (self.hot_pixels, 2))
        counts = rng.poisson(self.hot_pixel_hz * self.duration_us * 1e-6, (n_images, self.hot_pixels))
        samples = np.repeat(np.repeat(np.arange(n_images), self.hot_pixels), counts.ravel())
        pixel = np.repeat(np.tile(np.arange(self.hot_pixels), n_images), counts.ravel())
        return self._uniform_events(samples, positions[pixel, 0], positions[pixel, 1], rng)


def _compact(sample, x, y, t, p) -> tuple[np.ndarray, ...]:
    """Flat event fields in small dtypes: millions of events pass through sorting."""
    return sample.astype(np.int32), x.astype(np.int16), y.astype(np.int16), t.astype(np.int32), p.astype(bool)


def _bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """float32 ``[n_out, n_in]`` weights of 1-D linear interpolation with aligned corners, computed exactly.

    The emulated camera's optics, part of the recordings (``EMULATOR_VERSION``): not
    ``frames.resize``, whose weights are torch's float32 ones, as the release's frames need.
    """
    position = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(weights, (np.arange(n_out), low), 1 - (position - low))
    np.add.at(weights, (np.arange(n_out), high), position - low)
    return weights

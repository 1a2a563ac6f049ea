"""Writers for the on-disk formats msgsnn reads, so tests can build tiny real datasets.

Each writer produces bytes exactly as the original datasets ship them (see
``../shared/FORMATS.md``): AEDAT4 (DVS-CIFAR10), ATIS ``.bin`` (N-MNIST,
N-Caltech101), DVS-Gesture ``.npy`` and torchvision's CIFAR pickle batches.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import flatbuffers
import numpy as np

AEDAT4_MAGIC = b"#!AER-DAT4.0\r\n"

AEDAT4_DESCRIPTION = """<dv version="2.0">
  <node name="outInfo" path="/mainloop/Recorder/outInfo/">
    <node name="0" path="/mainloop/Recorder/outInfo/0/">
      <attr key="compression" type="string">NONE</attr>
      <attr key="typeIdentifier" type="string">EVTS</attr>
      <node name="info" path="/mainloop/Recorder/outInfo/0/info/">
        <attr key="sizeX" type="int">{width}</attr>
        <attr key="sizeY" type="int">{height}</attr>
      </node>
    </node>
  </node>
</dv>
"""


def _aedat4_header(width: int, height: int) -> bytes:
    """IOHeader table: compression NONE, file_data_position -1, XML description."""
    builder = flatbuffers.Builder(1024)
    description = builder.CreateString(AEDAT4_DESCRIPTION.format(width=width, height=height))
    builder.StartObject(3)
    builder.PrependInt32Slot(0, 0, 0)
    builder.PrependInt64Slot(1, -1, 0)
    builder.PrependUOffsetTRelativeSlot(2, description, 0)
    builder.Finish(builder.EndObject(), file_identifier=b"IOHE")
    return bytes(builder.Output())


def _aedat4_packet(t: np.ndarray, x: np.ndarray, y: np.ndarray, on: np.ndarray) -> bytes:
    """Size-prefixed EventPacket table whose vector holds 16-byte {t, x, y, on} structs."""
    builder = flatbuffers.Builder(64 + 16 * len(t))
    builder.StartVector(16, len(t), 8)
    for i in reversed(range(len(t))):
        builder.Prep(8, 16)
        builder.Pad(3)
        builder.PrependBool(bool(on[i]))
        builder.PrependInt16(int(y[i]))
        builder.PrependInt16(int(x[i]))
        builder.PrependInt64(int(t[i]))
    elements = builder.EndVector()
    builder.StartObject(1)
    builder.PrependUOffsetTRelativeSlot(0, elements, 0)
    builder.FinishSizePrefixed(builder.EndObject(), file_identifier=b"EVTS")
    return bytes(builder.Output())


def write_aedat4(path: Path, x, y, t, p, width: int = 128, height: int = 128, packet_events: int = 64) -> None:
    """An AEDAT4 file with one event stream (id 0), split into packets of ``packet_events``."""
    x, y, t, p = (np.asarray(a) for a in (x, y, t, p))
    header = _aedat4_header(width, height)
    chunks = [AEDAT4_MAGIC, struct.pack("<I", len(header)), header]
    for start in range(0, len(t), packet_events):
        part = slice(start, start + packet_events)
        packet = _aedat4_packet(t[part], x[part], y[part], p[part])
        chunks += [struct.pack("<II", 0, len(packet)), packet]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(chunks))


def write_atis_bin(path: Path, x, y, t, p) -> None:
    """N-MNIST / N-Caltech101 ``.bin``: 5 bytes an event, 23-bit microsecond timestamps."""
    x, y, t, p = (np.asarray(a, dtype=np.uint32) for a in (x, y, t, p))
    if t.size and t.max() >= 2**23:
        raise ValueError("timestamps must fit in 23 bits (no overflow markers written)")
    raw = np.stack([x, y, (p << 7) | (t >> 16), (t >> 8) & 0xFF, t & 0xFF], axis=1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw.tobytes())


def write_gesture_npy(path: Path, x, y, p, t_ms) -> None:
    """tonic's preprocessed DVS-Gesture sample: an (N, 4) int array of x, y, p, t in ms."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.stack([x, y, p, t_ms], axis=1).astype(np.int64))


def write_cifar10(root: Path, train: tuple[np.ndarray, list], test: tuple[np.ndarray, list], classes: list[str]) -> None:
    """``root/cifar-10-batches-py``: five train batches, a test batch and ``batches.meta``.

    Images are uint8 ``[N, 32, 32, 3]``; torchvision stores them as ``[N, 3072]`` rows.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, images: np.ndarray, labels: list[int]) -> None:
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": rows, "labels": list(labels)}, fh)

    images, labels = train
    for batch, part in enumerate(np.array_split(np.arange(len(images)), 5), start=1):
        dump(f"data_batch_{batch}", images[part], [labels[i] for i in part])
    dump("test_batch", *test)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": classes}, fh)

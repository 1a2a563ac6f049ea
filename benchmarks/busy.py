"""The main job on a machine busy with other work: OpenMP threads that sleep vs threads that spin.

Trains ``msgsnn train --preset digits-dvs --epochs E`` (default threads) in fresh processes,
first on the machine as it is, then beside N processes that each keep a core busy, once with
msgsnn's default (``OMP_WAIT_POLICY=PASSIVE``: a waiting thread sleeps) and once with OpenMP's
own default (``ACTIVE``: it spins). Prints the wall time of each and the ratios. Every run builds
or reads the same frame cache under a temporary folder; the first, untimed run builds it.

    python benchmarks/busy.py             # 3 epochs, 2 busy processes, 2 rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = ("PASSIVE", "ACTIVE")


def train_seconds(epochs: int, policy: str, scratch: Path, limit_batches: int | None = None) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": policy, "MSGSNN_CACHE": str(scratch / "cache"),
           "MSGSNN_DATA": str(scratch / "data")}
    env.pop("GOMP_SPINCOUNT", None)
    command = [sys.executable, "-m", "msgcli", "train", "--preset", "digits-dvs", "--epochs", str(epochs),
               "--out", str(scratch / "runs"), "--overwrite"]
    if limit_batches:
        command += ["--limit-batches", str(limit_batches)]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="processes that keep a core busy")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--limit-batches", type=int, default=None,
                        help="batches per epoch (a quick check of the script; the timings then mean little)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        train_seconds(1, "PASSIVE", scratch)  # builds the frame cache and the CPU kernels
        times: dict[tuple[str, str], list[float]] = {}
        for load in ("quiet", "busy"):
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                        for _ in range(args.busy if load == "busy" else 0)]
            try:
                for _ in range(args.rounds):
                    for policy in POLICIES:
                        seconds = train_seconds(args.epochs, policy, scratch, args.limit_batches)
                        times.setdefault((load, policy), []).append(seconds)
            finally:
                for spinner in spinners:
                    spinner.kill()
                    spinner.wait()
    print(f"main job, {args.epochs} epochs, default threads; busy = beside {args.busy} processes each keeping a core busy")
    for (load, policy), seconds in times.items():
        print(f"  {load:5} OMP_WAIT_POLICY={policy:7}  median {statistics.median(seconds):6.1f} s  "
              f"({', '.join(f'{s:.1f}' for s in seconds)})")
    for load in ("quiet", "busy"):
        ratio = statistics.median(times[(load, "ACTIVE")]) / statistics.median(times[(load, "PASSIVE")])
        print(f"  {load}: spinning takes {ratio:.2f}x the time of sleeping")


if __name__ == "__main__":
    main()

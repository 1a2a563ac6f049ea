"""Run every command of the README, so the docs cannot drift from the code.

Every shell line of every ``bash`` block and every inline code span that starts with
``msgsnn``, ``python``, ``torchrun``, ``pip`` or ``bash`` is a command (spans with ``<placeholders>`` are
syntax, not commands). Each runs in README order with one of these expectations:

* ``ok``: exit 0. The main job runs exactly as written (the README quotes its accuracy and
  time); the other ``train``/``sweep`` commands get ``--limit-batches 3`` and the benchmarks
  tiny sizes, so the step stays within minutes.
* ``offline``: the commands of "Multi-GPU" and "Reproducing the paper" need the real datasets,
  which CI does not have: they must stop with a non-zero exit and one ``error:`` line saying
  what is missing (the dataset's expected layout, or the sweep that was not run), never start a
  download and never print a traceback of ours.
* ``no-cuda``: GPU-only commands on a machine without CUDA must stop with one clear line.

``python -m pytest -q`` is the step of ``.ci/run`` just before this one and is not repeated.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OFFLINE_SECTIONS = ("Multi-GPU", "Reproducing the paper")
PROGRAMS = ("msgsnn", "python", "torchrun", "pip", "bash")
GPU_SCRIPTS = ("benchmarks/gpu.sh",)  # need CUDA whatever their flags
MAIN_JOB = "msgsnn train --preset digits-dvs"
TEST_COMMAND = "python -m pytest -q"
TINY = {
    "benchmarks/step.py": ["--batch", "2", "--T", "2", "--size", "16", "--warmup", "1", "--rounds", "1"],
    "benchmarks/data.py": ["--clips", "64", "--batch", "16", "--epochs", "1"],
    "benchmarks/epoch.py": ["--batch", "2", "--steps", "1", "--warmup", "0"],
}


@dataclass
class Step:
    """One README command, what CI actually runs for it and what it must do."""

    section: str
    command: str
    args: list[str] = field(default_factory=list)
    expect: str = "ok"  # ok | offline | no-cuda
    cwd: Path | None = None  # None: the scratch folder CI runs in
    env: dict[str, str] = field(default_factory=dict)  # added to CI's environment


def readme_commands(text: str) -> list[tuple[str, str]]:
    """``(section, command)`` for every command in the README, in order, each once."""
    found: list[tuple[str, str]] = []
    section, prose, in_fence, fence_lang = "", [], False, ""

    def flush_prose() -> None:
        for span in re.findall(r"`([^`]+)`", " ".join(prose)):
            if span.split()[0] in PROGRAMS and "<" not in span:
                found.append((section, span))
        prose.clear()

    for line in text.splitlines():
        if line.startswith("```"):
            in_fence, fence_lang = not in_fence, line[3:].strip()
            continue
        if in_fence:
            if fence_lang == "bash" and line.strip() and not line.lstrip().startswith("#"):
                found.extend((section, part.strip()) for part in strip_comment(line).split("&&"))
            continue
        if line.startswith("#"):
            flush_prose()
            section = line.lstrip("#").strip()
        else:
            prose.append(line)
    flush_prose()
    seen: set[str] = set()
    return [(s, c) for s, c in found if not (c in seen or seen.add(c))]


def strip_comment(line: str) -> str:
    """The shell line without a trailing ``# comment`` (a ``#`` inside quotes or a word is kept)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


def plan(section: str, command: str, cuda: bool) -> Step | None:
    """What CI runs for ``command``; None for the test command, run by ``.ci/run`` itself."""
    if command == TEST_COMMAND:
        return None
    args = shlex.split(command)
    step = Step(section, command, args)
    if args[0] == "pip":
        step.cwd = REPO
    elif args[0] == "python":  # scripts and test paths are relative to the repository
        step.args, step.cwd = [sys.executable, *args[1:], *TINY.get(args[1], [])], REPO
    elif command != MAIN_JOB and args[:2] in (["msgsnn", "train"], ["msgsnn", "sweep"]):
        step.args = [*args, "--limit-batches", "3"]
    elif args[0] == "bash":  # scripts write to $OUT: keep it out of the repository
        step.args, step.env = ["bash", str(REPO / args[1]), *args[2:]], {"OUT": str(Path.cwd() / "bash-out")}
    needs_cuda = args[1] in GPU_SCRIPTS or ("--device" in args and args[args.index("--device") + 1] == "cuda")
    if needs_cuda and not cuda:
        step.expect = "no-cuda"
    elif any(section.startswith(s) for s in OFFLINE_SECTIONS):
        step.expect = "offline"
    return step


def passed(step: Step, done: subprocess.CompletedProcess) -> tuple[bool, str]:
    output = done.stdout + done.stderr
    if step.expect == "ok":
        return done.returncode == 0, f"exit {done.returncode}"
    ours = [line for line in output.splitlines() if line.startswith("error:")]  # not "internal error:"
    # torchrun prints a traceback of its own when a rank fails; ours must not
    traceback_ok = step.args[0] == "torchrun" or "Traceback" not in output
    ok = done.returncode != 0 and traceback_ok and bool(ours)
    if step.expect == "no-cuda":
        ok = ok and "CUDA" in ours[0]
    return ok, f"exit {done.returncode}, stopped with: {ours[:1]}"


def main() -> int:
    import torch

    cuda = torch.cuda.is_available()
    steps = [s for s in (plan(sec, cmd, cuda) for sec, cmd in readme_commands((REPO / "README.md").read_text())) if s]
    failures = 0
    for step in steps:
        print(f"\n[{step.section}] $ {step.command}\n  runs: {shlex.join(step.args)}  (expect {step.expect})", flush=True)
        start = time.time()
        done = subprocess.run(step.args, text=True, capture_output=True, cwd=step.cwd, env={**os.environ, **step.env})
        ok, why = passed(step, done)
        tail = (done.stdout + done.stderr).strip().splitlines()[-6:]
        print("\n".join(f"  | {line}" for line in tail))
        print(f"  -> {'ok' if ok else 'FAILED'} ({why}) in {time.time() - start:.0f}s", flush=True)
        failures += not ok
        if step.command == MAIN_JOB and ok:
            print(f"  main job summary: {Path('results/digits-dvs/summary.json').read_text()}", flush=True)
    print(f"\nsmoke: {len(steps) - failures} of {len(steps)} README commands behaved as documented")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Run every command of the README's tour, so the docs cannot drift from the code.

The main job runs exactly as written (it is the README's claim: accuracy and time are printed);
the other train and sweep commands get ``--limit-batches 3`` so the step stays within minutes.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

readme = Path(__file__).resolve().parent.parent / "README.md"
text = readme.read_text()
tour = text.split("## A tour of the commands", 1)[1]
block = re.search(r"```bash\n(.*?)```", tour, re.S).group(1)
commands = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip().startswith("msgsnn ")]
main_job = re.search(r"&& (msgsnn train --preset digits-dvs)\n", text).group(1)

failures = 0
for command in [main_job, *commands]:
    args = shlex.split(command)
    if command is not main_job and args[1] in ("train", "sweep"):
        args += ["--limit-batches", "3"]
    print(f"\n$ {shlex.join(args)}", flush=True)
    start = time.time()
    done = subprocess.run(args, text=True)
    print(f"-> exit {done.returncode} in {time.time() - start:.0f}s", flush=True)
    failures += done.returncode != 0
    if command is main_job:
        summary = Path("results/digits-dvs/summary.json").read_text()
        print(f"main job summary: {summary}", flush=True)
print(f"\nsmoke: {len(commands) + 1 - failures} passed, {failures} failed")
sys.exit(1 if failures else 0)

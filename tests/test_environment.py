"""What importing msgsnn sets in the environment before torch loads MKL and OpenMP, and what it leaves alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

KEYS = ("MKL_CBWR", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def environment_after_import(**env: str) -> dict[str, str | None]:
    """The three variables as a fresh process sees them after ``import msgcli``, started with ``env`` added."""
    base = {k: v for k, v in os.environ.items() if k not in KEYS}
    code = f"import json, os, msgcli; print(json.dumps({{k: os.environ.get(k) for k in {KEYS!r}}}))"
    done = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_msgsnn_asks_for_strict_mkl_sums_and_sleeping_openmp_threads():
    assert environment_after_import() == {"MKL_CBWR": "AUTO,STRICT", "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}


@pytest.mark.parametrize("env", [{"MKL_CBWR": "COMPATIBLE", "OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "1000"}])
def test_values_the_user_set_are_kept(env):
    seen = environment_after_import(**env)
    assert {k: seen[k] for k in env} == env
    if "GOMP_SPINCOUNT" in env:  # the user tuned the spinning: no wait policy on top of it
        assert seen["OMP_WAIT_POLICY"] is None

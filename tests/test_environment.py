"""What msgsnn does to its host: importing the library sets only what determinism needs (MKL_CBWR, before
torch loads MKL) and leaves logging alone; the command also asks OpenMP's threads to sleep."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from tests.conftest import tiny_config

KEYS = ("MKL_CBWR", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
REPORT = f"import atexit, json, os; atexit.register(lambda: print(json.dumps({{k: os.environ.get(k) for k in {KEYS!r}}})))"


def environment_after(code: str, **env: str) -> dict[str, str | None]:
    """The three variables as a fresh process sees them at its end, after running ``code``, started with ``env`` added."""
    base = {k: v for k, v in os.environ.items() if k not in KEYS}
    done = subprocess.run([sys.executable, "-c", f"{REPORT}\n{code}"], env={**base, **env}, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


IMPORT = "import msgcli"
COMMAND = "import sys; sys.argv = ['msgsnn', 'presets']; from msgcli.cli import main; main()"  # what `msgsnn presets` runs


def test_importing_the_library_sets_only_strict_mkl_sums():
    assert environment_after(IMPORT) == {"MKL_CBWR": "AUTO,STRICT", "OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}


def test_the_command_also_asks_for_sleeping_openmp_threads():
    assert environment_after(COMMAND) == {"MKL_CBWR": "AUTO,STRICT", "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}


@pytest.mark.parametrize("code", [IMPORT, COMMAND])
@pytest.mark.parametrize("env", [{"MKL_CBWR": "COMPATIBLE", "OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "1000"}])
def test_values_the_user_set_are_kept(env, code):
    seen = environment_after(code, **env)
    assert {k: seen[k] for k in env} == env
    if "GOMP_SPINCOUNT" in env:  # the user tuned the spinning: no wait policy on top of it
        assert seen["OMP_WAIT_POLICY"] is None


def test_a_run_keeps_the_hosts_logging_handlers_and_level_and_still_writes_train_log(tmp_path):
    """The library writes its run's train.log through a handler of its own, removed at the end; a handler the
    user attached to the ``msgcli`` logger stays open and receives the run's records."""
    from msgcli.engine.train import train

    logger = logging.getLogger("msgcli")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    mine = Keep()
    before = logger.level, list(logger.handlers)
    logger.addHandler(mine)
    try:
        result = train(tiny_config(tmp_path, train__epochs=1), tmp_path / "out", progress=False)
        assert mine in logger.handlers and logger.handlers == [*before[1], mine]  # nothing removed, nothing left behind
        assert logger.level == before[0]
        assert any("epoch 1/1" in r.getMessage() for r in records)  # the run's INFO reached the user's handler
        text = (result.run.log).read_text()
        assert "data synthetic:" in text and "epoch 1/1" in text and "finished:" in text
    finally:
        logger.removeHandler(mine)

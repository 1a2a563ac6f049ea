"""Two CPU processes over gloo on loopback: synchronised BatchNorm, identical starts with per-rank MSG
streams, identical TWO factors and parameters, one set of files, agreed stops and exact resume."""

from __future__ import annotations

import csv
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from msgcli import config as config_io
from msgcli.engine import checkpoint, distributed
from msgcli.engine import train as train_module
from msgcli.errors import UserError
from msgcli.engine.seeding import seed_rank
from msgcli.snn.layers import TemporalBatchNorm, sync_batchnorm
from tests.conftest import tiny_cli_args, tiny_config
from tests.launch import FAULTY_CLI, finish, free_port, same_metrics


def join_group(rank: int, world: int, port: int) -> None:
    """The environment of a group the test makes itself (as a user's script would), torch's compiler imported
    first (:func:`distributed.import_compiler_first`)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.import_compiler_first()


# ---------------------------------------------------------------- srun: rank 0 hosts the store


def as_srun_task(rank: int, world: int, port: int) -> None:
    """The environment of task ``rank`` of an srun step of ``world`` tasks (no torchrun variables), meeting at
    ``port``."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.environ.update(SLURM_NTASKS=str(world), SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_ID="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _late_reader_worker(rank: int, world: int, port: int, results: str) -> None:
    """srun's tasks: rank 0 answers at once and leaves; rank 1 reads the answer 2 s later."""
    as_srun_task(rank, world, port)
    ctx = distributed.setup("cpu", timeout_s=30)
    assert ctx.launcher == "srun" and ctx.world_size == world
    try:
        if rank == 1:
            time.sleep(2)
        answer = distributed.on_main(ctx, lambda: "finished already")
    finally:
        distributed.teardown(ctx)
    Path(results, str(rank)).write_text(answer)


@pytest.mark.slow
def test_under_srun_rank_0_keeps_its_store_until_every_rank_has_read_its_last_answer(tmp_path):
    """Rank 0 hosts srun's store: leaving right after its answer (as a finished --auto-resume run does)
    must not take the store from a rank that has not read it yet."""
    mp.spawn(_late_reader_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / str(rank)).read_text() for rank in (0, 1)] == ["finished already"] * 2


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _group_threads_worker(rank: int, world: int, port: int, results: str) -> None:
    """srun's tasks: a group msgsnn makes, msgsnn's operators and a collective in it, then its teardown."""
    as_srun_task(rank, world, port)
    torch.set_num_threads(1)
    assert "torch._dynamo" not in sys.modules  # else the test would not see the late import it guards against
    before = _threads()
    ctx = distributed.setup("cpu", timeout_s=30)
    bn = TemporalBatchNorm(3)
    bn(torch.randn(2, 4, 3, 2, 2, requires_grad=True)).sum().backward()  # imports torch's compiler if not yet
    dist.all_reduce(torch.ones(3))
    distributed.teardown(ctx)
    del ctx  # rank 0's store, which srun's rendezvous made and the context holds
    Path(results, str(rank)).write_text(str(_threads() - before))


@pytest.mark.slow
def test_teardown_leaves_no_thread_of_the_group_behind(tmp_path):
    """gloo's threads end with the group: ones that outlive it can abort the process as the interpreter exits."""
    mp.spawn(_group_threads_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / str(rank)).read_text() for rank in (0, 1)] == ["0", "0"]


# ---------------------------------------------------------------- synchronised BatchNorm


def _sync_bn_worker(rank: int, world: int, port: int) -> None:
    join_group(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    T, B, C, H, W = 3, 4, 5, 4, 4
    mine = slice(rank * B, (rank + 1) * B)
    for mode in ("per_step", "joint"):
        for channels_last in (False, True):
            g = torch.Generator().manual_seed(0)  # every rank draws the same union batch
            scale = torch.arange(1.0, T + 1, dtype=torch.float64).view(T, 1, 1, 1, 1)
            union = torch.randn(T, world * B, C, H, W, generator=g, dtype=torch.float64) * scale + 2
            upstream = torch.randn(union.shape, generator=g, dtype=torch.float64)
            if channels_last:  # the layout convolutions hand over: the C kernels' path
                union = union.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
            single = TemporalBatchNorm(C, mode=mode).double()
            with torch.no_grad():
                single.weight.copy_(torch.linspace(0.5, 2.0, C))
                single.bias.copy_(torch.linspace(-1.0, 1.0, C))
            synced = sync_batchnorm(TemporalBatchNorm(C, mode=mode).double())
            synced.load_state_dict(single.state_dict())

            x_all = union.clone().requires_grad_()
            y_all = single(x_all)
            y_all.backward(upstream)
            x = union[:, mine].clone().requires_grad_()
            y = synced(x)
            y.backward(upstream[:, mine])
            weight_grad, bias_grad = synced.weight.grad.clone(), synced.bias.grad.clone()
            dist.all_reduce(weight_grad)  # what DDP does (then divides by the world size)
            dist.all_reduce(bias_grad)

            case = f"{mode}, channels_last={channels_last}, rank {rank}"
            close = lambda a, b, what: torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"{what}: {case}")  # noqa: E731
            close(y, y_all[:, mine], "output")
            close(x.grad, x_all.grad[:, mine], "input gradient")
            close(weight_grad, single.weight.grad, "weight gradient")
            close(bias_grad, single.bias.grad, "bias gradient")
            close(synced.running_mean, single.running_mean, "running mean")
            close(synced.running_var, single.running_var, "running variance")
            assert synced.num_batches_tracked == single.num_batches_tracked, case
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["per_step", "joint"])
def test_sync_bn_in_one_process_is_the_plain_layer(mode):
    plain = TemporalBatchNorm(3, mode=mode).double()
    synced = sync_batchnorm(TemporalBatchNorm(3, mode=mode).double())
    x = torch.randn(4, 5, 3, 2, 2, dtype=torch.float64) + torch.arange(4.0, dtype=torch.float64).view(4, 1, 1, 1, 1)
    assert "sync=True" in repr(synced)
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(synced.running_var, plain.running_var, rtol=0, atol=0)


@pytest.mark.slow
def test_sync_bn_equals_single_process_bn_over_the_union_of_the_ranks_batches():
    """Each rank holds half of one batch; both BN modes, both memory layouts; in double precision."""
    mp.spawn(_sync_bn_worker, args=(2, free_port()), nprocs=2, join=True)


# ---------------------------------------------------------------- a 2-rank run through train()


def _recording_model_builder(record: dict):
    """build_model_from_config that keeps the weights as built and the first draws of the random
    stream at the first training forward: the stream the MSG masks of that step come from."""
    build = train_module.build_model_from_config

    def build_and_record(*args, **kwargs):
        model = build(*args, **kwargs)
        record["initial"] = {k: v.clone() for k, v in model.state_dict().items()}

        def first_training_forward(module, inputs):
            if module.training and "stream" not in record:
                state = torch.get_rng_state()
                record["stream"] = torch.rand(64)
                torch.set_rng_state(state)

        model.register_forward_pre_hook(first_training_forward)
        return model

    return build_and_record


def _train_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    join_group(rank, world, port)
    mp.set_start_method("fork", force=True)  # DataLoader workers fork as under torchrun (spawned ones re-import torch)
    record: dict = {}
    train_module.build_model_from_config = _recording_model_builder(record)
    result = train_module.train(config_io.from_dict(cfg_dict), out, progress=False)
    record.update(model=result.model.state_dict(), factors=result.two.factors, group_left=not dist.is_initialized())
    torch.save(record, f"{out}/rank{rank}.pt")


def _stream_of(seed: int, rank: int) -> torch.Tensor:
    """The documented per-rank stream, drawn here without disturbing this process's generators."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        seed_rank(seed, rank)
        return torch.rand(64)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


TWO_RANKS = {"train.epochs": 3, "train.limit_batches": 0, "data.num_workers": 2, "train.sync_bn": True,
             "optim.lr_batch": "global"}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One uninterrupted 2-rank run ``out/straight`` through train() with sync_bn and 2 DataLoader workers,
    recording each rank's weights as built and its random stream at the first training step."""
    base = tmp_path_factory.mktemp("two-ranks")
    cfg = tiny_config(base, name="straight", **{k.replace(".", "__"): v for k, v in TWO_RANKS.items()})
    mp.spawn(_train_worker, args=(2, free_port(), config_io.to_dict(cfg), str(base / "out")), nprocs=2, join=True)
    return base


@pytest.mark.slow
def test_two_ranks_start_identical_draw_their_own_masks_and_end_identical(two_ranks):
    """Identical weights as built, rank-specific MSG streams (the documented derivation, so reproducible
    for the seed), identical TWO factors and parameters after training, one set of files, the lr of the
    global batch (optim.lr_batch=global), and the process group left at the end."""
    seed = tiny_config(two_ranks).train.seed
    ranks = [torch.load(two_ranks / "out" / f"rank{r}.pt") for r in range(2)]
    for name, value in ranks[0]["initial"].items():
        assert torch.equal(value, ranks[1]["initial"][name]), name
    assert not torch.equal(ranks[0]["stream"], ranks[1]["stream"])
    for rank in range(2):
        assert torch.equal(ranks[rank]["stream"], _stream_of(seed, rank))
    assert not torch.equal(_stream_of(seed, 1), _stream_of(seed + 1, 0))  # not seed + rank
    assert torch.equal(ranks[0]["factors"], ranks[1]["factors"])
    assert not torch.equal(ranks[0]["factors"], torch.ones(4, dtype=ranks[0]["factors"].dtype))  # TWO did update
    for name, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][name]), name
    assert all(r["group_left"] for r in ranks)
    assert (two_ranks / "out" / "straight" / "summary.json").exists()
    metrics = pd.read_csv(two_ranks / "out" / "straight" / "metrics.csv")
    assert len(metrics) == 3  # one row per epoch, written once
    assert metrics["lr"][0] == pytest.approx(0.05 * 8 * 2 / 1024)  # batch 8 per process: the global batch is 16


# ---------------------------------------------------------------- the CLI under torchrun


def _torchrun(tmp_path, *args, script: list[str] | None = None, fault: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *(script or ["-m", "msgcli"]), "train", *tiny_cli_args(tmp_path), "--quiet", "--out", str(tmp_path / "out"), *args]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    if fault:
        env["MSGSNN_TEST_FAULT"] = fault
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_under_torchrun_a_missing_dataset_stops_every_rank_with_one_line(tmp_path):
    """Rank 0 finds the data missing; the other rank must not wait at a barrier or print a second error."""
    args = [a.replace("data.name=synthetic", "data.name=cifar10dvs") for a in tiny_cli_args(tmp_path)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "msgcli", "train", *args, "--quiet", "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    output = done.stdout + done.stderr
    assert done.returncode != 0
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: cifar10dvs:") and "CIFAR10DVS.zip" in errors[0], output
    assert "exitcode  : 2" in output  # every rank exited with the CLI's code for missing data


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_both_ranks_with_one_line_and_the_last_good_checkpoint(tmp_path):
    """Rank 1's loss turns NaN at its 10th step (epoch 2); rank 0's stays finite. Both must stop there,
    before backward, where a lone raising rank would leave the other waiting in the gradient all-reduce."""
    started = time.time()
    code, output = finish(_torchrun(tmp_path, "--set", "train.epochs=3", "--set", "train.limit_batches=0",
                                     script=[FAULTY_CLI], fault="nan@1:10"), timeout=240)
    assert code != 0
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1, output
    assert re.search(r"NaN or infinite on rank 1 at epoch 2, batch \d+;", errors[0]), output
    assert "exitcode  : 3" in output  # every rank exited with the CLI's code for a non-finite loss
    run = tmp_path / "out" / "digits-dvs"
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert len(pd.read_csv(run / "metrics.csv")) == 1
    assert not (run / "summary.json").exists()
    assert time.time() - started < 200  # no rank waited for the gloo timeout


def _stopped_in_epoch_2_then_resumed(launch, run: Path) -> None:
    """A run stopped by SIGTERM in epoch 2 with 2 DataLoader workers a rank, saves, says so once and exits;
    ``--resume`` then finishes it."""
    code, output = finish(launch(fault=True), timeout=300)
    assert code != 0
    assert "exited unexpectedly" not in output and "internal error" not in output, output  # (torchrun adds its own traceback)
    stops = [line for line in output.splitlines() if "error: interrupted at epoch 2, batch" in line]
    assert len(stops) == 1, output  # mid-epoch, said once
    assert checkpoint.load(run / "checkpoints" / "last.pt")["batch"] > 0
    assert len(pd.read_csv(run / "metrics.csv")) == 1
    code, output = finish(launch("--resume"), timeout=300)
    assert code == 0, output


@pytest.mark.slow
def test_two_ranks_sigterm_with_workers_then_resume_give_the_uninterrupted_metrics(two_ranks):
    """The CLI under torchrun; SIGTERM reaches torchrun at rank 0's 9th step (epoch 2), and torchrun
    sends it to each rank's process group, workers included."""
    sets = [arg for key, value in TWO_RANKS.items() for arg in ("--set", f"{key}={value}")]

    def launch(*args, fault=False):
        return _torchrun(two_ranks, *sets, "--name", "killed", *args, script=[FAULTY_CLI] if fault else None,
                         fault="sigterm@0:9" if fault else None)

    _stopped_in_epoch_2_then_resumed(launch, two_ranks / "out" / "killed")
    same_metrics(two_ranks / "out" / "straight", two_ranks / "out" / "killed")
    assert sorted(row["name"] for row in csv.DictReader(open(two_ranks / "out" / "runs.csv"))) == ["killed", "straight"]


@pytest.mark.slow
def test_one_process_sigterm_with_workers_then_resume_give_the_uninterrupted_metrics(tmp_path):
    """SIGTERM to the whole process group (as Ctrl-C or a scheduler sends it) at the 17th step (epoch 2)."""
    overrides = {"train.epochs": 3, "train.limit_batches": 0, "data.num_workers": 2}
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]

    def launch(*args, fault=False):
        env = dict(os.environ, PYTHONPATH=os.getcwd(), MSGSNN_TEST_FAULT="sigterm@0:17")
        env.pop("WORLD_SIZE", None)
        entry = [FAULTY_CLI] if fault else ["-m", "msgcli"]
        return subprocess.Popen([sys.executable, *entry, "train", *tiny_cli_args(tmp_path), *sets, "--quiet",
                                 "--out", str(tmp_path / "out"), "--name", "killed", *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    _stopped_in_epoch_2_then_resumed(launch, tmp_path / "out" / "killed")
    cfg = tiny_config(tmp_path, name="straight", **{k.replace(".", "__"): v for k, v in overrides.items()})
    train_module.train(cfg, tmp_path / "out", progress=False)
    same_metrics(tmp_path / "out" / "straight", tmp_path / "out" / "killed")


def test_resume_refuses_a_checkpoint_of_another_world_size_or_without_rank_states(tmp_path):
    cfg = tiny_config(tmp_path, train__epochs=2, train__limit_batches=1)
    train_module.train(cfg, tmp_path / "out", progress=False)
    last = tmp_path / "out" / cfg.name / "checkpoints" / "last.pt"
    ck = checkpoint.load(last)
    checkpoint.save(dict(ck, ranks=ck["ranks"] * 2), last)
    with pytest.raises(UserError, match=r"written by 2 process\(es\).*--nproc_per_node 2"):
        train_module.train(cfg, tmp_path / "out", resume=True, progress=False)
    del ck["ranks"]
    checkpoint.save(ck, last)
    with pytest.raises(UserError, match="older msgsnn.*--overwrite"):
        train_module.train(cfg, tmp_path / "out", resume=True, progress=False)

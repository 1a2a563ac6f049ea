"""`msgsnn analyze`: figures exist and the numbers in their CSVs are right, on fabricated and real runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from msgcli import config as config_io
from msgcli.analysis import figures, firing, grads, runs
from msgcli.cli import app
from msgcli.engine.build import build_model_from_config, build_two
from msgcli.snn import build_model
from tests.conftest import tiny_cli_args

LAYERS = ("features.0.2", "features.2.2", "features.4.2")  # vggsnn_tiny's spiking layers
T = 4


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def make_run(root, name, *, mask_p=0.5, two=True, seed=42, best=70.0, epochs=3, finished=True,
             preset="dvs-vgg", checkpoint=False, rates=(0.1, 0.2, 0.3)):
    """A run directory as the engine writes it, with chosen numbers (vggsnn_tiny, T=4, 16x16 input)."""
    cfg = config_io.apply_overrides(config_io.RunConfig(), {
        "name": name, "preset": preset, "T": T, "data.size": 16, "model.name": "vggsnn_tiny",
        "model.neuron.mask_p": mask_p, "two.enabled": two, "train.seed": seed, "train.epochs": max(epochs, 1),
    })
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    config_io.save(cfg, run / "config.yaml")
    rows = []
    for epoch in range(1, epochs + 1):
        acc = best - 5 * (epochs - epoch)
        row = {"epoch": epoch, "lr": 1e-3, "train_loss": 2.0 / epoch, "train_acc": acc, "test_loss": 1.0 / epoch, "test_acc": acc}
        row.update({f"test_acc_t{t}": acc - t for t in range(T)})
        row.update({f"two_t{t}": 1.0 + 0.1 * t * (epoch - 1) for t in range(T)})
        row.update({f"fr/{layer}": rate for layer, rate in zip(LAYERS, rates)})
        row["epoch_seconds"] = 2.0 + epoch
        rows.append(row)
    if rows:
        pd.DataFrame(rows).to_csv(run / "metrics.csv", index=False)
    if finished:
        summary = {"status": "finished", "name": name, "preset": preset, "best_test_acc": best,
                   "final_test_acc": best, "epochs": epochs, "seconds": 10.0}
        (run / "summary.json").write_text(json.dumps(summary))
    if checkpoint:
        torch.save({"model": build_model_from_config(cfg, 2, 10).state_dict(), "two": build_two(cfg).state_dict()},
                   run / "checkpoints" / "last.pt")
    return run


def lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def test_table_gives_mean_and_std_over_seeds_per_ablation_cell_beside_the_paper(tmp_path):
    accuracy = {("baseline", 42): 80.0, ("baseline", 43): 82.0, ("+TWO", 42): 81.0, ("+TWO", 43): 83.0,
                ("+MSG", 42): 84.0, ("+MSG", 43): 86.0, ("MSG+TWO", 42): 85.0, ("MSG+TWO", 43): 89.0}
    for (variant, seed), best in accuracy.items():
        make_run(tmp_path / "sweep", f"{variant.strip('+')}-{seed}", mask_p=0.5 if "MSG" in variant else 0.0,
                 two="TWO" in variant, seed=seed, best=best)
    result = invoke("analyze", "table", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "sweep" / "figures" / "ablation.csv")
    assert list(table["variant"]) == ["baseline", "+TWO", "+MSG", "MSG+TWO"]
    assert list(table["mean"]) == [81.0, 82.0, 85.0, 87.0]
    assert table["std"].tolist() == pytest.approx([np.sqrt(2), np.sqrt(2), np.sqrt(2), np.sqrt(8)])
    assert list(table["n"]) == [2] * 4
    assert list(table["paper"]) == [82.70, 83.20, 83.30, 83.90]  # docs/method.md's DVS-CIFAR10 VGGSNN row
    markdown = (tmp_path / "sweep" / "figures" / "ablation.md").read_text()
    assert "| dvs-vgg | MSG+TWO | 0.5 | 2 | 87.00 ± 2.83 | 83.90 |" in markdown
    assert "87.00 ± 2.83" in result.output


def test_table_splits_msg_rows_by_p_and_reports_missing_cells_and_unfinished_runs(tmp_path):
    make_run(tmp_path, "a", mask_p=0.25, best=70.0, preset="digits-dvs")
    make_run(tmp_path, "b", mask_p=0.75, best=60.0, preset="digits-dvs")
    make_run(tmp_path, "c", mask_p=0.75, best=50.0, preset="digits-dvs", finished=False)
    result = invoke("analyze", "table", tmp_path / "a", tmp_path / "b", tmp_path / "c", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "out" / "ablation.csv")
    assert list(table["p"]) == [0.25, 0.75] and list(table["mean"]) == [70.0, 60.0]
    assert table["paper"].isna().all()
    assert "no baseline, +TWO, +MSG runs" in result.output
    assert "c: not finished" in result.output


def test_maskp_means_per_p_over_seeds_and_reports_failed_points(tmp_path):
    sweep = tmp_path / "sweeps" / "demo"
    for p, accs in {0.0: (60, 64), 0.5: (70, 72), 1.0: (40, 50)}.items():
        for seed, best in zip((42, 43), accs):
            make_run(sweep, f"mask_p={p:g}_seed={seed}", mask_p=p, seed=seed, best=best)
    make_run(sweep, "mask_p=0.25_seed=42", mask_p=0.25, finished=False)
    pd.DataFrame([{"run": "mask_p=0.25_seed=42", "model.neuron.mask_p": 0.25, "seed": 42, "status": "failed",
                   "error": "error: the loss became nan"},
                  {"run": "mask_p=0.75_seed=42", "model.neuron.mask_p": 0.75, "seed": 42, "status": "failed",
                   "error": "error: no dataset"}]).to_csv(sweep / "sweep.csv", index=False)
    result = invoke("analyze", "maskp", sweep)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(sweep / "figures" / "maskp.csv")
    assert list(table["mask_p"]) == [0.0, 0.5, 1.0]
    assert list(table["mean"]) == [62.0, 71.0, 45.0]
    assert table["std"].tolist() == pytest.approx([np.sqrt(8), np.sqrt(2), np.sqrt(50)])
    assert (sweep / "figures" / "maskp.png").stat().st_size > 10_000 and (sweep / "figures" / "maskp.pdf").exists()
    assert "mask_p=0.25_seed=42: failed in the sweep: error: the loss became nan" in result.output
    assert "mask_p=0.75_seed=42: failed in the sweep: error: no dataset" in result.output


def test_temporal_and_curves_draw_every_run_with_epochs(tmp_path):
    make_run(tmp_path, "msg", epochs=8)
    make_run(tmp_path, "plain", mask_p=0.0, epochs=8)
    make_run(tmp_path, "fresh", epochs=0, finished=False)
    result = invoke("analyze", "temporal", tmp_path / "msg")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "msg" / "figures" / "temporal.png").exists() and (tmp_path / "msg" / "figures" / "temporal.pdf").exists()
    result = invoke("analyze", "curves", tmp_path / "msg", tmp_path / "plain", tmp_path / "fresh")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "figures" / "curves.png").exists()
    assert "fresh: no finished epoch yet" in result.output


def test_bad_inputs_end_in_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    make_run(tmp_path, "fresh", epochs=0, finished=False)
    cases = [
        (("analyze", "curves", tmp_path / "empty"), "is neither a run directory"),
        (("analyze", "temporal", tmp_path / "fresh"), "nothing to draw: fresh: no finished epoch yet"),
        (("analyze", "table", tmp_path / "fresh"), "nothing to draw: fresh: not finished"),
        (("analyze", "grads", tmp_path / "empty"), "is not a run directory"),
        (("analyze", "grads", tmp_path / "fresh", "--preset", "digits-dvs"), "give either a RUN_DIR or --preset, not both"),
        (("analyze", "maskp", tmp_path / "fresh", "--metric", "worst"), "--metric"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code != 0, args
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output and len(lines(result)) == 1, result.output


def test_firing_counts_synaptic_operations_from_fan_out(tmp_path):
    make_run(tmp_path, "msg", checkpoint=True, rates=(0.1, 0.2, 0.3))
    make_run(tmp_path, "plain", mask_p=0.0, rates=(0.2, 0.2, 0.2))  # no checkpoint: drawn, not counted
    result = invoke("analyze", "firing", tmp_path / "msg", tmp_path / "plain")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "figures" / "firing.png").exists()
    assert "plain: no checkpoints/last.pt" in result.output and "ESTIMATE" in result.output
    layers = pd.read_csv(tmp_path / "figures" / "firing.csv").set_index("layer")
    # 16x16 input: 32c3 (16x16) -> pool -> 64c3 (8x8) -> pool -> 128c3 (4x4) -> pool -> 512 -> 10 classes.
    # A spike feeds the next conv through a 2x2 pool: out_channels * 9 / 4 accumulates.
    assert list(layers["neurons"]) == [32 * 16 * 16, 64 * 8 * 8, 128 * 4 * 4]
    assert list(layers["fan_out"]) == [64 * 9 / 4, 128 * 9 / 4, 10 / 4]
    expected = [rate * n * fan * T for rate, n, fan in zip((0.1, 0.2, 0.3), layers["neurons"], layers["fan_out"])]
    assert layers["synops_per_sample"].tolist() == pytest.approx(expected)
    energy = pd.read_csv(tmp_path / "figures" / "energy.csv").iloc[0]
    encoder = 32 * 16 * 16 * 2 * 9  # the first conv reads the input, not spikes: dense MACs
    all_macs = encoder + 64 * 8 * 8 * 32 * 9 + 128 * 4 * 4 * 64 * 9 + 512 * 10
    assert energy["ann_macs_per_sample"] == all_macs
    assert energy["snn_energy_uJ_estimate"] == pytest.approx((0.9 * sum(expected) + 4.6 * encoder * T) / 1e6)
    assert energy["ann_energy_uJ_estimate"] == pytest.approx(4.6 * all_macs / 1e6)
    assert energy["seconds_per_epoch"] == pytest.approx(4.0)


def test_operation_counts_follow_spikes_into_both_paths_of_a_resnet_block():
    model = build_model("resnet18", 2, 10, 2, stem="cifar")
    counts = firing.count_operations(model, torch.zeros(2, 8, 8))
    # the stem's spikes feed block 1's first conv (64 -> 64, 3x3) and its identity shortcut (no MACs)
    assert counts.fed_macs["stem.2"] == 64 * 8 * 8 * 64 * 9
    # a stride-2 block's input spikes feed its 3x3 conv and its 1x1 shortcut conv
    assert counts.fed_macs["stages.1.spike"] == 128 * 4 * 4 * 64 * 9 + 128 * 4 * 4 * 64
    assert counts.dense_layers == ["stem.0.module"]


def test_msg_keeps_about_1_minus_p_of_the_surrogate_gradient_entries():
    torch.manual_seed(0)
    model = build_model("vggsnn_tiny", 2, 4, T, input_size=16, mask_p=0.3)
    inputs, targets = torch.rand(8, T, 2, 16, 16) * 3, torch.randint(0, 4, (8,))
    chosen = grads.settings(model.features[0][2].spec, 0.3)
    stats = grads.measure_gradients(model, build_two(config_io.RunConfig(T=T)), inputs, targets, chosen)
    surrogate = stats.fractions[stats.fractions["quantity"] == "dS/dV"].pivot(index="layer", columns="setting", values="nonzero_fraction")
    assert (surrogate["msg"] / surrogate["sg_default"]).to_numpy() == pytest.approx(0.7, abs=0.03)
    assert (surrogate["sg_narrow"] < surrogate["sg_default"]).all() and (surrogate["sg_default"] < surrogate["sg_wide"]).all()
    # every non-zero entry lands in a histogram bin
    counted = stats.histogram.groupby(["setting", "layer"])["count"].sum()
    nonzero = stats.fractions[stats.fractions["quantity"] == "dS/dV"].set_index(["setting", "layer"])["nonzero"]
    assert counted.sort_index().tolist() == nonzero.sort_index().tolist()
    weights = stats.fractions[stats.fractions["quantity"] == "dL/dW"]
    assert set(weights["layer"]) == {"features.0.0.module", "features.2.0.module", "features.4.0.module", "classifier.module"}
    assert weights["nonzero_fraction"].between(0, 1).all()
    assert model.features[0][2].spec.mask_p == 0.3  # restored


@pytest.mark.slow
def test_grads_and_friends_on_a_real_run_named_or_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default results/ folder is the temporary one
    result = invoke("train", "--epochs", "2", "--quiet", *tiny_cli_args(tmp_path))
    assert result.exit_code == 0, result.output
    run = Path("results") / "digits-dvs"
    result = invoke("analyze", "grads", "--batch-size", "8")  # no run named: the one just finished
    assert result.exit_code == 0, result.output
    assert lines(result)[0] == f"using {run} (the most recently finished run)"
    fractions = pd.read_csv(run / "figures" / "grads.csv")
    surrogate = fractions[fractions["quantity"] == "dS/dV"].groupby("setting")[["nonzero", "entries"]].sum()
    share = surrogate["nonzero"] / surrogate["entries"]
    assert share["msg"] / share["sg_default"] == pytest.approx(0.5, abs=0.05)  # the preset's p = 0.5
    for name in ("grads.png", "grads.pdf", "grads_hist.csv"):
        assert (run / "figures" / name).exists()
    for command in ("temporal", "firing", "curves"):
        for named in ([run], []):
            result = invoke("analyze", command, *named)
            assert result.exit_code == 0, (command, result.output)
            assert ("using" in result.output) == (not named), result.output
        assert (run / "figures" / f"{command}.png").exists()
    result = invoke("analyze", "grads", "--preset", "digits-dvs", "--out", tmp_path / "preset", *tiny_cli_args(tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "preset" / "grads.png").exists()


def test_bare_commands_take_the_most_recent_finished_run_or_sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in ("grads", "temporal", "curves", "firing"):
        result = invoke("analyze", command)
        assert result.exit_code != 0 and len(lines(result)) == 1, result.output
        assert "no finished run under results/; make one with: msgsnn train --preset digits-dvs" in result.output
    for command in ("maskp", "table"):
        result = invoke("analyze", command)
        assert result.exit_code != 0 and len(lines(result)) == 1, result.output
        assert "no sweep under results/; make one with: msgsnn sweep --preset digits-dvs" in result.output

    results = tmp_path / "results"
    older = make_run(results, "older", epochs=8)
    newer = make_run(results / "sweeps" / "demo", "mask_p=0_seed=42", mask_p=0.0, epochs=8)
    make_run(results, "unfinished", epochs=2, finished=False)  # no summary.json: not a candidate
    os.utime(older / "summary.json", (1e9, 1e9))
    result = invoke("analyze", "temporal")
    assert result.exit_code == 0, result.output
    assert lines(result)[0] == "using results/sweeps/demo/mask_p=0_seed=42 (the most recently finished run)"
    assert (newer / "figures" / "temporal.png").exists()

    make_run(results / "sweeps" / "demo", "mask_p=0.5_seed=42", mask_p=0.5, epochs=8)
    (results / "sweeps" / "demo" / "sweep.csv").write_text("run,status\nmask_p=0_seed=42,finished\nmask_p=0.5_seed=42,finished\n")
    (results / "sweeps" / "old").mkdir()
    (results / "sweeps" / "old" / "sweep.csv").write_text("run,status\n")
    os.utime(results / "sweeps" / "old" / "sweep.csv", (1e9, 1e9))
    for command, written in (("maskp", "maskp.csv"), ("table", "ablation.csv")):
        result = invoke("analyze", command)
        assert result.exit_code == 0, result.output
        assert lines(result)[0] == "using results/sweeps/demo (the most recently finished sweep)"
        assert (results / "sweeps" / "demo" / "figures" / written).exists()


@pytest.fixture
def drawn(monkeypatch):
    """The figures the analyses save, drawn, by file stem (nothing is written)."""
    figures_by_stem = {}

    def keep(fig, directory, stem):
        fig.canvas.draw()
        figures_by_stem[stem] = fig
        return []

    for module in (figures, firing, grads):
        monkeypatch.setattr(module, "save_figure", keep)
    return figures_by_stem


def legend_texts(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_legends_name_the_variant_and_epoch_axes_tick_whole_epochs(tmp_path, drawn):
    runs_ = [runs.load_run(make_run(tmp_path, name, mask_p=p, two=two, epochs=20))
             for name, p, two in (("a", 0.0, False), ("b", 0.0, True), ("c", 0.5, False), ("d", 0.5, True), ("e", 0.3, True))]
    figures.plot_curves(runs_, tmp_path)
    accuracy, loss = drawn["curves"].axes
    assert legend_texts(accuracy) == ["baseline", "+TWO", "+MSG", "MSG+TWO", "MSG+TWO (p=0.3)"]
    for ax in (accuracy, loss):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), ticks
    figures.plot_temporal(runs_[1], tmp_path)
    assert all(float(t).is_integer() for t in drawn["temporal"].axes[0].get_xticks())

    seeds = [runs.load_run(make_run(tmp_path / "seeds", f"s{seed}", seed=seed)) for seed in (42, 43)]
    twins = [runs.load_run(make_run(tmp_path / "twins", name)) for name in ("first", "second")]
    assert runs.legend_labels(seeds) == ["MSG+TWO, seed 42", "MSG+TWO, seed 43"]
    assert runs.legend_labels(twins) == ["MSG+TWO: first", "MSG+TWO: second"]  # a tie: the run names tell them apart


def test_firing_figure_has_no_empty_middle_and_names_variants(tmp_path, drawn):
    chosen = [runs.load_run(make_run(tmp_path, "plain", mask_p=0.0, two=False)), runs.load_run(make_run(tmp_path, "msg", two=False))]
    firing.plot_firing(chosen, tmp_path)
    rates, timing = drawn["firing"].axes
    assert legend_texts(rates) == ["baseline", "+MSG"]
    assert [t.get_text() for t in timing.get_xticklabels()] == ["baseline", "+MSG"]
    gap = timing.get_position().x0 - rates.get_position().x1  # figure fractions
    assert 0 < gap < 0.1, gap


def test_gradient_histograms_share_axes_and_bins_as_in_fig_1(tmp_path, drawn):
    torch.manual_seed(0)
    model = build_model("vggsnn_tiny", 2, 4, T, input_size=16, mask_p=0.5)
    chosen = grads.settings(model.features[0][2].spec, 0.5)
    stats = grads.measure_gradients(model, build_two(config_io.RunConfig(T=T)), torch.rand(8, T, 2, 16, 16) * 3,
                                    torch.randint(0, 4, (8,)), chosen)
    edges = stats.histogram.groupby("setting")["bin_high"].max()
    assert (edges == 4 * 2.0).all()  # one set of bins for all: up to the narrow surrogate's peak (4 alpha)
    grads.plot_gradients(stats, chosen, "test", tmp_path)
    panels = drawn["grads"].axes[:len(chosen)]
    assert {ax.get_xlim() for ax in panels} == {panels[0].get_xlim()}
    assert {ax.get_ylim() for ax in panels} == {panels[0].get_ylim()}
    assert panels[0].get_xlim()[1] >= 8.0 and panels[0].get_xlim()[0] < 0  # the dS/dV = 0 bar sits left of 0

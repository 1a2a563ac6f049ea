"""Means and spreads over seeds: the ablation table and the accuracy-against-p table.

Both start from :func:`run_frame`, one row per finished run with its flattened
config, and group runs that differ only in their seed (and in keys that do not
change results, such as where the data lives).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.markup import escape
from rich.table import Table

from msgcli.analysis.runs import VARIANTS, Report, Run, paper_ablation, paper_numbers
from msgcli.engine.sweep import flat_config, setting_keys

# Keys that differ between the runs of one experiment.
NOT_A_SETTING = ("name", "train.seed")
# What runs with a validation split (data.val_fraction > 0) also report, and the column that shows each.
VALIDATION = {"best_val_acc": "best val", "test_acc_at_best_val": "test at best val"}


def run_frame(runs: list[Run], metric: str) -> pd.DataFrame:
    """One row per run: ``run``, ``setup`` (preset, else dataset/network), ``variant``, ``acc`` and every config key."""
    rows = []
    for run in runs:
        cfg = run.config
        row = flat_config(cfg)
        row.update(run=run.name, setup=cfg.preset or f"{cfg.data.name}/{cfg.model.name}", variant=run.variant,
                   acc=run.accuracy(metric), **{key: run.validation(key) for key in VALIDATION})
        rows.append(row)
    return pd.DataFrame(rows)


def varying(frame: pd.DataFrame, exclude: tuple[str, ...]) -> list[str]:
    """Setting keys whose value differs between the rows, except ``exclude`` and NOT_A_SETTING."""
    keys = [k for k in setting_keys() if k not in exclude + NOT_A_SETTING]
    return [k for k in keys if frame[k].astype(str).nunique() > 1]


def describe(row: pd.Series, keys: list[str]) -> str:
    return ", ".join(f"{k}={row[k]}" for k in keys)


def summarize(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean, sample std (ddof 1; empty for one seed), min, max and count of ``acc`` per group, in first-seen order."""
    grouped = frame.groupby(by, sort=False, dropna=False)
    table = grouped["acc"].agg(n="count", mean="mean", std="std", min="min", max="max").reset_index()
    for key in VALIDATION:
        if key in frame and frame[key].notna().any():
            table[f"{key}_mean"], table[f"{key}_std"] = grouped[key].mean().values, grouped[key].std().values
    table["seeds"] = grouped["train.seed"].agg(lambda s: " ".join(map(str, sorted(s)))).values
    table["runs"] = grouped["run"].agg(" ".join).values
    return table


def mean_std(mean: float, std: float) -> str:
    return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


def paper_number(run: Run, variant: str) -> str:
    """The paper's accuracy for ``run``'s setup and an ablation cell, as its preset's ``paper:`` block gives it."""
    ablation = paper_ablation(run.config, variant)
    if ablation is not None:
        return f"{ablation:.2f}"
    paper = paper_numbers(run.config)
    if variant == "MSG+TWO" and paper.accuracy is not None:
        return mean_std(paper.accuracy, paper.std)
    return ""


def ablation_table(runs: list[Run], metric: str) -> pd.DataFrame:
    """baseline / +TWO / +MSG / MSG+TWO per setup, mean ± std over seeds, with the paper's number.

    Runs of one setup that differ in other settings than TWO, p and the seed get
    separate rows, named in ``detail``; MSG rows name their p.
    """
    frame = run_frame(runs, metric)
    frame["p"] = frame["model.neuron.mask_p"].where(frame["variant"].str.contains("MSG"), 0.0)
    by_name = {run.name: run for run in runs}
    parts = []
    for _, setup in frame.groupby("setup", sort=True):
        keys = varying(setup, ("two.enabled", "model.neuron.mask_p"))
        setup = setup.assign(detail=setup.apply(describe, axis=1, keys=keys) if keys else "",
                             order=setup["variant"].map(VARIANTS.index))
        part = summarize(setup.sort_values(["order", "p"]), ["setup", "variant", "p", "detail"])
        example = by_name[setup["run"].iloc[0]]
        part["paper"] = [paper_number(example, v) for v in part["variant"]]
        parts.append(part)
    table = pd.concat(parts, ignore_index=True)
    table["accuracy"] = [mean_std(m, s) for m, s in zip(table["mean"], table["std"])]
    for key, column in VALIDATION.items():
        if f"{key}_mean" in table:
            table[column] = ["" if pd.isna(m) else mean_std(m, s) for m, s in zip(table[f"{key}_mean"], table[f"{key}_std"])]
    return table


def group_part(key: str, value, named: bool) -> str:
    """A setting in a legend: TWO as "with TWO" / "without TWO", other keys as key=value (or the bare value)."""
    if key == "two.enabled":
        return "with TWO" if value else "without TWO"
    return f"{key}={value}" if named else str(value)


def maskp_table(runs: list[Run], metric: str) -> pd.DataFrame:
    """Accuracy per mask probability, mean ± std over seeds, one group per network/surrogate/other setting."""
    frame = run_frame(runs, metric)
    keys = ["model.name", "model.neuron.surrogate"]
    keys += [k for k in varying(frame, ("model.neuron.mask_p",)) if k not in keys]
    frame["group"] = frame.apply(lambda row: ", ".join(group_part(k, row[k], named=k not in keys[:2]) for k in keys), axis=1)
    frame["mask_p"] = frame["model.neuron.mask_p"].round(6)
    return summarize(frame.sort_values(["group", "mask_p"]), ["group", "mask_p"])


def markdown(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def rich_table(frame: pd.DataFrame, title: str) -> Table:
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column), justify="right" if pd.api.types.is_numeric_dtype(frame[column]) else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*("" if pd.isna(v) else escape(str(v)) for v in row))
    return table


def table_report(runs: list[Run], metric: str, directory: Path) -> Report:
    """The ablation table as ablation.csv (all numbers) and ablation.md (as shown), and gaps per setup."""
    table = ablation_table(runs, metric)
    gaps = [f"{setup}: no {', '.join(v for v in VARIANTS if v not in set(part['variant']))} runs"
            for setup, part in table.groupby("setup") if set(part["variant"]) != set(VARIANTS)]
    gaps += [f"{r.setup} {r.variant}: one seed only, no spread" for r in table.itertuples() if r.n == 1]
    columns = ["setup", "variant", "p", "detail", "n", "accuracy", *VALIDATION.values(), "paper"]
    shown = table[[c for c in columns if c in table and (c != "detail" or table["detail"].astype(bool).any())]]
    title = f"Ablation: {metric} test accuracy (%), mean ± std over seeds"
    directory.mkdir(parents=True, exist_ok=True)
    table.to_csv(directory / "ablation.csv", index=False)
    (directory / "ablation.md").write_text(f"{title}\n\n{markdown(shown)}")
    return Report([directory / "ablation.csv", directory / "ablation.md"], gaps, shown, title)

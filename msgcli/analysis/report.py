"""``msgsnn reproduce``'s report: every row of a table beside the paper's number, and the table's figures.

Built from the plan, so rows not yet run are listed too, and from whatever the runs have
written so far: ``msgsnn reproduce --report-only`` rebuilds it at any time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from msgcli.analysis.figures import maskp_report
from msgcli.analysis.runs import Report, Run, load_run, paper_ablation, variant
from msgcli.analysis.stats import VALIDATION, markdown, mean_std
from msgcli.engine.reproduce import Reproduction, Row, duration, point_states

FIG5_NOTE = ("The paper gives Fig. 5 as a figure only, with no numbers: accuracy against p from 0 to 1, best around "
             "p = 0.4 to 0.6 and falling as p approaches 1 (docs/method.md). Ours is drawn in maskp.png.")
ABLATION_NOTE = "The paper gives one number per ablation cell, with no spread over seeds."
STATES = ("finished", "running", "interrupted", "failed", "not started")


def paper_reference(row: Row, kind: str) -> tuple[float | None, float | None]:
    """The paper's mean and spread (std over seeds) for a row; None where it gives none."""
    cfg = row.config
    if kind == "ablation":
        return paper_ablation(cfg, variant(cfg)), None
    if kind == "fig5":
        return None, None
    return cfg.paper.accuracy, cfg.paper.std


def spread(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (None for fewer than two values)."""
    series = pd.Series(values, dtype=float)
    return (series.mean() if values else None), (series.std() if len(values) > 1 else None)


def row_record(row: Row, kind: str, states: list[tuple[str, str]], runs: list[Run]) -> dict[str, Any]:
    """One report row: the paper's number, ours over the finished seeds (``runs``), the difference, time and states."""
    best_mean, best_std = spread([run.accuracy("best") for run in runs])
    final_mean, final_std = spread([run.accuracy("final") for run in runs])
    validated = {key: spread([run.validation(key) for run in runs if pd.notna(run.validation(key))])
                 for key in VALIDATION}
    seconds = [float(run.summary["seconds"]) for run in runs]
    paper_mean, paper_std = paper_reference(row, kind)
    difference = None if paper_mean is None or best_mean is None else best_mean - paper_mean
    if difference is None:
        within = ""
    else:
        within = "no spread given" if paper_std is None else ("yes" if abs(difference) <= paper_std else "no")
    counts = {state: [s for s, _ in states].count(state) for state in STATES}
    record: dict[str, Any] = {"preset": row.sweep.name, "setting": row.label}
    if kind == "ablation":
        record["variant"] = variant(row.config)
    if kind == "fig5":
        record["mask_p"] = row.config.model.neuron.mask_p
    record.update({
        "paper_mean": paper_mean, "paper_std": paper_std, "seeds": len(row.points), "finished": len(runs),
        "best_mean": best_mean, "best_std": best_std, "final_mean": final_mean, "final_std": final_std,
        **{f"{key}_{part}": value for key, (mean, std) in validated.items() for part, value in (("mean", mean), ("std", std))},
        "difference": difference, "within_spread": within,
        "seconds_mean": spread(seconds)[0], "seconds_total": sum(seconds) if seconds else None,
        "status": ", ".join(f"{n} {state}" for state, n in counts.items() if n),
        "errors": " | ".join(f"{point.name}: {error}" for point, (state, error) in zip(row.points, states) if error),
        "runs": " ".join(str(row.sweep.directory / point.name) for point in row.points),
    })
    return record


def number(value: float | None, std: float | None = None) -> str:
    return "" if value is None or pd.isna(value) else mean_std(value, float("nan") if std is None else std)


def shown_table(table: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The report's table as people read it: one text column per quantity."""
    if kind == "fig5":
        paper = ["figure only"] * len(table)
    else:
        paper = [number(m, s) if pd.notna(m) else "not in the paper" for m, s in zip(table["paper_mean"], table["paper_std"])]
    columns = {"preset": table["preset"]}
    if kind == "ablation":
        columns["variant"] = table["variant"]
    elif kind == "fig5":
        columns["p"] = table["mask_p"].map("{:g}".format)
    columns.update({
        "paper": paper,
        "ours best": [number(m, s) for m, s in zip(table["best_mean"], table["best_std"])],
        "ours final": [number(m, s) for m, s in zip(table["final_mean"], table["final_std"])],
        **{f"ours {column}": [number(m, s) for m, s in zip(table[f"{key}_mean"], table[f"{key}_std"])]
           for key, column in VALIDATION.items() if table[f"{key}_mean"].notna().any()},
        **({} if kind == "fig5" else {"diff": ["" if pd.isna(d) else f"{d:+.2f}" for d in table["difference"]],
                                       "in spread": table["within_spread"]}),
        "seeds": [f"{f}/{n}" for f, n in zip(table["finished"], table["seeds"])],
        "time/run": ["" if pd.isna(s) else duration(s) for s in table["seconds_mean"]],
        "status": table["status"],
    })
    return pd.DataFrame(columns)


def reproduction_report(plan: Reproduction, command: str) -> Report:
    """Write ``report.csv`` (every number), ``report.md`` (the table as shown, notes) and the table's figures
    into ``plan.directory``; ``command`` is what rebuilds the report, quoted in it."""
    records, finished = [], []
    for row in plan.rows:
        states = point_states(row)
        runs = [load_run(row.sweep.directory / point.name) for point, (state, _) in zip(row.points, states)
                if state == "finished"]
        records.append(row_record(row, plan.kind, states, runs))
        finished += runs
    table = pd.DataFrame(records)
    shown = shown_table(table, plan.kind)
    directory = plan.directory
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "report.md", directory / "report.csv"]
    notes = {"fig5": [FIG5_NOTE], "ablation": [ABLATION_NOTE]}.get(plan.kind, [])
    if "ours best val" in shown:
        notes.append("ours best val, ours test at best val: runs with a validation split (data.val_fraction) chose "
                     "best.pt by validation accuracy; these are that accuracy and the test accuracy of the same epoch.")
    failures = [f"{preset}, {errors}" for preset, errors in zip(table["preset"], table["errors"]) if errors]
    figure = plan.kind == "fig5" and bool(finished)
    if figure:
        written += maskp_report(finished, "best", f"{plan.name} ({', '.join(table['preset'].unique())})", directory).written
    elif plan.kind == "fig5":
        notes.append("No run has finished yet: Fig. 5 is drawn once one has.")
    runs_done, runs_planned = int(table["finished"].sum()), int(table["seeds"].sum())
    title = f"msgsnn reproduce {plan.name}: top-1 test accuracy (%), ours beside the paper"
    text = [
        f"# {title}", "",
        f"{len(table)} rows, {runs_done} of {runs_planned} runs finished. Ours: mean ± std (sample std) over the "
        "finished seeds of each run's best and final test accuracy; diff: ours (best) minus the paper's; in spread: "
        "whether |diff| <= the paper's std over seeds; seeds: finished of planned; time/run: the mean training time of "
        f"a finished run. Rebuild this report from whatever has finished with `{command}`; every number is in "
        "report.csv.", "",
        markdown(shown).rstrip("\n"), "",
        *[f"- {line}" for line in notes + [f"failed: {failure}" for failure in failures]],
    ]
    if figure:
        text += ["", "![accuracy against p](maskp.png)"]
    table.to_csv(directory / "report.csv", index=False)
    (directory / "report.md").write_text("\n".join(text).rstrip("\n") + "\n")
    return Report(written, [f"failed: {failure}" for failure in failures], shown, title)

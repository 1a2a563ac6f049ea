"""``msgsnn export``: a trained run as a file other simulators and chips read (thin over msgcli.export)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from msgcli.cli.common import Checkpoint, Plugins, RunDir, check_choice, console, exit_on_user_errors


@exit_on_user_errors
def export_command(
    run_dir: RunDir,
    checkpoint: Checkpoint = "best",
    file_format: str = typer.Option("nir", "--format", help="nir: the Neuromorphic Intermediate Representation "
                                    "(snnTorch, SpikingJelly, Norse, Sinabs, Lava and chips read it; needs the nir package)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="File to write. Default: <run>/<checkpoint>.nir."),
    dt: float = typer.Option(1e-4, help="Seconds one timestep lasts in the graph; every LIF's tau is msgsnn's tau times dt."),
    plugins: Plugins = [],  # noqa: B006 - typer's repeatable option
) -> None:
    """Write the trained network as a NIR graph: BatchNorm folded, LIF nodes, TWO's output weights in the metadata."""
    check_choice("--format", file_format, ("nir",))
    from msgcli import plugins as plugin_io
    from msgcli.export.nir import export_run

    plugin_io.load(plugins)

    path, graph = export_run(run_dir, checkpoint, output, dt)
    kinds: dict[str, int] = {}
    for node in graph.nodes.values():
        kinds[type(node).__name__] = kinds.get(type(node).__name__, 0) + 1
    weights = ", ".join(f"{w:.4g}" for w in graph.metadata["output_weights"])
    console.print(escape(f"wrote {path}: {', '.join(f'{n} {kind}' for kind, n in kinds.items())}; dt = {dt:g} s per "
                         f"timestep; class scores = sum over t of w[t] * output[t], w = [{weights}]"),
                  highlight=False, soft_wrap=True)

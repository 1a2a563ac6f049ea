"""Bring your own network, dataset and recordings: plugins, event and image folders, the validation split, eval at
another T, --lr, and the examples/ folder as a user meets them."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from msgcli import config as config_io
from msgcli import plugins as plugin_io
from msgcli.cli import app
from msgcli.data import build_datasets, register_dataset
from msgcli.data.registry import start_loading, worker_processes
from msgcli.engine import checkpoint
from msgcli.engine.build import trained_model
from msgcli.engine.train import train
from msgcli.errors import UserError
from msgcli.snn import build_model, register_model
from tests import formats
from tests.conftest import group_of_one, load_script, tiny_config

pytestmark = pytest.mark.usefixtures("isolated_registries")

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
TINY_FOLDER_RUN = ["--set", "model.name=vggsnn_tiny", "--set", "data.size=8", "--set", "T=2", "--set", "data.num_workers=0",
                   "--set", "train.threads=1", "--epochs", "1", "--batch-size", "4"]

BACKBONE = '''
import torch
from torch import nn
from msgcli import LIF, register_model, register_surrogate


class Net(nn.Module):
    def __init__(self, in_channels, num_classes, T, neuron, input_size):
        super().__init__()
        self.T = T
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.lif = LIF(**neuron)
        self.fc = nn.Linear(4 * input_size * input_size, num_classes)

    def forward(self, x):
        B, T = x.shape[:2]
        y = self.conv(x.transpose(0, 1).flatten(0, 1)).unflatten(0, (T, B))
        return self.fc(self.lif(y).flatten(2))


@register_model
def {name}(in_channels, num_classes, T, neuron, input_size=16, **options):
    return Net(in_channels, num_classes, T, neuron, input_size)


register_surrogate("{name}_sg", lambda x, alpha: alpha / (1 + (alpha * x) ** 2))
'''


def write_plugin(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(BACKBONE.replace("{name}", name))
    return path


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``msgsnn ...`` in a fresh process: nothing this test process imported is there."""
    return subprocess.run([sys.executable, "-m", "msgcli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output, output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def tiny_args(tmp_path: Path) -> list[str]:
    return ["--set", "data.name=synthetic", "--set", "data.size=8", "--set", "T=2", "--set", "data.num_workers=0",
            "--set", "train.threads=1", "--set", f"data.cache_dir={tmp_path / 'cache'}", "--epochs", "1",
            "--batch-size", "8", "--limit-batches", "2", "--quiet"]


# ---------------------------------------------------------------- plugins


def test_a_plugin_trains_from_another_folder_and_its_run_evaluates_without_the_flag(tmp_path, monkeypatch):
    plugin = write_plugin(tmp_path / "my code", "plugged_net")
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    relative = os.path.relpath(plugin, elsewhere)  # ../my code/plugged_net.py
    result = CliRunner().invoke(app, ["train", "--plugin", relative, "--set", "model.name=plugged_net", "--out", "out",
                                      "--surrogate", "plugged_net_sg", "--set", "model.neuron.mask_fill=plugged_net_sg",
                                      "--set", "model.neuron.mask_mode=channel", "--name", "mine", *tiny_args(tmp_path)])
    assert result.exit_code == 0, result.output
    saved = config_io.load_yaml(elsewhere / "out" / "mine" / "config.yaml")
    assert saved["plugins"] == [str(plugin)]  # absolute: the run works from any folder
    assert saved["model"]["name"] == "plugged_net" and saved["model"]["neuron"]["surrogate"] == "plugged_net_sg"
    # the surrogate's name is valid only where the plugin is loaded: here, a fresh process without it
    done = cli("train", "--surrogate", "plugged_net_sg", "--out", str(tmp_path / "other"), cwd=tmp_path)
    assert done.returncode == 2 and "plugged_net_sg" in one_error_line(done.stdout + done.stderr)
    # a fresh process, another folder, no --plugin: the run's config.yaml brings the plugin back
    done = cli("eval", str(elsewhere / "out" / "mine"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((elsewhere / "out" / "mine" / "eval-best.json").read_text())
    assert report["T"] == 2 and len(report["test_acc_per_timestep"]) == 2
    # export too loads the plugin by itself (then refuses a backbone family it cannot walk, in one line)
    done = cli("export", str(elsewhere / "out" / "mine"), cwd=tmp_path)
    assert done.returncode == 1 and "model (Net): the NIR exporter knows" in one_error_line(done.stdout + done.stderr)
    # --resume in a fresh process continues the plugin's run from its saved config
    done = cli("train", "--out", str(elsewhere / "out"), "--name", "mine", "--resume", "--epochs", "2", "--quiet",
               cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((elsewhere / "out" / "mine" / "summary.json").read_text())["epochs"] == 2


def test_a_sweep_over_a_plugins_backbone_runs_two_jobs_at_once(tmp_path):
    plugin = write_plugin(tmp_path / "plugins", "swept_net")
    result = CliRunner().invoke(app, ["sweep", "--plugin", str(plugin), "--set", "model.name=swept_net",
                                      "--set", "model.neuron.surrogate=swept_net_sg",
                                      "--mask-p", "0,0.5", "--jobs", "2", "--lr", "0.02", "--out", str(tmp_path / "out"),
                                      "--name", "plugged", *[a for a in tiny_args(tmp_path) if a != "--quiet"]])
    assert result.exit_code == 0, result.output
    sweep = tmp_path / "out" / "sweeps" / "plugged"
    rows = list(csv.DictReader(open(sweep / "sweep.csv")))
    assert [row["status"] for row in rows] == ["finished", "finished"], rows
    for row in rows:
        cfg = config_io.load_yaml(sweep / row["run"] / "config.yaml")
        assert cfg["plugins"] == [str(plugin)] and cfg["optim"]["lr"] == 0.02
        assert cfg["model"]["neuron"]["surrogate"] == "swept_net_sg"
        assert pd.read_csv(sweep / row["run"] / "metrics.csv")["lr"][0] == pytest.approx(0.02)


def test_reproduce_adds_its_plugins_to_those_a_preset_names_beside_it(tmp_path):
    from msgcli.engine.reproduce import plan_reproduction

    named = write_plugin(tmp_path / "presets" / "code", "preset_net")
    added = write_plugin(tmp_path / "more", "added_net")
    preset = tmp_path / "presets" / "mine.yaml"
    preset.write_text("plugins: [code/preset_net.py]\nmodel: {name: preset_net}\ndata: {name: synthetic, size: 8}\nT: 2\n")
    plan = plan_reproduction([str(preset)], {}, 1, tmp_path / "out", [str(added)])
    assert plan.sweeps[0].points[0].config.plugins == [str(named), str(added)]  # the preset's, beside its file
    result = CliRunner().invoke(app, ["reproduce", str(preset), "--plugin", str(added), "--seeds", "1", "--report-only",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert f"--plugin={added}" in (tmp_path / "out" / "reproduce" / "mine" / "report.md").read_text()


def test_a_broken_plugin_stops_with_one_line_naming_it_and_its_error(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\n\nx = 1\nundefined_name + x\n")
    result = CliRunner().invoke(app, ["train", "--plugin", str(broken), "--epochs", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert str(broken) in line and "line 4" in line and "NameError" in line and "undefined_name" in line
    assert not (tmp_path / "out").exists()  # stopped before anything was written
    for command in (["eval", str(tmp_path)], ["sweep", "--mask-p", "0"], ["export", str(tmp_path)], ["reproduce", "fig5"]):
        result = CliRunner().invoke(app, [*command, "--plugin", "no_such_package.plugin"])
        assert result.exit_code == 2 and "no module named 'no_such_package'" in one_error_line(result.output), command


def test_a_plugin_file_that_does_not_exist_or_does_not_parse_is_one_line(tmp_path):
    with pytest.raises(plugin_io.PluginError, match=r"no such file"):
        plugin_io.load([str(tmp_path / "absent.py")])
    (tmp_path / "bad_syntax.py").write_text("def f(:\n")
    with pytest.raises(plugin_io.PluginError, match=r"bad_syntax.py, line 1\): SyntaxError"):
        plugin_io.load([str(tmp_path / "bad_syntax.py")])


def test_a_plugin_is_imported_once_per_process_and_a_second_registration_warns(tmp_path):
    plugin = write_plugin(tmp_path, "once_net")
    assert plugin_io.load([str(plugin), str(plugin)]) == [str(plugin)]
    plugin_io.load([str(plugin)])  # no second import: no warning
    with pytest.warns(RuntimeWarning, match="once_net.*already registered"):
        register_model(_renamed(lambda **kw: None, "once_net"))
    register_dataset("twice-data", lambda cfg: None)
    with pytest.warns(RuntimeWarning, match="twice-data.*already registered"):
        register_dataset("twice-data", lambda cfg: None)


def test_a_plugin_file_imports_the_modules_beside_it(tmp_path):
    (tmp_path / "sibling_layers_x1.py").write_text(BACKBONE.replace("@register_model", "").replace("{name}", "unused"))
    (tmp_path / "uses_sibling.py").write_text(
        "from msgcli import register_model\nfrom sibling_layers_x1 import Net\n\n\n@register_model\n"
        "def sibling_net(in_channels, num_classes, T, neuron, input_size=8, **options):\n"
        "    return Net(in_channels, num_classes, T, neuron, input_size)\n")
    plugin_io.load([str(tmp_path / "uses_sibling.py")])
    assert build_model("sibling_net", 2, 3, 2, input_size=8)(torch.rand(1, 2, 2, 8, 8)).shape == (2, 1, 3)


def test_a_plugin_files_dataset_loads_in_the_workers_a_rank_starts_from_a_fork_server(tmp_path):
    """A rank's loader workers do not inherit the plugin (they are not its forks): they unpickle its dataset,
    which names the plugin's module, and import that module from the file."""
    (tmp_path / "squares_data_x1.py").write_text(
        "import torch\n\n\nclass Squares(torch.utils.data.Dataset):\n"
        "    def __len__(self):\n        return 4\n\n"
        "    def __getitem__(self, index):\n        return index * index\n")
    [plugin] = plugin_io.load([str(tmp_path / "squares_data_x1.py")])
    squares = sys.modules[plugin_io.module_name(plugin)].Squares()
    with group_of_one():
        options = worker_processes(2)
        assert options["multiprocessing_context"].get_start_method() == "forkserver"
        batches = list(torch.utils.data.DataLoader(squares, batch_size=2, **options))
        squares.scale = lambda x: x  # a local function: it cannot be pickled
        with pytest.raises(UserError, match=r"^data: the dataset cannot be sent to the loader's worker processes, .*"
                                            r"Can't pickle local object.*--workers 0$"):
            start_loading(torch.utils.data.DataLoader(squares, batch_size=2, **options))
    assert [batch.tolist() for batch in batches] == [[0, 1], [4, 9]]


def _renamed(fn, name):
    fn.__name__ = name
    return fn


def test_installed_packages_register_through_the_entry_point_group(tmp_path, monkeypatch):
    package = tmp_path / "site"
    (package / "entry_net_pkg").mkdir(parents=True)
    (package / "entry_net_pkg" / "__init__.py").write_text(BACKBONE.replace("{name}", "entry_net"))
    dist = package / "entry_net_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: entry-net-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{plugin_io.ENTRY_POINT_GROUP}]\nentry_net = entry_net_pkg\n")
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.setattr(plugin_io, "_entry_points_loaded", False)
    cfg = config_io.from_dict({"model": {"name": "entry_net"}})  # validating any config loads them
    from msgcli.snn import list_models

    assert cfg.model.name == "entry_net" and "entry_net" in list_models()


def test_a_backbone_that_takes_options_ignores_the_ones_it_does_not_use():
    @register_model
    def lenient_net(in_channels, num_classes, T, neuron, input_size=8, **options):
        return build_model("vggsnn_tiny", in_channels, num_classes, T, input_size=input_size, **neuron)

    model = build_model("lenient_net", 2, 3, 2, input_size=8, bn_mode="joint", init="kaiming", stem="cifar", mask_p=0.3)
    assert model(torch.rand(1, 2, 2, 8, 8)).shape == (2, 1, 3)
    with pytest.raises(ValueError, match="unknown option.*stem.*takes \\*\\*options"):
        build_model("vggsnn", 2, 3, 2, stem="cifar")


def test_an_unknown_backbone_is_one_config_error_line(tmp_path):
    result = CliRunner().invoke(app, ["train", "--set", "model.name=no_such_net", "--out", str(tmp_path / "out"),
                                      *tiny_args(tmp_path)])
    assert result.exit_code == 2 and "error: model name: unknown 'no_such_net'" in result.output, result.output


# ---------------------------------------------------------------- event-folder


def sample_events(n: int, seed: int, size: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.integers(0, size, n), "y": rng.integers(0, size, n), "t": np.sort(rng.integers(0, 10_000, n)),
            "p": rng.integers(0, 2, n)}


def write_events(path: Path, events: dict[str, np.ndarray], kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    x, y, t, p = (events[f] for f in ("x", "y", "t", "p"))
    if kind == "npy":
        table = np.empty(len(t), dtype=[("x", "<i2"), ("y", "<i2"), ("t", "<i8"), ("p", "?")])
        table["x"], table["y"], table["t"], table["p"] = x, y, t, p
        np.save(path, table)
    elif kind == "npz":
        np.savez(path, x=x, y=y, t=t, p=p)
    elif kind == "aedat4":
        formats.write_aedat4(path, x, y, t, p, width=12, height=12)
    else:
        import h5py

        with h5py.File(path, "w") as fh:
            if kind == "h5":
                for f in ("x", "y", "t", "p"):
                    fh[f] = events[f]
            elif kind == "h5-group":
                for f in ("x", "y", "t", "p"):
                    fh[f"events/{f}"] = events[f]
            else:
                table = np.empty(len(t), dtype=[("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "i1")])
                table["x"], table["y"], table["t"], table["p"] = x, y, t, 2 * p - 1  # polarities -1/1
                fh["events"] = table


SUFFIX = {"npy": ".npy", "npz": ".npz", "aedat4": ".aedat4", "h5": ".h5", "h5-group": ".hdf5", "h5-table": ".h5"}


def event_folder(root: Path, kind: str, split: bool, per_class: int = 4) -> dict[str, dict]:
    """Two classes; ``split``: train/ and test/ folders, else class folders only. Returns the events by file."""
    written = {}
    for label in ("left", "right"):
        for i in range(per_class):
            part = ("train" if i < per_class - 1 else "test") if split else ""
            path = root / part / label / f"{i:02d}{SUFFIX[kind]}"
            written[str(path)] = sample_events(30 + i, seed=hash((label, i)) % 1000)
            write_events(path, written[str(path)], kind)
    return written


@pytest.mark.parametrize("kind", list(SUFFIX))
def test_each_event_folder_file_format_trains(kind, tmp_path):
    root = tmp_path / "recordings"
    event_folder(root, kind, split=kind != "npz")
    result = CliRunner().invoke(app, ["train", "--set", "data.name=event-folder", "--data-root", str(root),
                                      "--set", "data.train_fraction=0.75",
                                      "--set", f"data.cache_dir={tmp_path / 'cache'}", "--out", str(tmp_path / "out"),
                                      "--quiet", *TINY_FOLDER_RUN])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "digits-dvs" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["dataset"] == "event-folder"


def test_every_format_gives_the_same_frames_as_the_events_framed_directly(tmp_path):
    from msgcli.data.clips import frame_spec
    from msgcli.data.frames import events_to_frames
    from msgcli.data.folders import read_events

    clips = {}
    for kind in SUFFIX:
        written = event_folder(tmp_path / kind, kind, split=True)
        cfg = tiny_config(tmp_path, data__name="event-folder", data__root=str(tmp_path / kind), data__size=12,
                          data__sensor_size=[12, 12], T=3)
        bundle = build_datasets(cfg, progress=False)
        assert bundle.info.classes == ["left", "right"] and (bundle.info.n_train, bundle.info.n_test) == (6, 2)
        clips[kind] = bundle.test.frames
        first_test = sorted(p for p in written if "/test/" in p)[0]
        expected = events_to_frames(read_events(first_test), frame_spec(cfg, (12, 12, 2)), first_test)
        assert np.array_equal(np.asarray(bundle.test.frames[0], dtype=np.float32), expected), kind
    for kind in SUFFIX:
        assert np.array_equal(clips[kind], clips["npy"]), kind


def test_the_sensor_size_is_the_recordings_extent_unless_configured(tmp_path):
    root = tmp_path / "rec"
    event_folder(root, "npy", split=False)
    largest = max(int(np.load(p)["x"].max()) for p in root.rglob("*.npy")), max(int(np.load(p)["y"].max()) for p in root.rglob("*.npy"))
    cfg = tiny_config(tmp_path, data__name="event-folder", data__root=str(root), data__train_fraction=0.75)
    assert build_datasets(cfg, progress=False).info.sensor_size == (largest[0] + 1, largest[1] + 1, 2)
    cfg = config_io.apply_overrides(cfg, {"data.sensor_size": "[34, 34]"})
    info = build_datasets(cfg, progress=False).info
    assert info.sensor_size == (34, 34, 2) and (info.n_train, info.n_test) == (6, 2)  # 3 of each class's 4 train
    with pytest.raises(config_io.ConfigError, match="data.sensor_size"):
        tiny_config(tmp_path, data__sensor_size="[34]")


def test_the_frame_cache_is_keyed_by_every_files_size_and_time(tmp_path):
    root = tmp_path / "rec"
    written = event_folder(root, "npz", split=True)
    cfg = tiny_config(tmp_path, data__name="event-folder", data__root=str(root), data__sensor_size=[12, 12])
    build_datasets(cfg, progress=False)
    before = sorted((tmp_path / "cache").glob("event-folder-*.npy"))
    build_datasets(cfg, progress=False)
    assert sorted((tmp_path / "cache").glob("event-folder-*.npy")) == before  # read from the cache
    changed = sorted(p for p in written if "/train/" in p)[0]
    write_events(Path(changed), sample_events(50, seed=99), "npz")
    build_datasets(cfg, progress=False)
    assert len(sorted((tmp_path / "cache").glob("event-folder-train-*.npy"))) == 2  # the train split rebuilt


def test_a_wrong_format_file_and_missing_fields_each_end_in_one_line(tmp_path):
    root = tmp_path / "rec"
    event_folder(root, "npy", split=True)
    (root / "train" / "left" / "notes.txt").write_text("not events")
    args = ["train", "--set", "data.name=event-folder", "--data-root", str(root), "--set",
            f"data.cache_dir={tmp_path / 'cache'}", "--out", str(tmp_path / "out"), "--quiet", *TINY_FOLDER_RUN]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    line = one_error_line(result.output)
    assert str(root / "train" / "left" / "notes.txt") in line and "not an event file" in line
    # --skip-bad-samples leaves it out
    assert CliRunner().invoke(app, [*args, "--skip-bad-samples", "--overwrite"]).exit_code == 0
    (root / "train" / "left" / "notes.txt").unlink()
    plain = root / "train" / "right" / "00.npy"
    np.save(plain, np.zeros((5, 4), dtype=np.int64))  # DVS-Gesture's (N, 4) layout: no field names
    result = CliRunner().invoke(app, [*args, "--overwrite"])
    line = one_error_line(result.output)
    assert result.exit_code == 1 and str(plain) in line and "structured array with fields x, y, t, p" in line
    np.savez(root / "train" / "right" / "00.npz", x=[1], y=[1], t=[1])
    plain.unlink()
    result = CliRunner().invoke(app, [*args, "--overwrite"])
    assert "00.npz: the archive has no p" in one_error_line(result.output)


def test_a_missing_event_folder_names_the_layout(tmp_path):
    result = CliRunner().invoke(app, ["train", "--set", "data.name=event-folder", "--data-root",
                                                      str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    line = one_error_line(result.output)
    assert result.exit_code == 2 and str(tmp_path / "nothing") in line and "train/<class>/" in line


# ---------------------------------------------------------------- a dataset plugin


DATASET_PLUGIN = '''
import numpy as np
from pathlib import Path
from msgcli import EventFiles, register_dataset
from msgcli.data import resolve_root
from msgcli.errors import DatasetMissing


def read_csv(path):
    x, y, t, p = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2).T
    events = np.empty(len(t), dtype=[("x", "<i2"), ("y", "<i2"), ("t", "<i8"), ("p", "?")])
    events["x"], events["y"], events["t"], events["p"] = x, y, t, p
    return events


def build(cfg):
    root = resolve_root(cfg.data.root)
    files = sorted(root.glob("*.csv"))
    if not files:
        raise DatasetMissing(f"csv-events: no *.csv under {root}")
    pairs = [(f, int(f.stem.split("_")[0])) for f in files]
    return EventFiles(["zero", "one"], pairs[::2], pairs[1::2], read_csv, sensor_size=(8, 8, 2))


register_dataset("csv-events", build)
'''


def test_a_plugin_dataset_of_event_files_is_framed_cached_and_trained(tmp_path):
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "csv_events.py").write_text(DATASET_PLUGIN)
    data = tmp_path / "csv"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        rows = np.column_stack([rng.integers(0, 8, 20), rng.integers(0, 8, 20), np.arange(20), rng.integers(0, 2, 20)])
        np.savetxt(data / f"{i % 2}_{i}.csv", rows, fmt="%d", delimiter=",")
    args = ["train", "--plugin", str(tmp_path / "plugin" / "csv_events.py"), "--set", "data.name=csv-events",
            "--data-root", str(data), "--set", f"data.cache_dir={tmp_path / 'cache'}", "--out", str(tmp_path / "out"),
            "--quiet", *TINY_FOLDER_RUN]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "cache").glob("csv-events-*.npy"))) == 2  # train and test frames cached
    result = CliRunner().invoke(app, [*args, "--data-root", str(tmp_path / "empty"), "--overwrite"])
    assert result.exit_code == 2 and "csv-events: no *.csv under" in one_error_line(result.output)


# ---------------------------------------------------------------- image-folder


def image_folder(root: Path, split: bool) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, colour in (("red", 0), ("blue", 2)):
        for i in range(5):
            part = ("train" if i < 4 else "test") if split else ""
            pixels = rng.integers(0, 60, (10, 12, 3), dtype=np.uint8)
            pixels[..., colour] = 200
            (root / part / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / part / label / f"{i}.png")


@pytest.mark.parametrize("split", [True, False])
def test_an_image_folder_trains_directly_encoded(split, tmp_path):
    root = tmp_path / "images"
    image_folder(root, split)
    cfg = tiny_config(tmp_path, data__name="image-folder", data__root=str(root), data__size=8)
    bundle = build_datasets(cfg, progress=False)
    image, label = bundle.test[0]
    assert image.shape == (3, 8, 8) and bundle.info.in_channels == 3 and bundle.info.classes == ["blue", "red"]
    assert (bundle.info.n_train, bundle.info.n_test) == ((8, 2) if split else (8, 2))
    result = train(cfg, tmp_path / "out", progress=False)
    assert result.summary["status"] == "finished"


# ---------------------------------------------------------------- validation split


def test_a_validation_split_holds_out_each_class_and_chooses_best_pt(tmp_path):
    cfg = tiny_config(tmp_path, data__val_fraction=0.25, train__epochs=3, train__limit_batches=0)
    bundle = build_datasets(cfg, progress=False)
    full = build_datasets(tiny_config(tmp_path), progress=False)
    counts = np.bincount(np.asarray(full.train.targets))
    assert np.array_equal(np.bincount(bundle.val.targets), counts - np.round(0.75 * counts).astype(int))
    assert set(bundle.train.indices).isdisjoint(bundle.val.indices)
    assert bundle.info.n_train + bundle.info.n_val == len(full.train)
    assert bundle.val.dataset.augment is None  # validation clips are not augmented
    result = train(cfg, tmp_path / "out", progress=False)
    metrics = pd.read_csv(result.run.path / "metrics.csv")
    best = int(metrics["val_acc"].idxmax())
    summary = result.summary
    assert summary["best_val_acc"] == pytest.approx(metrics["val_acc"][best])
    assert summary["test_acc_at_best_val"] == pytest.approx(metrics["test_acc"][best])
    assert summary["best_test_acc"] == pytest.approx(metrics["test_acc"].max())
    assert checkpoint.load(result.run.best)["epoch"] == best + 1
    row = next(csv.DictReader(open(tmp_path / "out" / "runs.csv")))
    assert float(row["best_val_acc"]) == pytest.approx(summary["best_val_acc"])
    assert float(row["test_acc_at_best_val"]) == pytest.approx(summary["test_acc_at_best_val"])


def test_without_a_validation_split_best_pt_follows_the_test_set_and_old_runs_csv_gain_the_columns(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "runs.csv").write_text("status,name\nfinished,old-run\n")  # written by an older msgsnn
    result = train(tiny_config(tmp_path, train__epochs=3), tmp_path / "out", progress=False)
    metrics = pd.read_csv(result.run.path / "metrics.csv")
    assert "val_acc" not in metrics and result.summary["best_val_acc"] is None
    assert checkpoint.load(result.run.best)["epoch"] == int(metrics["test_acc"].idxmax()) + 1
    rows = list(csv.DictReader(open(tmp_path / "out" / "runs.csv")))
    assert [r["name"] for r in rows] == ["old-run", "digits-dvs"] and "test_acc_at_best_val" in rows[1]


def test_analyze_table_and_the_reproduce_report_show_the_validation_columns(tmp_path):
    from msgcli.analysis import runs, stats

    for seed in (1, 2):
        train(tiny_config(tmp_path, data__val_fraction=0.25, train__seed=seed, name=f"s{seed}"), tmp_path / "out",
              progress=False)
    found, _ = runs.collect_runs([tmp_path / "out" / "s1", tmp_path / "out" / "s2"])
    report = stats.table_report(found, "best", tmp_path / "figures")
    assert {"best val", "test at best val"} <= set(report.table.columns)
    values = [json.loads((tmp_path / "out" / f"s{s}" / "summary.json").read_text())["best_val_acc"] for s in (1, 2)]
    assert report.table["best val"][0] == stats.mean_std(np.mean(values), np.std(values, ddof=1))


# ---------------------------------------------------------------- eval at another T, analyze timesteps


def test_eval_at_another_T_runs_the_same_weights_for_T_steps(tmp_path):
    root = tmp_path / "images"
    image_folder(root, split=True)
    cfg = tiny_config(tmp_path, data__name="image-folder", data__root=str(root), data__size=8, T=4)
    run = train(cfg, tmp_path / "out", progress=False).run
    four, two4 = trained_model(run.best, cfg)
    eight, two8 = trained_model(run.best, cfg, T=8)
    four.eval(), eight.eval()
    images = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        short, long = four(images), eight(images)
    assert long.shape == (8, 3, 2)
    torch.testing.assert_close(long[:4], short)  # no state carried between calls: the first 4 steps are the same
    assert not two8.enabled and two8.T == 8  # TWO's factors are per trained timestep: the mean decodes
    result = CliRunner().invoke(app, ["eval", str(run.path), "--T", "8"])
    assert result.exit_code == 0, result.output
    report = json.loads((run.path / "eval-best-T8.json").read_text())
    assert report["T"] == 8 and len(report["test_acc_per_timestep"]) == 8
    result = CliRunner().invoke(app, ["analyze", "timesteps", str(run.path), "--T", "1,4,8"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(run.path / "figures" / "timesteps.csv")
    assert list(table["T"]) == [1, 4, 8] and list(table["decoded_by"]) == ["mean over time", "TWO", "mean over time"]
    assert table["test_acc"][2] == pytest.approx(report["test_acc"])
    assert (run.path / "figures" / "timesteps.png").exists()
    from msgcli.analysis.timesteps import default_timesteps

    assert default_timesteps(6) == [1, 2, 4, 6, 8, 12] and default_timesteps(4) == [1, 2, 4, 8]


def test_eval_at_another_T_reframes_event_data(tmp_path):
    cfg = tiny_config(tmp_path)
    run = train(cfg, tmp_path / "out", progress=False).run
    result = CliRunner().invoke(app, ["eval", str(run.path), "--T", "6"])
    assert result.exit_code == 0, result.output
    assert json.loads((run.path / "eval-best-T6.json").read_text())["T"] == 6
    result = CliRunner().invoke(app, ["eval", str(run.path), "--T", "0"])
    assert result.exit_code != 0 and "Traceback" not in result.output


# ---------------------------------------------------------------- the examples folder


def test_the_examples_write_an_event_folder_train_sweep_and_evaluate(tmp_path):
    """examples/: the numpy writer, the plugin and the preset, run as the README's "Extending msgsnn" runs them."""
    done = subprocess.run([sys.executable, str(EXAMPLES / "make_event_folder.py"), "my-events"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "my-events").rglob("*.npy"))) == 120
    common = ["--plugin", str(EXAMPLES / "plugin.py"), "--preset", str(EXAMPLES / "my-events.yaml"),
              "--data-root", str(tmp_path / "my-events"), "--set", f"data.cache_dir={tmp_path / 'cache'}",
              "--set", "data.num_workers=0", "--set", "train.threads=1", "--epochs", "2", "--out", str(tmp_path / "results")]
    result = CliRunner().invoke(app, ["train", *common, "--name", "my-snn", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "results" / "my-snn" / "summary.json").read_text())
    assert summary["model"] == "tiny_snn" and summary["surrogate"] == "triangle" and summary["best_val_acc"] is not None
    result = CliRunner().invoke(app, ["sweep", *common, "--mask-p", "0,0.5", "--jobs", "2", "--limit-batches", "2"])
    assert result.exit_code == 0, result.output
    done = cli("eval", str(tmp_path / "results" / "my-snn"), "--T", "3", cwd=tmp_path)  # no --plugin
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "results" / "my-snn" / "eval-best-T3.json").read_text())["T"] == 3


def test_the_readme_documents_extending_msgsnn_with_the_names_it_uses():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Extending msgsnn", 1)[1].split("\n## ", 1)[0]
    smoke = load_script(".ci/smoke.py")  # CI runs the section as a user does: in a folder of their own
    steps = [smoke.plan(s, c, cuda=False) for s, c in smoke.readme_commands(readme) if s == "Extending msgsnn"]
    assert [step.args[:2] for step in steps] == [[sys.executable, str(EXAMPLES / "make_event_folder.py")],
                                                 ["msgsnn", "train"], ["msgsnn", "eval"], ["msgsnn", "analyze"],
                                                 ["msgsnn", "sweep"]]
    assert all(step.cwd is None and step.expect == "ok" for step in steps)
    assert str(EXAMPLES / "plugin.py") in steps[1].args and steps[1].args[-2:] == ["--limit-batches", "3"]
    for name in ("--plugin", "plugins:", "msgsnn.plugins", "register_model", "register_surrogate", "register_dataset", "EventFiles",
                 "event-folder", "image-folder", "data.train_fraction", "data.sensor_size", "data.val_fraction",
                 "best_val_acc", "test_acc_at_best_val", "--T", "analyze timesteps", "--lr", "examples/plugin.py"):
        assert name in section, name

"""`msgsnn export --format nir`: the file, read back and run by snnTorch's NIR importer, gives msgsnn's spikes and logits."""

from __future__ import annotations

import contextlib
import copy
import io
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from msgcli import config as config_io
from msgcli.cli import app
from msgcli.data import build_datasets
from msgcli.engine.build import build_model_from_config, build_two, spiking_layers, trained_model
from msgcli.export.nir import NotExportable, output_weights, to_nir
from msgcli.snn import TWO, build_model
from msgcli.snn.layers import Folded
from tests.conftest import tiny_cli_args, tiny_config

nir = pytest.importorskip("nir")
snntorch = pytest.importorskip("snntorch")
from snntorch.import_nir import import_from_nir  # noqa: E402  (after the skip)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def msgsnn_outputs(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eval-mode logits [T, B, K] and every spiking layer's spikes [T, B, ...]."""
    spikes: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda m, i, out, name=name: spikes.__setitem__(name, out))
               for name, m in spiking_layers(model).items()]
    model.eval()
    with torch.no_grad():
        logits = model(inputs)
    for handle in handles:
        handle.remove()
    return logits, spikes


@contextlib.contextmanager
def float64_by_default():
    """snnTorch's neurons make their state in the default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def imported_outputs(graph, frames: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """snnTorch's import of ``graph`` stepped through ``frames`` [T, B, C, H, W], one sample at a time (NIR
    shapes have no batch axis: its Flatten would flatten a batch too), membranes cleared between samples."""
    with contextlib.redirect_stdout(io.StringIO()), float64_by_default():  # it prints a warning per LIF
        net = import_from_nir(graph).double()                                # about the threshold it rescales
    neurons = {name: m for name, m in net.named_modules() if isinstance(m, snntorch.Leaky)}
    for m in net.modules():  # its spikes come out as float32 (exactly 0 or 1): widen them for the next layer
        if not isinstance(m, snntorch.Leaky):
            m.register_forward_pre_hook(lambda m, args: tuple(a.double() if torch.is_tensor(a) and a.is_floating_point()
                                                              else a for a in args))
    steps: dict[str, list] = {name: [] for name in neurons}
    for name, m in neurons.items():
        m.register_forward_hook(lambda m, i, out, name=name: steps[name].append(out))
    T, B = frames.shape[:2]
    logits = []
    with torch.no_grad(), float64_by_default():
        for b in range(B):
            for m in neurons.values():
                m.reset_mem()
            logits.append(torch.stack([net(frames[t, b].double())[0] for t in range(T)]))
    spikes = {name: torch.stack(v).view(B, T, *v[0].shape).transpose(0, 1) for name, v in steps.items()}
    return torch.stack(logits, 1), spikes


def assert_same_network(model: nn.Module, graph, frames: torch.Tensor) -> dict[str, torch.Tensor]:
    """Spikes equal at every layer and timestep, logits equal to float tolerance; returns msgsnn's spikes.

    Both networks run in float64: the BatchNorm folded into the weights and snnTorch's rescaled threshold
    round differently from msgcli in float32, which flips the odd membrane sitting on the threshold."""
    logits, spikes = msgsnn_outputs(copy.deepcopy(model).double(), frames.transpose(0, 1).double())
    their_logits, their_spikes = imported_outputs(graph, frames)
    assert set(their_spikes) == {name.replace(".", "_") for name in spikes}  # nirtorch writes '.' as '_'
    for name, s in spikes.items():
        assert torch.equal(their_spikes[name.replace(".", "_")].double(), s), name
    torch.testing.assert_close(their_logits, logits, rtol=0, atol=1e-5)
    return spikes


@pytest.mark.slow
def test_exported_run_reproduces_msgsnn_spikes_logits_and_two_decoding(tmp_path):
    out = tmp_path / "out"
    result = invoke("train", *tiny_cli_args(tmp_path), "--set", "train.limit_batches=10", "--epochs", "1",
                    "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    run = out / "digits-dvs"
    result = invoke("export", run, "--checkpoint", "last", "--format", "nir", "-o", tmp_path / "tiny.nir")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "3 LIF" in result.output and "dt = 0.0001 s" in result.output
    assert "class scores = sum over t of w[t] * output[t]" in result.output

    graph = nir.read(tmp_path / "tiny.nir")
    cfg = tiny_config(tmp_path)
    model, two = trained_model(run / "checkpoints" / "last.pt", cfg)
    lif = graph.nodes["features.0.2"]
    assert isinstance(lif, nir.LIF) and lif.tau.shape == (32, 16, 16)
    assert (lif.tau == 2.0 * 1e-4).all() and (lif.r == 1).all() and (lif.v_leak == 0).all() and (lif.v_reset == 0).all()
    assert (lif.v_threshold == 0.5).all() and float(graph.metadata["dt"]) == 1e-4
    assert {type(n).__name__ for n in graph.nodes.values()} == {"Input", "Conv2d", "LIF", "AvgPool2d", "Flatten", "Affine", "Output"}

    test_set = build_datasets(cfg, progress=False).test
    clips = torch.stack([test_set[i][0] for i in range(len(test_set))])  # [B, T, C, H, W], all 12 test clips
    spikes = assert_same_network(model, graph, clips.transpose(0, 1))
    assert all(s.sum() > 0 for s in spikes.values())  # every layer spikes, so the comparison means something

    # TWO: its factors moved after the first epoch (warm-up 0); the metadata's weights decode as msgsnn does
    weights = torch.as_tensor(graph.metadata["output_weights"], dtype=torch.float32)
    assert not torch.allclose(weights, torch.full_like(weights, 1 / 4))
    their_logits, _ = imported_outputs(graph, clips.transpose(0, 1))
    logits, _ = msgsnn_outputs(model, clips)
    torch.testing.assert_close(torch.einsum("t,tbk->bk", weights, their_logits.float()), two(logits), rtol=0, atol=1e-5)


def randomise_batchnorm(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from 0 and 1: they must fold in, and membranes then sit on
    no exact multiple of the spikes' averages (msgsnn fires at V >= V_th, snnTorch at V > V_th: a tie differs)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.3)
    return model


@pytest.mark.parametrize("name", ["resnet18", "sew_resnet18"])
def test_residual_sums_export_as_fan_in(name):
    """BasicBlock's pre-spike sum and SEW's sum of spikes become edges entering one node; BatchNorms with
    non-trivial running statistics fold into their convolutions."""
    torch.manual_seed(0)
    model = randomise_batchnorm(build_model(name, 3, 5, 2, stem="cifar"))
    graph = to_nir(model, TWO(2), (3, 8, 8))
    into = lambda node: [a for a, b in graph.edges if b == node]  # noqa: E731
    if name == "resnet18":  # conv branch + identity shortcut, then conv branch + 1x1 conv shortcut
        assert into("stages.0.spike") == ["stages.0.branch.3", "stem.2"]
        assert into("stages.2.spike") == ["stages.2.branch.3", "stages.2.shortcut.0"]
    else:  # the next block's conv reads the sum of both spike trains
        assert into("stages.1.branch.0") == ["stages.0.branch.5", "stem.2"]
    images = torch.rand(2, 3, 8, 8) * 2
    assert_same_network(model, graph, images.expand(2, *images.shape))


def test_an_average_pooled_imagenet_stem_exports_with_its_padding():
    """The 7x7/2 conv, then AvgPool2d(3, 2, padding 1) counting the padding as torch does (ResNet18's default
    stem, as the release builds it): same spikes and logits."""
    torch.manual_seed(0)
    model = randomise_batchnorm(build_model("resnet18", 3, 5, 2, stem="imagenet"))
    assert isinstance(model.stem[3].module, nn.AvgPool2d)
    graph = to_nir(model, TWO(2), (3, 16, 16))
    assert list(graph.nodes["stem.3"].padding) == [1, 1]
    images = torch.rand(2, 3, 16, 16) * 2
    assert_same_network(model, graph, images.expand(2, *images.shape))


@pytest.mark.parametrize("name, options, size", [("vggsnn", {"input_size": 16}, 16), ("cifarnet", {}, 8),
                                                ("sew_resnet34", {"stem": "cifar"}, 8)])
def test_the_readmes_other_backbones_export(name, options, size):
    model = build_model(name, 3, 5, 2, **options).eval()
    graph = to_nir(model, TWO(2), (3, size, size))
    assert [n for n, node in graph.nodes.items() if isinstance(node, nir.LIF)] == list(spiking_layers(model))
    assert list(graph.output_type["output"]) == [5]


def test_two_weights_decode_as_the_decoder():
    logits = torch.randn(3, 5, 4, dtype=torch.float64)
    for two in (TWO(3), TWO(3, rule="paper"), TWO(3, enabled=False)):
        two.factors.copy_(torch.tensor([0.9, 1.3, 0.8]) if two.rule == "release" else torch.tensor([0.2, 0.5, 0.3]))
        decoded = torch.einsum("t,tbk->bk", torch.as_tensor(output_weights(two)), logits)
        torch.testing.assert_close(decoded, two(logits))


def test_what_nir_cannot_express_is_refused_naming_the_layer(tmp_path):
    model = build_model("vggsnn_tiny", 2, 4, 4, input_size=16)
    model.features[1] = Folded(nn.MaxPool2d(2))
    with pytest.raises(NotExportable, match=r"^features\.1 \(MaxPool2d\): NIR has no max pooling"):
        to_nir(model, TWO(4), (2, 16, 16))
    soft = build_model("vggsnn_tiny", 2, 4, 4, input_size=16, reset="soft")
    with pytest.raises(NotExportable, match=r"^features\.0\.2 \(LIF, reset=soft\)"):
        to_nir(soft, TWO(4), (2, 16, 16))


def one_line_failure(result, message: str) -> None:
    assert result.exit_code != 0, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output


def test_export_errors_are_one_line(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, **{"model.neuron.reset": "soft"})
    run = tmp_path / "soft"
    (run / "checkpoints").mkdir(parents=True)
    config_io.save(cfg, run / "config.yaml")
    torch.save({"model": build_model_from_config(cfg, 2, 4).state_dict(), "two": build_two(cfg).state_dict()},
               run / "checkpoints" / "best.pt")
    one_line_failure(invoke("export", run), "features.0.2 (LIF, reset=soft)")
    one_line_failure(invoke("export", run, "--format", "onnx"), "--format: 'onnx' is not allowed")
    one_line_failure(invoke("export", run, "--checkpoint", "last"), "no checkpoint at")
    one_line_failure(invoke("export", tmp_path), "is not a run directory")
    one_line_failure(invoke("export", run, "--dt", "0"), "--dt: must be a positive number")
    monkeypatch.setitem(sys.modules, "nir", None)  # as if msgsnn[nir] were not installed
    one_line_failure(invoke("export", run), "needs the nir package, an optional extra of msgsnn: pip install nir")
    assert not list(run.glob("*.nir*"))


def test_dt_sets_the_time_constants_and_the_graph_states_its_shapes():
    model = build_model("vggsnn_tiny", 2, 4, 4, input_size=16)
    graph = to_nir(model, TWO(4), (2, 16, 16), dt=1e-3)
    assert list(graph.nodes["input"].input_type["input"]) == [2, 16, 16]
    assert list(graph.nodes["output"].output_type["output"]) == [4]
    assert (graph.nodes["features.0.2"].tau == 2e-3).all() and graph.metadata["dt"] == 1e-3

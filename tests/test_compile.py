"""``torch.compile`` support (issue 24): the spiking layers as torch operators, one graph per backbone, and a
compiled run that writes the numbers of an uncompiled one.

Compiling with inductor on the CPU takes about a minute for the smallest network on a busy 2-core
machine, so the run-level comparison compiles with ``backend="aot_eager"``: the same Dynamo graph,
the same AOT autograd forward and backward graphs and the same operators, without inductor's code
generation (``benchmarks/step.py --compile`` measures inductor itself).
"""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from torch import nn

from msgcli.cli.common import flag_overrides
from msgcli.engine import build as engine_build
from msgcli.engine.build import build_optimizer, trained_model
from msgcli.engine.train import train
from msgcli.snn import LIF, build_model, list_models
from msgcli.snn.layers import Folded, TemporalBatchNorm
from tests.conftest import tiny_config

BACKBONES = ["vggsnn", "vggsnn_tiny", "cifarnet", "resnet18", "sew_resnet18", "sew_resnet34"]
IMAGE_BACKBONES = {"cifarnet", "sew_resnet18", "sew_resnet34"}  # fed images: the direct-encoding path


def _backbone(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    channels = 3 if name in IMAGE_BACKBONES else 2
    model = build_model(name, in_channels=channels, num_classes=10, T=2, input_size=16, mask_p=0.5)
    x = torch.rand(2, channels, 16, 16) if name in IMAGE_BACKBONES else torch.rand(2, 2, channels, 16, 16)
    return model, x


def test_the_backbones_tested_are_every_registered_one():
    assert sorted(BACKBONES) == list_models()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_is_one_graph_without_breaks(name, mode):
    model, x = _backbone(name)
    model.train(mode == "train")
    explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def _unit(**neuron) -> nn.Module:
    conv = nn.Conv2d(2, 6, 3, padding=1, bias=False)
    return nn.Sequential(Folded(conv), TemporalBatchNorm(6), LIF(**neuron), Folded(nn.Conv2d(6, 4, 3, padding=1)),
                         TemporalBatchNorm(4), LIF(**neuron))


@pytest.mark.parametrize("neuron", [dict(mask_p=0.5), dict(mask_p=0.3, mask_mode="channel", reset="soft"),
                                    dict(mask_p=0.0, surrogate="arctan")])
def test_a_compiled_unit_draws_the_masks_of_eager_code(neuron):
    """The same seed gives the same spikes, input gradient and weight gradients compiled and eager: the MSG mask
    is drawn inside the backward operator, from the generator eager code draws it from."""
    torch.manual_seed(0)
    eager = _unit(**neuron)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 4, 2, 6, 6) + 0.5
    upstream = torch.randn(3, 4, 4, 6, 6)
    results = []
    for net in (eager, compiled):
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)
        out = net(xi)
        out.backward(upstream)
        after = torch.rand(3)  # the generator is left where eager code leaves it
        results.append((out.detach(), xi.grad, [p.grad for p in net.parameters()], after))
    (o1, g1, w1, a1), (o2, g2, w2, a2) = results
    assert torch.equal(o1, o2) and torch.equal(a1, a2)
    assert g1.abs().sum() > 0
    torch.testing.assert_close(g2, g1, rtol=0, atol=0)
    for p1, p2 in zip(w1, w2):
        torch.testing.assert_close(p2, p1, rtol=1e-6, atol=1e-6)
    for b1, b2 in zip(eager.buffers(), compiled_module.buffers()):
        torch.testing.assert_close(b2, b1, rtol=1e-6, atol=1e-6)


def test_the_operators_pass_torch_library_checks():
    """Schema, fake (meta) shapes and strides, and registered autograd, as torch.library.opcheck sees them."""
    x = (torch.randn(3, 2, 4, 5, 5, dtype=torch.float64) + 0.5).requires_grad_()
    channels_last = x.detach().flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)
    for current in (x, channels_last.requires_grad_()):
        torch.library.opcheck(torch.ops.msgcli.lif, (current, "cpu", 2.0, 0.5, "hard", False, "piecewise_linear", 2.0,
                                                     0.0, "element", "zero", False, True))
        weight = torch.rand(4, dtype=torch.float64, requires_grad=True)
        bias = torch.rand(4, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(torch.ops.msgcli.batch_norm_per_step, (current, weight, bias, 1e-5, False, "cpu"))


def test_the_direct_encoding_convolution_runs_once_for_every_timestep():
    torch.manual_seed(0)
    model = build_model("vggsnn_tiny", in_channels=3, num_classes=10, T=4, input_size=16).double()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    batches = []
    first.register_forward_hook(lambda module, inputs, output: batches.append(inputs[0].shape[0]))
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    out = model(images)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert batches == [2]  # B images, not T*B frames
    model.zero_grad()
    repeated = model.forward_time(images.unsqueeze(0).expand(4, *images.shape).contiguous())  # T*B frames
    repeated.square().sum().backward()
    assert batches == [2, 8]
    torch.testing.assert_close(out, repeated, rtol=0, atol=1e-12)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


def test_compile_flag_sets_train_compile():
    assert flag_overrides(compile=True) == {"train.compile": True}


def test_adamw_is_fused_only_for_cuda_parameters(tmp_path):
    cfg = tiny_config(tmp_path)
    assert not build_optimizer(cfg, [nn.Parameter(torch.zeros(2))]).defaults["fused"]
    if torch.cuda.is_available():
        assert build_optimizer(cfg, [nn.Parameter(torch.zeros(2, device="cuda"))]).defaults["fused"]


def test_a_compiled_run_writes_the_metrics_of_an_uncompiled_one(tmp_path, monkeypatch):
    """A short digits-dvs run, compiled (``train.compile``) and not: metrics.csv equal within float rounding, and
    a checkpoint an uncompiled model loads (no ``_orig_mod.`` prefixes)."""
    modes = []
    real_compile = torch.compile

    def aot_eager(model, mode=None):
        modes.append(mode)
        return real_compile(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", aot_eager)
    metrics = []
    for compiled in (False, True):
        cfg = tiny_config(tmp_path, **{"data.name": "digits-dvs", "train.compile": compiled, "name": f"compile-{compiled}",
                                       "train.limit_batches": 2, "train.epochs": 2})
        result = train(cfg, tmp_path / "out", progress=False)
        metrics.append(pd.read_csv(result.run.path / "metrics.csv").drop(columns="epoch_seconds"))
    assert modes == [None]  # the CPU's default mode
    assert list(metrics[0].columns) == list(metrics[1].columns)
    pd.testing.assert_frame_equal(metrics[0], metrics[1], rtol=1e-5, atol=1e-6)
    assert metrics[0]["train_loss"].nunique() == 2  # it trained
    last = result.run.path / "checkpoints" / "last.pt"
    model, _ = trained_model(last, cfg)
    assert not any(key.startswith("_orig_mod") for key in torch.load(last, weights_only=False)["model"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), result.model.state_dict().values()))


def test_a_compiled_evaluation_runs_the_last_smaller_batch_eagerly(tmp_path):
    """Shapes stay static for CUDA graphs: the compiled model sees only full batches, the last one runs eagerly,
    and the result is the uncompiled model's."""
    from torch.utils.data import DataLoader, TensorDataset

    from msgcli.engine.distributed import DistContext
    from msgcli.engine.evaluate import evaluate
    from msgcli.snn import TWO

    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    model = build_model("vggsnn_tiny", in_channels=2, num_classes=4, T=cfg.T, input_size=16)
    seen = []

    def recording(graph, inputs):
        seen.append(next(i.shape[0] for i in inputs if isinstance(i, torch.Tensor) and i.dim() == 5))
        return graph.forward

    data = TensorDataset(torch.rand(11, cfg.T, 2, 16, 16), torch.randint(0, 4, (11,)))
    loader = DataLoader(data, batch_size=4)
    ctx = DistContext(rank=0, world_size=1, device=torch.device("cpu"))
    two = TWO(cfg.T)
    compiled = evaluate(torch.compile(model, backend=recording), two, loader, cfg, ctx)
    eager = evaluate(model, two, loader, cfg, ctx)
    assert set(seen) == {4} and compiled.samples == eager.samples == 11
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-6) and compiled.accuracy == eager.accuracy
    assert compiled.firing_rates == pytest.approx(eager.firing_rates, rel=1e-6)


def test_compile_without_a_cpp_compiler_is_one_clear_error(monkeypatch):
    from torch._inductor import cpp_builder

    from msgcli.errors import UserError

    def missing():
        raise RuntimeError("No working C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    with pytest.raises(UserError, match="train.compile: .*C\\+\\+ compiler"):
        engine_build.compile_model(nn.Linear(2, 2), torch.device("cpu"))


def test_compile_with_recompute_is_one_clear_error():
    from msgcli.errors import UserError

    model = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=2, input_size=16, recompute=True)
    with pytest.raises(UserError, match="train.compile and model.recompute"):
        engine_build.compile_model(model, torch.device("cpu"))
    engine_build.compile_model(build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=2, input_size=16),
                               torch.device("cpu"))  # without recompute it compiles (lazily)

import pytest

from msgcli import config as config_io
from msgcli.config import ConfigError, RunConfig


def test_every_preset_loads_and_records_its_setup():
    names = config_io.list_presets()
    expected = {"digits-dvs", "dvs-vgg", "dvs-resnet18", "ncaltech-vgg", "ncaltech-resnet18", "cifar10-cifarnet",
                "cifar10-cifarnet-noaa", "cifar100-cifarnet", "cifar100-resnet18", "imagenet-sew34",
                "dvsgesture-vgg", "nmnist-vgg", "imagenet-sew18-release"}
    assert expected <= set(names)
    for name in names:
        cfg = config_io.load_preset(name)
        assert cfg.preset == name
    dvs = config_io.load_preset("dvs-vgg")
    assert (dvs.T, dvs.model.name, dvs.data.name, dvs.paper.accuracy) == (10, "vggsnn", "cifar10dvs", 83.97)
    # the release's lr scaling: 0.05 * 64 / 1024
    assert dvs.lr(world_size=1) == pytest.approx(3.125e-3)
    assert dvs.model.neuron.mask_p == 0.5 and dvs.two.enabled and dvs.two.rule == "release"


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"model\.neuron\.mask_pp.*did you mean 'model\.neuron\.mask_p'"):
        config_io.apply_overrides(RunConfig(), {"model.neuron.mask_pp": "0.3"})
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        config_io.from_dict({"trian": {"epochs": 3}})


def test_wrong_type_and_range_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer"):
        config_io.apply_overrides(RunConfig(), {"train.epochs": "ten"})
    with pytest.raises(ConfigError, match=r"model\.neuron\.mask_p: 1\.5 is outside the allowed range \[0\.0, 1\.0\]"):
        config_io.apply_overrides(RunConfig(), {"model.neuron.mask_p": "1.5"})
    with pytest.raises(ConfigError, match=r"model\.neuron\.surrogate: 'tanh' is not allowed; choose one of piecewise_linear"):
        config_io.apply_overrides(RunConfig(), {"model.neuron.surrogate": "tanh"})
    with pytest.raises(ConfigError, match=r"two\.enabled: expected true or false"):
        config_io.apply_overrides(RunConfig(), {"two.enabled": "maybe"})


def test_paper_presets_name_the_releases_stem_pool_and_init():
    """Written in each paper preset, not left to defaults: resnet18 as the release's main.py builds it
    (average-pooled stem), the SEW-ResNets max-pooled, every backbone at the release's init."""
    for name in config_io.list_presets():
        if config_io.load_preset(name).paper.accuracy is None:
            continue
        model = config_io.load_yaml(config_io.PRESET_DIR / f"{name}.yaml")["model"]
        assert model["init"] == "release", name
        expected_pool = {"resnet18": "avg", "sew_resnet18": "max", "sew_resnet34": "max"}.get(model["name"])
        assert model.get("stem_pool") == expected_pool, name
    assert config_io.load_preset("imagenet-sew34").model.name == "sew_resnet34"  # the paper's network
    assert config_io.load_preset("imagenet-sew18-release").model.name == "sew_resnet18"  # what the release's code builds


def test_model_options_left_unset_are_null_and_checked_when_set():
    cfg = RunConfig()
    assert (cfg.model.stem, cfg.model.stem_pool, cfg.model.init) == (None, None, "release")
    assert config_io.apply_overrides(cfg, {"model.stem_pool": "max"}).model.stem_pool == "max"
    assert config_io.apply_overrides(config_io.load_preset("dvs-resnet18"), {"model.stem_pool": "null"}).model.stem_pool is None
    with pytest.raises(ConfigError, match=r"model\.stem_pool: 'mean' is not allowed; choose one of avg, max"):
        config_io.apply_overrides(cfg, {"model.stem_pool": "mean"})
    with pytest.raises(ConfigError, match=r"model\.init: 'xavier' is not allowed; choose one of release, kaiming"):
        config_io.apply_overrides(cfg, {"model.init": "xavier"})


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match=r"unknown preset 'dvs-vg'.*did you mean 'dvs-vgg'.*available: .*digits-dvs"):
        config_io.load_preset("dvs-vg")


def test_overrides_are_typed_and_saved_config_round_trips(tmp_path):
    cfg = config_io.apply_overrides(config_io.load_preset("dvs-vgg"), {"model.neuron.mask_p": "0.3", "two.enabled": "false", "T": "6"})
    assert cfg.model.neuron.mask_p == 0.3 and cfg.two.enabled is False and cfg.T == 6
    path = tmp_path / "config.yaml"
    config_io.save(cfg, path)
    assert config_io.load(path) == cfg


def test_lr_follows_the_batch_of_one_process_or_of_all(monkeypatch):
    """The release's main.py: base_lr * batch per process / 1024 whatever the processes (its world_size
    stays 1); lr_batch=global multiplies by the job's world size, which the caller passes in (the
    environment is not read); an explicit lr is kept as given."""
    dvs = config_io.load_preset("dvs-vgg")
    assert dvs.lr(1) == pytest.approx(0.05 * 64 / 1024)
    assert dvs.lr(4) == pytest.approx(0.05 * 64 / 1024)
    global_batch = config_io.apply_overrides(dvs, {"optim.lr_batch": "global"})
    monkeypatch.setenv("WORLD_SIZE", "8")  # torchrun's variable changes nothing
    assert global_batch.lr(4) == pytest.approx(0.05 * 64 * 4 / 1024)
    assert global_batch.lr(1) == pytest.approx(0.05 * 64 / 1024)
    assert config_io.apply_overrides(dvs, {"optim.lr": 0.01}).lr(4) == 0.01


def test_the_papers_ablation_numbers_are_typed_fields_of_the_presets():
    ablation = config_io.load_preset("dvs-resnet18").paper.ablation
    assert (ablation.baseline, ablation.two, ablation.msg, ablation.msg_two) == (72.90, 74.40, 78.30, 79.10)
    assert config_io.load_preset("ncaltech-vgg").paper.ablation.baseline is None  # not in the paper's ablation
    with pytest.raises(ConfigError, match=r"paper\.ablation\.msg: 120\.0 is outside the allowed range \[0\.0, 100\.0\]"):
        config_io.apply_overrides(RunConfig(), {"paper.ablation.msg": "120"})
    with pytest.raises(ConfigError, match=r"paper\.ablation\.msg_tw.*did you mean 'paper\.ablation\.msg_two'"):
        config_io.from_dict({"paper": {"ablation": {"msg_tw": 83.9}}})

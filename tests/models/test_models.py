"""CIFAR ResNets in timm's registry, and pretrained loading from local files and URLs."""

from __future__ import annotations

import shutil

import pytest
import timm
import torch

from cimq_pl.errors import ConfigError
from cimq_pl.models import create_model, read_state_dict
from conftest import RESNET20, RESNET32, RESNET56_C100

PARAMS = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6}


@pytest.mark.parametrize("name", timm.list_models("cifar_resnet*"))
def test_registry_builds_every_cifar_resnet(name):
    model = timm.create_model(name, num_classes=7)
    depth = int(name.split("resnet")[1].split("_")[0])
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == depth  # 3x3 convs + the classifier make the depth
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(PARAMS[depth], rel=0.05)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    has_projection = any(n.endswith("downsample.0") for n, _ in model.named_modules())
    assert has_projection == name.endswith("_b")


def test_option_a_shortcut_zero_pads_new_channels():
    block = timm.create_model("cifar_resnet20").layer2[0]
    x = torch.randn(1, 16, 8, 8)
    y = block.downsample(x)
    assert y.shape == (1, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2]) and y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


def test_pretrained_files_load_with_prefix_stripped_and_classifier_renamed():
    raw = torch.load(RESNET20, map_location="cpu", weights_only=True)["state_dict"]
    model = create_model("cifar_resnet20", 10, str(RESNET20))
    assert torch.equal(model.fc.weight, raw["module.linear.weight"])
    assert torch.equal(model.layer3[2].bn2.running_var, raw["module.layer3.2.bn2.running_var"])
    model = create_model("cifar_resnet56_b", 100, str(RESNET56_C100))
    raw = torch.load(RESNET56_C100, map_location="cpu", weights_only=True)
    assert torch.equal(model.layer2[0].downsample[0].weight, raw["layer2.0.downsample.0.weight"])


def test_lightning_style_checkpoint_with_model_prefix_loads(tmp_path):
    model = create_model("cifar_resnet20", 10, str(RESNET20))
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    again = create_model("cifar_resnet20", 10, str(path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_sha256_prefix_in_name_is_verified(tmp_path):
    bad = tmp_path / "resnet20-deadbeef.th"
    shutil.copy(RESNET20, bad)
    with pytest.raises(ConfigError, match=r"sha256 starts with '12fca82f', but its name says 'deadbeef'"):
        read_state_dict(bad)


def test_keys_that_do_not_fit_are_rejected():
    with pytest.raises(ConfigError, match=r"does not fit CifarResNet: 60 unexpected \(layer1\.3\.conv1\.weight"):
        create_model("cifar_resnet20", 10, str(RESNET32))


def test_url_uses_hub_cache_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(RESNET20, tmp_path / "hub" / "checkpoints" / RESNET20.name)
    model = timm.create_model("cifar_resnet20", pretrained=True)  # the cfg URL, served from the cache
    expected = torch.load(RESNET20, map_location="cpu", weights_only=True)["state_dict"]["module.linear.bias"]
    assert torch.equal(model.fc.bias, expected)


def test_unreachable_url_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=r"cannot download .*put the file at .*resnet20-12fca82f\.th"):
        create_model("cifar_resnet20", 10, "http://127.0.0.1:9/resnet20-12fca82f.th")


def test_missing_path_and_code_carrying_pickle_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"'nope\.th' not found"):
        create_model("cifar_resnet20", 10, "nope.th")
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": object()}, evil)
    with pytest.raises(ConfigError, match="weights-only"):
        read_state_dict(evil)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ConfigError, match=r"unknown model name 'cifar_resnet21': did you mean cifar_resnet"):
        create_model("cifar_resnet21")

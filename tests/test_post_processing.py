"""Rank-preserving post-processing: no ties, anomalib's labels, thresholds from normal validation images."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import ImageBatch, InferenceBatch
from anomalib.post_processing import PostProcessor

from anomalib_multiclass import RankPreservingPostProcessor


def _fitted(post_processor: PostProcessor) -> PostProcessor:
    post_processor.image_min, post_processor.image_max = torch.tensor(0.0), torch.tensor(10.0)
    post_processor._image_threshold = torch.tensor(2.0)  # noqa: SLF001
    post_processor.pixel_min, post_processor.pixel_max = torch.tensor(0.0), torch.tensor(10.0)
    post_processor._pixel_threshold = torch.tensor(2.0)  # noqa: SLF001
    return post_processor


def test_scores_far_from_the_threshold_stay_ordered() -> None:
    scores = torch.tensor([-30.0, -6.0, 1.0, 2.0, 3.0, 9.0, 12.0, 40.0])
    ours = _fitted(RankPreservingPostProcessor())(InferenceBatch(pred_score=scores, anomaly_map=scores.view(1, 1, 2, 4)))
    anomalibs = _fitted(PostProcessor())(InferenceBatch(pred_score=scores, anomaly_map=scores.view(1, 1, 2, 4)))
    assert (ours.pred_score.diff() > 0).all(), "strictly increasing: no ties"
    assert (ours.pred_score > 0).all() and (ours.pred_score < 1).all()
    assert anomalibs.pred_score.unique().numel() < scores.numel(), "anomalib's clamp ties these scores"
    assert torch.equal(ours.pred_label, anomalibs.pred_label)
    assert torch.equal(ours.pred_mask, anomalibs.pred_mask)
    assert ours.pred_score[3] == 0.5, "the threshold maps to 0.5"


def test_scores_a_million_ranges_apart_stay_ordered() -> None:
    """A logistic squash would round all of these to 1.0 in float32."""
    scores = torch.tensor([2.0, 50.0, 1e3, 1e5, 1e6])
    normalized = _fitted(RankPreservingPostProcessor())(InferenceBatch(pred_score=scores)).pred_score
    assert (normalized.diff() > 0).all(), normalized


def _validation_batch(scores: list[float], labels: list[int], map_peaks: list[float]) -> ImageBatch:
    maps = torch.zeros(len(scores), 1, 4, 4)
    maps[:, 0, 0, 0] = torch.tensor(map_peaks)
    maps[:, 0, 3, 3] = -1.0
    return ImageBatch(
        image=torch.zeros(len(scores), 3, 4, 4),
        gt_label=torch.tensor(labels),
        pred_score=torch.tensor(scores),
        anomaly_map=maps,
    )


def _validate(post_processor: RankPreservingPostProcessor, batches: list[ImageBatch]) -> None:
    for batch in batches:
        post_processor.on_validation_batch_end(None, None, batch)
    post_processor.on_validation_epoch_end(None, None)


def test_thresholds_come_from_the_normal_validation_images_only() -> None:
    post_processor = RankPreservingPostProcessor(normal_quantile=0.5)
    _validate(post_processor, [
        _validation_batch([1.0, 2.0, 9.0], [0, 0, 1], [1.5, 2.5, 30.0]),
        _validation_batch([3.0, 50.0], [0, 1], [3.5, 80.0]),
    ])
    assert post_processor.image_threshold.item() == pytest.approx(2.0)  # median of 1, 2, 3; anomalies ignored
    assert post_processor.pixel_threshold.item() == pytest.approx(2.5)  # median of the normal maps' maxima
    assert (post_processor.image_min.item(), post_processor.image_max.item()) == (1.0, 3.0)
    assert (post_processor.pixel_min.item(), post_processor.pixel_max.item()) == (-1.0, 3.5)
    assert post_processor.has_thresholds
    labels = post_processor(InferenceBatch(pred_score=torch.tensor([1.5, 2.5, 9.0]))).pred_label
    assert labels.tolist() == [False, True, True]


def test_f1_adaptive_thresholds_use_the_anomalies() -> None:
    post_processor = RankPreservingPostProcessor(threshold_source="f1_adaptive")
    _validate(post_processor, [_validation_batch([1.0, 2.0, 3.0, 9.0, 50.0], [0, 0, 0, 1, 1], [1, 2, 3, 30, 80])])
    assert 3.0 <= post_processor.image_threshold.item() <= 9.0


def test_validation_without_normal_images_keeps_the_thresholds(caplog: pytest.LogCaptureFixture) -> None:
    post_processor = RankPreservingPostProcessor()
    _validate(post_processor, [_validation_batch([9.0, 50.0], [1, 1], [30.0, 80.0])])
    assert not post_processor.has_thresholds
    assert "no normal images" in caplog.text


def test_threshold_settings_are_checked_and_checkpointed() -> None:
    with pytest.raises(ValueError, match="Unknown threshold_source 'best'"):
        RankPreservingPostProcessor(threshold_source="best")
    with pytest.raises(ValueError, match=r"normal_quantile must be in \(0, 1\], got 0"):
        RankPreservingPostProcessor(normal_quantile=0)
    config = RankPreservingPostProcessor(threshold_source="f1_adaptive", normal_quantile=0.9).checkpoint_config()
    restored = RankPreservingPostProcessor()
    restored.load_checkpoint_config(config)
    assert (restored.threshold_source, restored.normal_quantile) == ("f1_adaptive", 0.9)


def test_nan_predictions_are_labelled_anomalous() -> None:
    scores = torch.tensor([1.0, float("nan"), 3.0])
    output = _fitted(RankPreservingPostProcessor())(InferenceBatch(pred_score=scores, anomaly_map=scores.view(1, 1, 1, 3)))
    assert output.pred_label.tolist() == [False, True, True]
    assert output.pred_mask.flatten().tolist() == [False, True, True]


def test_anomalib_private_hooks_that_this_post_processor_overrides_are_pinned() -> None:
    """The overridden private methods of anomalib's PostProcessor keep their signature and are still called.

    An anomalib update that renames them, changes their arguments or stops calling them on the
    Lightning path (``post_process_batch``) or the export path (``forward``) fails here, loudly,
    instead of silently falling back to anomalib's clamped normalisation.
    """
    import inspect
    from unittest import mock

    assert list(inspect.signature(PostProcessor._normalize).parameters) == [  # noqa: SLF001
        "preds", "norm_min", "norm_max", "threshold"]
    assert list(inspect.signature(PostProcessor._apply_threshold).parameters) == ["preds", "threshold"]  # noqa: SLF001
    assert isinstance(inspect.getattr_static(PostProcessor, "_checkpoint_config_keys"), property)
    scores = torch.tensor([1.0, 3.0])
    for run in (
        lambda post_processor: post_processor(InferenceBatch(pred_score=scores, anomaly_map=scores.view(2, 1, 1, 1))),
        lambda post_processor: post_processor.post_process_batch(
            ImageBatch(image=torch.zeros(2, 3, 1, 1), pred_score=scores.clone(), anomaly_map=scores.view(2, 1, 1, 1))),
    ):
        post_processor = _fitted(RankPreservingPostProcessor())
        with (
            mock.patch.object(RankPreservingPostProcessor, "_normalize", wraps=post_processor._normalize) as normalize,  # noqa: SLF001
            mock.patch.object(RankPreservingPostProcessor, "_apply_threshold",
                              wraps=post_processor._apply_threshold) as apply_threshold,  # noqa: SLF001
        ):
            run(post_processor)
        assert normalize.call_count == 2 and apply_threshold.call_count == 2
    assert "threshold_source" in _fitted(RankPreservingPostProcessor()).checkpoint_config()

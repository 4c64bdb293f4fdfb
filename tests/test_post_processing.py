"""Rank-preserving post-processing: no ties, anomalib's labels, works inside the model's forward."""

from __future__ import annotations

import torch
from anomalib.data import InferenceBatch
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

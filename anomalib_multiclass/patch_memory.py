"""Per-category memory of normal patch descriptors and the nearest-neighbour image score it gives.

PatchCore's evidence beside a unified model's own map: an image is as anomalous as its patch that lies farthest from every
normal patch of its category. Descriptors are the backbone's last two taps, each 3 x 3 averaged (a patch's
neighbourhood), resized to the finer one's resolution and concatenated (PatchCore's recipe on the model's own frozen
backbone, without a coreset: a random draw). Distances are written as ``|x|^2 - 2 x.y + |y|^2`` (matrix products), which export to ONNX and OpenVINO.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_multiclass.score_statistics import CategoryScoreStatistics

# random patch descriptors of each training image kept for the memory: bounds the cache (MVTec AD's 3,629 images at
# 256 px: about 0.2 GB in fp16) while a category of 128 images still fills a 16,384-patch memory with distinct patches
PATCHES_KEPT_PER_IMAGE = 128


def check_patch_score_weight(weight: float, normalize_per_category: bool) -> None:
    """Refuse a weight outside [0, 1], or a positive one without standardised map scores to add it to."""
    if not 0 <= weight <= 1:
        msg = f"patch_score_weight must lie in [0, 1], got {weight}."
        raise ValueError(msg)
    if weight > 0 and not normalize_per_category:
        msg = "patch_score_weight > 0 adds standardised scores: it needs normalize_per_category=True."
        raise ValueError(msg)


def patch_descriptors(taps: list[torch.Tensor]) -> torch.Tensor:
    """Descriptors ``[B, P, C']`` of the last two backbone taps (``[B, C_i, h_i, w_i]`` each), ``P = h_{-2} * w_{-2}``."""
    size = taps[-2].shape[-2:]
    pooled = [
        F.interpolate(F.avg_pool2d(tap, 3, stride=1, padding=1), size=size, mode="bilinear", align_corners=False)
        for tap in taps[-2:]
    ]
    return torch.cat(pooled, dim=1).flatten(2).transpose(1, 2)


def nearest_distances(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance of each query row to its nearest memory row.

    Args:
        queries: ``[B, P, C]``.
        memory: one memory per query image ``[B, K, C]``.

    Returns:
        ``[B, P]``.
    """
    products = torch.bmm(queries, memory.transpose(1, 2))
    squared = queries.pow(2).sum(-1, keepdim=True) - 2 * products + memory.pow(2).sum(-1).unsqueeze(1)
    return squared.amin(dim=-1).clamp_min(0)


class PatchMemory(nn.Module):
    """Random normal patch descriptors per category ``[M, K, C']`` and the statistics of their image score.

    The image score of an image of category ``c`` is the distance of its farthest patch to the nearest patch
    of ``c``'s memory, standardised by the mean and standard deviation of that score on ``c``'s normal training
    images (each scored against the memory without its own patches), so that it adds to the model's standardised
    map score on one scale. Both live in the state dict (checkpoints and exports keep them).

    Without a category (``category_index`` None), an image is scored against every category's memory and
    standardised with the statistics of all categories together (``pooled_row``).

    Args:
        size: patches kept per category ``K``.
        pooled_row: keep the all-categories statistics row for images without a category (store with :meth:`store`).
    """

    def __init__(self, size: int = 16384, pooled_row: bool = False) -> None:
        super().__init__()
        if size < 1:
            msg = f"The patch memory needs at least one patch per category, got size={size}."
            raise ValueError(msg)
        self.size = size
        self.register_buffer("memory", torch.zeros(0, 1, 1))
        self.statistics = CategoryScoreStatistics(pooled_row=pooled_row)

    @property
    def is_empty(self) -> bool:
        """True before a memory is stored (an untrained model, or a checkpoint saved without one)."""
        return self.memory.shape[0] == 0

    def sample(self, patches: torch.Tensor, owners: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` rows of one category's normal patches ``[n, C']`` (all, repeated to ``size``, when fewer).

        Returns the rows ``[K, C']`` and the image each came from (``owners [n]`` picked alike). The draw has its
        own seeded generator, so every process (and a resumed run) keeps the same memory. Repeated rows do not
        change a nearest distance.
        """
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(patches), generator=generator)[: self.size]
        order = order.repeat(-(-self.size // len(order)))[: self.size]
        return patches[order], owners[order]

    def weighted_score(
        self,
        map_score: torch.Tensor,
        patches: torch.Tensor,
        category_index: torch.Tensor | None,
        weight: float,
    ) -> torch.Tensor:
        """``(1 - weight) * map_score + weight * patch score`` ``[B]``, both standardised per category.

        Raises:
            RuntimeError: the memory is empty (the model was not trained with ``patch_score_weight > 0``).
        """
        if self.is_empty:
            msg = "The model has no patch memory for patch_score_weight > 0: train it (or add its categories) first."
            raise RuntimeError(msg)
        return (1 - weight) * map_score + weight * self(patches, category_index)

    def store(self, memories: list[torch.Tensor], scores: list[torch.Tensor]) -> None:
        """Store every category's memory ``[K, C']`` and its normal images' scores ``[n_m]`` at once."""
        self.memory = torch.stack(memories).to(self.memory.device, torch.float32)
        self.statistics.store([score.to(self.statistics.mean.device) for score in scores])

    def set_category(self, index: int, memory: torch.Tensor, scores: torch.Tensor) -> None:
        """Store category ``index``'s memory ``[K, C']`` and its normal images' scores ``[n]`` (``index`` may append)."""
        memory = memory.to(self.memory.device, torch.float32).unsqueeze(0)
        if self.is_empty or self.memory.shape[1:] != memory.shape[1:]:
            if index != 0:
                msg = f"Category {index} cannot start a patch memory: store category 0 first."
                raise ValueError(msg)
            self.memory = memory
        elif index == self.memory.shape[0]:
            self.memory = torch.cat([self.memory, memory])
        else:
            self.memory[index] = memory[0]
        self.statistics.set_row(index, scores)

    def raw_score(self, patches: torch.Tensor, category_index: torch.Tensor | None) -> torch.Tensor:
        """Distance of each image's farthest patch ``[B, P, C']`` to its category's memory (``category_index [B]``),
        or to every category's (None; one category at a time, to bound the distance matrix): ``[B]``."""
        if category_index is not None:
            return nearest_distances(patches, self.memory[category_index]).amax(dim=1).sqrt()
        nearest = None
        for memory in self.memory:
            distances = nearest_distances(patches, memory.expand(len(patches), -1, -1))
            nearest = distances if nearest is None else torch.minimum(nearest, distances)
        return nearest.amax(dim=1).sqrt()

    def forward(self, patches: torch.Tensor, category_index: torch.Tensor | None) -> torch.Tensor:
        """Standardised image score ``[B]`` of patch descriptors ``[B, P, C']``, each image with its category ``[B]``
        (or None: every category's memory and the all-categories statistics)."""
        score = self.raw_score(patches, category_index)
        return self.statistics.standardize(score.view(-1, 1, 1, 1), category_index).flatten()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        """Resize the memory to the stored one; a checkpoint without one loads with an empty memory."""
        stored = state_dict.get(prefix + "memory")
        if stored is None:
            state_dict[prefix + "memory"] = self.memory
            for name in ("mean", "std"):
                state_dict.setdefault(f"{prefix}statistics.{name}", getattr(self.statistics, name))
        else:
            self.memory = torch.empty_like(stored, device=self.memory.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def leave_own_image_out_scores(
    patches: torch.Tensor,
    image_ids: torch.Tensor,
    memory: torch.Tensor,
    memory_owners: torch.Tensor,
) -> torch.Tensor:
    """Raw image scores ``[n]`` of normal images ``[n, P, C']`` against a memory ``[K, C']`` without their own patches.

    ``image_ids [n]`` and ``memory_owners [K]`` name the image each row comes from; an image's own rows would be
    at distance 0 and hide how far it lies from the *other* normal images, as a test image does.
    """
    scores = []
    for descriptors, image_id in zip(patches, image_ids, strict=True):
        distances = torch.cdist(descriptors, memory).pow(2)
        own = memory_owners == image_id
        if not own.all():  # a category of one image keeps its own rows (score 0)
            distances[:, own] = float("inf")
        scores.append(distances.amin(dim=1).amax().sqrt())
    return torch.stack(scores)


def keep_random_patches(descriptors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``PATCHES_KEPT_PER_IMAGE`` random rows of each image's descriptors ``[B, P, C']``: ``[B, k, C']`` (CPU, fp16)."""
    descriptors = descriptors.cpu()
    count = min(PATCHES_KEPT_PER_IMAGE, descriptors.shape[1])
    rows = torch.stack([torch.randperm(descriptors.shape[1], generator=generator)[:count] for _ in descriptors])
    return torch.gather(descriptors, 1, rows.unsqueeze(-1).expand(-1, -1, descriptors.shape[-1])).half()


def category_memory(
    patch_memory: PatchMemory,
    kept: torch.Tensor,
    calibration: torch.Tensor,
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One category's memory ``[K, C']`` and its normal scores ``[m]``.

    Args:
        patch_memory: the module whose ``size`` and seeded draw are used.
        kept: the kept patches of each of the category's training images ``[n, k, C']``.
        calibration: the full descriptors ``[m, P, C']`` of its training images number ``rows [m]``.
    """
    count, per_image, channels = kept.shape
    owners = torch.arange(count).repeat_interleave(per_image)
    memory, memory_owners = patch_memory.sample(kept.reshape(-1, channels).float(), owners)
    return memory, leave_own_image_out_scores(calibration.float(), rows, memory, memory_owners)

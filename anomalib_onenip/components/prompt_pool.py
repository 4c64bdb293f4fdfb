"""OneNIP's prompt pool: the backbone features of the normal training images, and what is fitted from them.

Training caches the frozen backbone's features of every normal training image, by category, once (the
pool). Training steps draw their random prompts from it (and read their normal queries' features from it);
after each epoch the pool chooses each category's prompts for the prompt bank and calibrates the output
(the refiner scale ``kappa`` and the per-category score statistics), and it draws the patch memory of the
patch score. A category added after training (:meth:`PromptPool.add_category`) gets the same from its image
files. Everything fitted is stored in the torch model (:class:`~anomalib_onenip.torch_model.OneNIPModel`),
so checkpoints and exports carry it; the pool itself is a training-time cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from enum import Enum
from pathlib import Path

import torch
from anomalib.data import ImageBatch
from anomalib.data.transforms.utils import extract_transforms_by_type
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Normalize, Transform

from anomalib_multiclass.datamodule import PredictImages
from anomalib_multiclass.patch_memory import category_memory, keep_random_patches, patch_descriptors
from anomalib_onenip.torch_model import OneNIPModel

READ_BATCH_SIZE = 16


class RefinerScaleCalibration(str, Enum):
    """The images over which the refiner scale ``kappa = (max R + min R) / 2`` is taken."""

    NORMAL = "normal"  # the calibration images (normal training images)
    SYNTHETIC = "synthetic"  # those and their synthetic-anomaly twins, so that the range holds anomalous pixels

AnomalyGenerator = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def normalization(transform: Transform | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std ``[1, 3, 1, 1]`` of the ``Normalize`` in a pre-processing ``transform`` (identity without one)."""
    normalizers = extract_transforms_by_type(transform, Normalize)
    if not normalizers:
        return torch.zeros(1, 3, 1, 1, device=device), torch.ones(1, 3, 1, 1, device=device)
    mean = torch.tensor(normalizers[0].mean, device=device).view(1, -1, 1, 1)
    return mean, torch.tensor(normalizers[0].std, device=device).view(1, -1, 1, 1)


def medoid_index(global_features: torch.Tensor) -> int:
    """The row of ``global_features [n, C]`` whose direction is nearest the mean direction (cosine)."""
    normalized = F.normalize(global_features, dim=-1)
    return int((normalized @ F.normalize(normalized.mean(dim=0), dim=0)).argmax())


class PromptPool:
    """The cached training features of every category, the prompt choice and the calibration computed from them.

    Args:
        transform: the model's pre-processing transform (resize, normalise), applied to image files it reads.
        anomaly_generator: the training's synthetic-anomaly generator, ``images in [0, 1] [B, 3, H, W] ->
            (anomalous images, masks)``, for ``refiner_scale_calibration="synthetic"``.
        calibration_images_per_category: training images per category (evenly spaced) that set ``kappa``,
            the score statistics and the patch score's statistics. Defaults to ``64``.
        refiner_scale_calibration: the images over which ``kappa = (max R + min R) / 2`` is taken: ``"normal"``,
            the calibration images; ``"synthetic"``, those and their synthetic-anomaly twins (a fixed seed).
            Defaults to ``"normal"``.

    Attributes:
        features: category -> backbone features of its training images ``[N_c, C, h, w]`` (CPU).
        image_paths: category -> its training image files, in the order of ``features``.
        kept_patches: category -> ``PATCHES_KEPT_PER_IMAGE`` random patch descriptors per training image
            ``[N_c, k, C']`` (fp16; only when the patch score is on).
    """

    def __init__(
        self,
        transform: Transform | None,
        anomaly_generator: AnomalyGenerator,
        calibration_images_per_category: int = 64,
        refiner_scale_calibration: str = "normal",
    ) -> None:
        self.transform = transform
        self.anomaly_generator = anomaly_generator
        self.calibration_images_per_category = calibration_images_per_category
        self.refiner_scale_calibration = refiner_scale_calibration
        self.features: dict[str, torch.Tensor] = {}
        self.image_paths: dict[str, list[str]] = {}
        self.kept_patches: dict[str, torch.Tensor] = {}
        # image path -> (category, row in features[category]), when query features may come from the pool
        self._cached_rows: dict[str, tuple[str, int]] = {}
        # (category, calibration files) -> backbone features of their synthetic twins, chunks of [b, C, h, w]
        self._synthetic_twins: dict[tuple[str, tuple[str, ...]], list[torch.Tensor]] = {}

    @property
    def is_empty(self) -> bool:
        """True until training images were cached."""
        return not self.features

    # ----------------------------------------------------------------------------------------- cache
    @torch.no_grad()
    def cache(
        self,
        model: OneNIPModel,
        batches: Iterable[tuple[torch.Tensor, Sequence[str], Sequence[str | None]]],
        with_patches: bool = False,
        reuse_for_queries: bool = True,
    ) -> None:
        """Cache the backbone features of every training image, by category.

        Args:
            model: the torch model, whose frozen backbone encodes the images.
            batches: pre-processed images ``[B, 3, H, W]`` on the model's device, each with its category
                and image file (None when unknown), in dataset order.
            with_patches: also keep random patch descriptors of every image, for the patch memory.
            reuse_for_queries: training steps may read their normal queries' features from the pool (the same
                numbers: the backbone is frozen and in eval mode; needs training images without random
                augmentations).

        Raises:
            ValueError: no training image at all.
        """
        features: dict[str, list[torch.Tensor]] = {}
        kept_patches: dict[str, list[torch.Tensor]] = {}
        paths: dict[str, list[str | None]] = {}
        model.feature_extractor.eval()
        generator = torch.Generator().manual_seed(0)
        for images, categories, batch_paths in batches:
            taps = model.backbone_taps(images)
            batch_features = model.combine_taps(taps).cpu()
            batch_kept = keep_random_patches(patch_descriptors(taps), generator) if with_patches else None
            for row, (category, path) in enumerate(zip(categories, batch_paths, strict=True)):
                features.setdefault(category, []).append(batch_features[row])
                paths.setdefault(category, []).append(path)
                if batch_kept is not None:
                    kept_patches.setdefault(category, []).append(batch_kept[row])
        if not features:
            msg = "The training set is empty: OneNIP needs normal training images of every category."
            raise ValueError(msg)
        self.features = {category: torch.stack(values) for category, values in sorted(features.items())}
        self.kept_patches = {category: torch.stack(values) for category, values in kept_patches.items()}
        self.image_paths = {
            category: [str(path) for path in category_paths if path is not None] for category, category_paths in paths.items()
        }
        self._synthetic_twins = {}
        self._cached_rows = {}
        if reuse_for_queries:
            self._cached_rows = {
                str(path): (category, row)
                for category, category_paths in paths.items()
                for row, path in enumerate(category_paths)
                if path is not None
            }

    def random_prompts(self, categories: Sequence[str]) -> torch.Tensor:
        """One uniformly random cached training image of the same category per sample: ``[B, C, h, w]``."""
        prompts = []
        for category in categories:
            pool = self.features[category]
            prompts.append(pool[torch.randint(len(pool), ()).item()])
        return torch.stack(prompts)

    def cached_query_features(self, paths: Sequence[str] | None) -> torch.Tensor | None:
        """The cached features of these training images ``[B, C, h, w]`` (CPU), or None if any is not cached."""
        if not self._cached_rows or not paths:
            return None
        rows = [self._cached_rows.get(str(path)) for path in paths]
        if None in rows:
            return None
        return torch.stack([self.features[category][row] for category, row in rows])

    # ------------------------------------------------------------------------------------------- fit
    @torch.no_grad()
    def build_prompt_bank(self, model: OneNIPModel, category_names: Sequence[str]) -> None:
        """Encode the prompt bank of ``category_names`` (in index order) from the pool, then calibrate the output.

        Calibration uses up to ``calibration_images_per_category`` training images per category, evenly
        spaced in the pool, each reconstructed with its category's prompt as at test time; no test data.

        1. Refiner scale ``kappa``, which brings the refiner map ``S`` (in [0, 1]) to the range of the
           reconstruction map ``R``: the official code sets ``kappa = (max R + min R) / 2`` over the whole
           *test* set; here the same formula runs over the calibration images of all categories (and, with
           ``"synthetic"``, their synthetic-anomaly twins), and every entry of ``refiner_scale [M]`` gets it.
        2. Per category, the mean and standard deviation of the calibration images' image scores.

        Raises:
            RuntimeError: the pool is empty (it is filled during training).
        """
        if self.is_empty:
            msg = "No cached training features: the prompt bank is built during training."
            raise RuntimeError(msg)
        was_training = model.training
        model.eval()
        device = _device(model)
        pools = list(enumerate(self.features[name] for name in category_names))
        selected, categories = [], []
        for index, features in pools:
            selected.append(self._category_prompts(model, features))
            categories.append(torch.full((len(selected[-1]),), index, dtype=torch.long))
        prompt_features = torch.cat(selected).to(device)
        model.prompt_bank.store(
            model.encode_prompts(prompt_features),
            model.global_features(prompt_features),
            torch.cat(categories).to(device),
        )
        files = [(name, self.image_paths.get(name, [])) for name in category_names]
        model.refiner_scale = torch.full((len(pools),), self._refiner_scale(model, pools, files), device=device)
        model.score_statistics.store(self._calibration_scores(model, pools))
        model.train(was_training)

    @torch.no_grad()
    def build_patch_memory(self, model: OneNIPModel, category_names: Sequence[str]) -> None:
        """Store every category's patch memory and the statistics of its patch score in ``model.patch_memory``.

        The memory is drawn from the patches kept while caching; the statistics come from the calibration
        images (read again at full patch resolution), each scored against the memory without its own patches.

        Raises:
            RuntimeError: the training images' files are unknown (batches without ``image_path``).
        """
        for index, name in enumerate(category_names):
            paths = self.image_paths.get(name, [])
            if len(paths) != len(self.kept_patches[name]):
                msg = f"The patch memory needs the training image files of category '{name}' (the batches' image_path)."
                raise RuntimeError(msg)
            rows = self.calibration_rows(len(paths))
            _, descriptors = self.read_features(model, [paths[row] for row in rows], with_patches=True)
            self._store_patch_memory(model, index, self.kept_patches[name], descriptors, rows)

    @torch.no_grad()
    def add_category(self, model: OneNIPModel, index: int, name: str, paths: Sequence[Path]) -> None:
        """Fit category ``name`` at ``index`` of the model's categories from its normal image files, without training.

        Its prompts are encoded into the prompt bank, its ``kappa`` comes from the paper's formula over its
        calibration images, its score statistics (and patch memory) from their scores; every other category's
        prompts, ``kappa``, statistics and memory keep their exact values. ``index`` may be a new last index or
        an existing category's (which is replaced).
        """
        with_patches = model.patch_score_weight > 0
        features, descriptors = self.read_features(model, paths, with_patches=with_patches)
        was_training = model.training
        model.eval()
        prompts = self._category_prompts(model, features).to(_device(model))
        model.prompt_bank.replace_category(index, model.encode_prompts(prompts), model.global_features(prompts))
        pools = [(index, features)]
        scale = self._refiner_scale(model, pools, [(name, [str(path) for path in paths])])
        refiner_scale = model.refiner_scale
        if index == len(refiner_scale):
            refiner_scale = model.refiner_scale = torch.cat([refiner_scale, refiner_scale.new_zeros(1)])
        refiner_scale[index] = scale
        model.score_statistics.set_row(index, self._calibration_scores(model, pools)[0])
        if descriptors is not None:
            kept = keep_random_patches(descriptors, torch.Generator().manual_seed(0))
            rows = self.calibration_rows(len(descriptors))
            self._store_patch_memory(model, index, kept, descriptors[rows], rows)
        model.train(was_training)

    # --------------------------------------------------------------------------------------- helpers
    def read_images(self, paths: Sequence[str | Path]) -> Iterator[torch.Tensor]:
        """Batches of pre-processed images ``[b, 3, H, W]`` (CPU) read from ``paths``, ``READ_BATCH_SIZE`` at a time.

        Each image is resized on its own (by ``transform``), so sizes may differ a little.
        """
        dataset = PredictImages(paths, transform=self.transform)
        # a generator of its own: the loader draws its seed from it, not from the training's random stream
        loader = DataLoader(dataset, batch_size=READ_BATCH_SIZE, collate_fn=ImageBatch.collate, generator=torch.Generator())
        for batch in loader:
            yield batch.image

    @torch.no_grad()
    def read_features(
        self,
        model: OneNIPModel,
        paths: Sequence[str | Path],
        with_patches: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Backbone features ``[n, C, h, w]`` of image files, pre-processed as in training, and with ``with_patches``
        their patch descriptors ``[n, P, C']`` (else None), on the CPU."""
        model.feature_extractor.eval()
        features, descriptors = [], []
        for images in self.read_images(paths):
            taps = model.backbone_taps(images.to(_device(model)))
            features.append(model.combine_taps(taps).cpu())
            if with_patches:
                descriptors.append(patch_descriptors(taps).cpu())
        return torch.cat(features), torch.cat(descriptors) if with_patches else None

    def calibration_rows(self, count: int) -> torch.Tensor:
        """Up to ``calibration_images_per_category`` of ``count`` rows, evenly spaced: ``[m]``."""
        chosen = min(count, self.calibration_images_per_category)
        return torch.linspace(0, count - 1, chosen).round().long()

    def _category_prompts(self, model: OneNIPModel, features: torch.Tensor) -> torch.Tensor:
        """The prompt of one category, ``[1, C, h, w]``: its training image nearest the category's mean (the medoid
        of the global features) among its features ``[n, C, h, w]``."""
        index = medoid_index(model.global_features(features))
        return features[index : index + 1]

    def _store_patch_memory(
        self,
        model: OneNIPModel,
        index: int,
        kept: torch.Tensor,
        calibration: torch.Tensor,
        rows: torch.Tensor,
    ) -> None:
        """Category ``index``'s memory from its kept patches ``[n, k, C']`` and statistics from the full descriptors
        ``[m, P, C']`` of its training images number ``rows [m]``."""
        memory, scores = category_memory(model.patch_memory, kept, calibration, rows)
        model.patch_memory.set_category(index, memory.to(_device(model)), scores.to(_device(model)))

    def _refiner_scale(
        self,
        model: OneNIPModel,
        pools: Sequence[tuple[int, torch.Tensor]],
        files: Sequence[tuple[str, Sequence[str]]],
    ) -> float:
        """``kappa = (max R + min R) / 2`` over the calibration images of ``pools`` (see ``refiner_scale_calibration``).

        ``files`` gives each pool's category name and image files in the order of its features; with
        ``"synthetic"`` the same calibration images are read again and given synthetic anomalies.
        """
        low, high = self._reconstruction_range(model, self._calibration_batches(model, pools))
        if self.refiner_scale_calibration == "synthetic":
            device = _device(model)
            for (index, pool), (name, paths) in zip(pools, files, strict=True):
                if len(paths) != len(pool):
                    msg = f"Synthetic kappa calibration needs the {len(pool)} training image files of category '{name}'."
                    raise RuntimeError(msg)
                twins = (
                    (features.to(device), torch.full((len(features),), index, device=device))
                    for features in self.synthetic_twin_features(model, name, paths)
                )
                synthetic_low, synthetic_high = self._reconstruction_range(model, twins)
                low, high = min(low, synthetic_low), max(high, synthetic_high)
        return (high + low) / 2

    @torch.no_grad()
    def synthetic_twin_features(self, model: OneNIPModel, name: str, paths: Sequence[str]) -> list[torch.Tensor]:
        """Backbone features (chunks of ``[b, C, h, w]``, on the CPU) of synthetic twins of the calibration images.

        The calibration images are ``calibration_images_per_category`` of ``paths``, evenly spaced. The anomalies
        are drawn with a fixed seed in a forked random state, so training's random stream and the twins do not
        depend on when the calibration runs. The backbone is frozen, so the features are computed once per
        training run and reused at every epoch's calibration.
        """
        chosen = [paths[row] for row in self.calibration_rows(len(paths)).tolist()]
        key = (name, tuple(chosen))
        if key in self._synthetic_twins:
            return self._synthetic_twins[key]
        device = _device(model)
        mean, std = normalization(self.transform, device)
        chunks = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            for images in self.read_images(chosen):
                images = images.to(device)
                anomalous, _ = self.anomaly_generator(images * std + mean)
                chunks.append(model.extract_features((anomalous - mean) / std).cpu())
        self._synthetic_twins[key] = chunks
        return chunks

    @staticmethod
    @torch.no_grad()
    def _reconstruction_range(
        model: OneNIPModel,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[float, float]:
        """Minimum and maximum of the reconstruction map ``R`` over ``batches`` of features ``[b, C, h, w]``, each
        with its category index ``[b]``."""
        low, high = float("inf"), float("-inf")
        for features, category_index in batches:
            encoded_prompt, _ = model.prompt_bank.select(model.global_features(features), category_index)
            reconstruction_map, _ = model.residual_maps(model.reconstruct(features, encoded_prompt), features)
            low, high = min(low, reconstruction_map.min().item()), max(high, reconstruction_map.max().item())
        return low, high

    def _calibration_scores(self, model: OneNIPModel, pools: Sequence[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """Image scores ``[n_m]`` of the calibration images of each pool, with its category's prompt."""
        scores: dict[int, list[torch.Tensor]] = {index: [] for index, _ in pools}
        for features, category_index in self._calibration_batches(model, pools):
            anomaly_map, _ = model.fused_map(features, category_index)
            scores[int(category_index[0])].append(model.image_score(anomaly_map))
        return [torch.cat(values) for values in scores.values()]

    def _calibration_batches(
        self,
        model: OneNIPModel,
        pools: Sequence[tuple[int, torch.Tensor]],
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Chunks of calibration features ``[b, C, h, w]`` (on the model's device) with their category index ``[b]``.

        ``pools`` pairs a category index with that category's features ``[n, C, h, w]``.
        """
        device = _device(model)
        for index, pool in pools:
            subset = pool[self.calibration_rows(len(pool))]
            for features in subset.split(READ_BATCH_SIZE):
                yield features.to(device), torch.full((len(features),), index, device=device)


def _device(model: OneNIPModel) -> torch.device:
    return next(model.parameters()).device

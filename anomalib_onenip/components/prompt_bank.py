"""Bank of encoded normal prompts, per category, stored in the model (checkpoints and exports)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


class PromptBank(nn.Module):
    """Encoded normal prompt images and the global features used to choose among them.

    Buffers (``K`` prompts over all categories; they grow to the size of whatever is loaded):

    - ``tokens [K, N, D]``: encoder output of each prompt image (encoded once, not per query).
    - ``global_features [K, C]``: L2-normalised spatial mean of each prompt's backbone features.
    - ``categories [K]``: category index of each prompt.

    :meth:`select` returns, for each query, the prompt of its category (when the category is
    known) or of any category, whose global feature is the most cosine-similar to the query's.
    The cost is one ``[B, C] x [C, K]`` product, flat in the number of categories.
    """

    def __init__(self, num_tokens: int, hidden_dim: int, in_channels: int) -> None:
        super().__init__()
        self.register_buffer("tokens", torch.zeros(0, num_tokens, hidden_dim))
        self.register_buffer("global_features", torch.zeros(0, in_channels))
        self.register_buffer("categories", torch.zeros(0, dtype=torch.long))

    @property
    def is_empty(self) -> bool:
        """True until prompts were stored (the model was fitted or loaded)."""
        return self.tokens.shape[0] == 0

    def store(self, tokens: torch.Tensor, global_features: torch.Tensor, categories: torch.Tensor) -> None:
        """Replace the bank with ``tokens [K, N, D]``, ``global_features [K, C]`` and ``categories [K]``."""
        self.tokens = tokens.detach().clone()
        self.global_features = F.normalize(global_features.detach(), dim=-1)
        self.categories = categories.detach().to(torch.long).clone()

    def replace_category(self, category: int, tokens: torch.Tensor, global_features: torch.Tensor) -> None:
        """Set the prompts of category index ``category`` to ``tokens [k, N, D]`` and ``global_features [k, C]``.

        The prompts of that category, if any, are dropped; those of every other category keep their
        exact values (their global features are not normalised again) and their order; the new ones
        are appended.
        """
        keep = self.categories != category
        self.tokens = torch.cat([self.tokens[keep], tokens.detach().to(self.tokens)])
        self.global_features = torch.cat(
            [self.global_features[keep], F.normalize(global_features.detach(), dim=-1).to(self.global_features)],
        )
        added = torch.full((len(tokens),), category, dtype=torch.long, device=self.categories.device)
        self.categories = torch.cat([self.categories[keep], added])

    def select(
        self,
        global_features: torch.Tensor,
        category_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose one encoded prompt per query.

        Args:
            global_features: query global features ``[B, C]``.
            category_index: query category indices ``[B]``, or None to choose among all prompts.

        Returns:
            Encoded prompts ``[B, N, D]`` and the category index of each chosen prompt ``[B]``.
        """
        similarity = F.normalize(global_features, dim=-1) @ self.global_features.T
        if category_index is not None:
            other_category = self.categories.unsqueeze(0) != category_index.unsqueeze(1)
            similarity = similarity.masked_fill(other_category, float("-inf"))
        chosen = similarity.argmax(dim=1)
        return self.tokens[chosen], self.categories[chosen]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        """Resize the buffers to the stored bank before loading it."""
        for name in ("tokens", "global_features", "categories"):
            stored = state_dict.get(prefix + name)
            if stored is not None:
                setattr(self, name, torch.empty_like(stored, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

"""OneNIP's feature reconstruction transformer: neighbour-masked encoder and prompt-guided decoder.

Shapes: ``B`` images, ``N = h * w`` tokens of width ``D`` (``hidden_dim``). Layers are post-norm
(DETR style); positional embeddings are added to queries and keys, never to values. The decoder is
the "bidirectional" decoder of the official code after its 2024-11-26 bug fix (v2): the image
stream is updated with the image-to-prompt attention output.
"""

from __future__ import annotations

import torch
from torch import nn


def neighbor_mask(height: int, width: int) -> torch.Tensor:
    """Attention mask ``[N, N]`` (True = blocked) that hides each token's neighbourhood.

    Following UniAD, with ``k = size // 2`` per axis, token ``(i, j)`` may not attend to tokens
    whose row is within ``k // 2`` of ``i`` and whose column is within ``k // 2`` of ``j``: a 9x9
    window on a 16x16 grid, 7x7 on 14x14, 11x11 on 20x20. This removes the identity shortcut.
    """
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    row_near = (rows[:, None] - rows[None, :]).abs() <= (height // 2) // 2
    col_near = (cols[:, None] - cols[None, :]).abs() <= (width // 2) // 2
    return row_near & col_near


class LearnedPositionEmbedding(nn.Module):
    """Learned 2-D position embedding ``[N, D]``: ``[column_j ; row_i]`` for token ``(i, j)``.

    Both tables start uniform in ``[0, 1)`` (as in the official code) and tie the model to one
    feature-grid size.
    """

    def __init__(self, height: int, width: int, hidden_dim: int) -> None:
        super().__init__()
        self.height, self.width = height, width
        self.row_embed = nn.Parameter(torch.rand(height, hidden_dim // 2))
        self.col_embed = nn.Parameter(torch.rand(width, hidden_dim - hidden_dim // 2))

    def forward(self) -> torch.Tensor:
        """Return the ``[N, D]`` embedding in row-major token order."""
        cols = self.col_embed.unsqueeze(0).expand(self.height, -1, -1)
        rows = self.row_embed.unsqueeze(1).expand(-1, self.width, -1)
        return torch.cat([cols, rows], dim=-1).flatten(0, 1)


class EncoderLayer(nn.Module):
    """Post-norm self-attention layer: ``x <- LN(x + Attn(x + pos, x + pos, x))``, then a ReLU FFN."""

    def __init__(self, hidden_dim: int, num_heads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``tokens [B, N, D]``, ``pos [N, D]``, ``mask [N, N]`` (True = blocked) -> ``[B, N, D]``."""
        query = tokens + pos
        attended = self.self_attn(query, query, tokens, attn_mask=mask, need_weights=False)[0]
        tokens = self.norm1(tokens + self.dropout1(attended))
        hidden = self.linear2(self.dropout(torch.relu(self.linear1(tokens))))
        return self.norm2(tokens + self.dropout2(hidden))


class PromptDecoderLayer(nn.Module):
    """Two-way layer: the prompt stream attends to the image, then the image attends to the prompt.

    1. ``T <- LN1(T + Attn(T + pos, K + pos, K))`` (masked)
    2. ``T <- LN2(T + MLP(T))``
    3. ``K <- LN3(K + Attn(K + pos, T + pos, T))`` (masked; uses the updated ``T``)
    """

    def __init__(self, hidden_dim: int, num_heads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.prompt_to_image = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.image_to_prompt = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, dim_feedforward), nn.ReLU(), nn.Linear(dim_feedforward, hidden_dim))
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        prompt: torch.Tensor,
        image: torch.Tensor,
        pos: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompt, image [B, N, D]`` -> updated ``(prompt, image)``, both ``[B, N, D]``."""
        attended = self.prompt_to_image(prompt + pos, image + pos, image, attn_mask=mask, need_weights=False)[0]
        prompt = self.norm1(prompt + self.dropout1(attended))
        prompt = self.norm2(prompt + self.dropout2(self.mlp(prompt)))
        attended = self.image_to_prompt(image + pos, prompt + pos, prompt, attn_mask=mask, need_weights=False)[0]
        image = self.norm3(image + self.dropout3(attended))
        return prompt, image


class PromptGuidedTransformer(nn.Module):
    """Encoder and prompt-guided decoder between the ``C``-channel features and the ``D``-wide tokens.

    ``encode`` maps feature tokens ``[B, N, C]`` to encoded tokens ``[B, N, D]`` (used for the
    query, the synthetic anomaly and the prompt alike). ``decode`` starts from the encoded prompt,
    attends to the encoded query and returns the reconstructed normal features ``[B, N, C]``.

    Args:
        in_channels: backbone feature channels ``C``.
        feature_size: feature grid ``(h, w)``.
        hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout:
            transformer sizes (paper: 256, 8, 4, 4, 1024, 0.1).
        use_neighbor_mask: mask each token's neighbourhood in the encoder and decoder attentions.
    """

    def __init__(
        self,
        in_channels: int,
        feature_size: tuple[int, int],
        hidden_dim: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        use_neighbor_mask: bool = True,
    ) -> None:
        super().__init__()
        height, width = feature_size
        self.input_proj = nn.Linear(in_channels, hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, in_channels)
        self.pos_embed = LearnedPositionEmbedding(height, width, hidden_dim)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(hidden_dim, num_heads, dim_feedforward, dropout) for _ in range(num_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            PromptDecoderLayer(hidden_dim, num_heads, dim_feedforward, dropout) for _ in range(num_decoder_layers)
        )
        self.final_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.final_dropout = nn.Dropout(dropout)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        mask = neighbor_mask(height, width) if use_neighbor_mask else torch.zeros(0, dtype=torch.bool)
        self.register_buffer("attn_mask", mask, persistent=False)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases for every linear/attention projection (position tables stay U(0,1))."""
        for name, parameter in self.named_parameters():
            if name.startswith("pos_embed"):
                continue
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
            elif name.endswith("bias"):
                nn.init.zeros_(parameter)

    @property
    def mask(self) -> torch.Tensor | None:
        """The neighbour mask ``[N, N]``, or None when disabled."""
        return self.attn_mask if self.attn_mask.numel() else None

    def encode(self, feature_tokens: torch.Tensor) -> torch.Tensor:
        """Encode feature tokens ``[B, N, C]`` into ``[B, N, D]``."""
        pos = self.pos_embed()
        tokens = self.input_proj(feature_tokens)
        for layer in self.encoder_layers:
            tokens = layer(tokens, pos, self.mask)
        return tokens

    def decode(self, encoded_prompt: torch.Tensor, encoded_query: torch.Tensor) -> torch.Tensor:
        """Reconstruct normal features ``[B, N, C]`` from the encoded prompt and query, both ``[B, N, D]``."""
        pos = self.pos_embed()
        prompt, image = encoded_prompt, encoded_query
        for layer in self.decoder_layers:
            prompt, image = layer(prompt, image, pos, self.mask)
        attended = self.final_attn(prompt + pos, image + pos, image, need_weights=False)[0]
        prompt = self.decoder_norm(prompt + self.final_dropout(attended))
        return self.output_proj(prompt)

"""OneNIP's building blocks: neighbour mask, transformer, refiner, prompt bank, loss."""

from __future__ import annotations

import torch

from anomalib_onenip.components import PromptBank, PromptGuidedTransformer, Refiner, neighbor_mask
from anomalib_onenip.loss import OneNIPLoss, dice_loss


def test_neighbor_mask_blocks_the_papers_windows() -> None:
    mask = neighbor_mask(16, 16)
    assert mask.shape == (256, 256)
    assert mask.diagonal().all(), "a token must not attend to itself"
    centre = 8 * 16 + 8
    blocked = mask[centre].view(16, 16)
    assert blocked.sum() == 81  # 9x9 at 256 px
    assert blocked[4:13, 4:13].all()
    assert neighbor_mask(14, 14)[7 * 14 + 7].sum() == 49  # 7x7 at 224 px
    assert neighbor_mask(20, 20)[10 * 20 + 10].sum() == 121  # 11x11 at 320 px
    assert (~mask).any(dim=1).all(), "every token must keep something to attend to"


def test_transformer_shapes_and_prompt_dependence() -> None:
    torch.manual_seed(0)
    transformer = PromptGuidedTransformer(in_channels=24, feature_size=(4, 4), hidden_dim=16, num_heads=2,
                                          num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32).eval()
    query, prompt_a, prompt_b = torch.randn(3, 2, 16, 24)
    encoded = transformer.encode(query)
    assert encoded.shape == (2, 16, 16)
    out_a = transformer.decode(transformer.encode(prompt_a), encoded)
    out_b = transformer.decode(transformer.encode(prompt_b), encoded)
    assert out_a.shape == (2, 16, 24)
    assert not torch.allclose(out_a, out_b), "the reconstruction must depend on the prompt"


def test_refiner_upsamples_to_image_size() -> None:
    logits = Refiner(in_channels=24, channels=8)(torch.randn(2, 24, 4, 4), (64, 64))
    assert logits.shape == (2, 1, 64, 64)


def test_prompt_bank_selects_by_category_and_nearest() -> None:
    bank = PromptBank(num_tokens=4, hidden_dim=3, in_channels=2)
    assert bank.is_empty
    tokens = torch.arange(3.0).view(3, 1, 1).expand(3, 4, 3)
    bank.store(tokens, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]), torch.tensor([0, 1, 1]))
    query = torch.tensor([[1.0, 0.05], [0.0, 2.0]])
    nearest, nearest_category = bank.select(query)
    assert nearest[:, 0, 0].tolist() == [0.0, 1.0]
    assert nearest_category.tolist() == [0, 1]
    # with a category, only that category's prompts are candidates
    by_category, chosen_category = bank.select(query, torch.tensor([1, 0]))
    assert by_category[:, 0, 0].tolist() == [2.0, 0.0]
    assert chosen_category.tolist() == [1, 0]


def test_prompt_bank_state_dict_round_trip_resizes_buffers() -> None:
    bank = PromptBank(num_tokens=4, hidden_dim=3, in_channels=2)
    bank.store(torch.randn(5, 4, 3), torch.randn(5, 2), torch.tensor([0, 0, 1, 1, 2]))
    restored = PromptBank(num_tokens=4, hidden_dim=3, in_channels=2)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.tokens, bank.tokens)
    assert torch.equal(restored.categories, bank.categories)


def test_dice_loss_values() -> None:
    zeros = torch.zeros(1, 1, 2, 2)
    assert dice_loss(zeros, zeros) == 0  # normal sample predicted normal
    ones = torch.ones(1, 1, 2, 2)
    # perfect prediction of a 4-pixel mask: 1 - (4 + 1) / (4 + 4 + 1)
    assert torch.isclose(dice_loss(ones, ones), torch.tensor(1 - 5 / 9))
    # all-anomalous prediction on a normal sample: sum(S^2) / (sum(S^2) + 1)
    assert torch.isclose(dice_loss(ones, zeros), torch.tensor(4 / 5))


def test_loss_combines_mse_and_weighted_dice() -> None:
    reconstruction, target = torch.ones(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    logits, masks = torch.full((2, 1, 4, 4), 50.0), torch.ones(2, 1, 4, 4)
    losses = OneNIPLoss(dice_weight=0.5)(reconstruction, target, logits, masks)
    assert torch.isclose(losses["feature_loss"], torch.tensor(1.0))
    assert torch.isclose(losses["loss"], losses["feature_loss"] + 0.5 * losses["dice_loss"])

"""Building blocks of OneNIP."""

from anomalib_onenip.components.prompt_bank import PromptBank
from anomalib_onenip.components.refiner import Refiner
from anomalib_onenip.components.transformer import PromptGuidedTransformer, neighbor_mask

__all__ = ["PromptBank", "PromptGuidedTransformer", "Refiner", "neighbor_mask"]

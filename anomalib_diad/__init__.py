"""DiAD (He et al., AAAI 2024) on Hugging Face diffusers as an anomalib model: ``anomalib train --model DiAD``.

diffusers is imported only when a DiAD model is built, so this package imports without it
(install it with ``pip install "anomalib-multiclass-models[diad]"``).
"""

from anomalib_diad.lightning_model import DiAD
from anomalib_multiclass.registration import expose_in_anomalib_models

expose_in_anomalib_models(DiAD)

__all__ = ["DiAD"]

"""OneNIP (Gao, ECCV 2024) as an anomalib model: ``anomalib train --model OneNIP``."""

from anomalib_multiclass.registration import expose_in_anomalib_models
from anomalib_onenip.lightning_model import OneNIP

expose_in_anomalib_models(OneNIP)

__all__ = ["OneNIP"]

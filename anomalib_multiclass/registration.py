"""Make a plugin model visible where anomalib looks for models."""

from __future__ import annotations

import anomalib.models


def expose_in_anomalib_models(model_class: type) -> None:
    """Set ``anomalib.models.<Name>`` so that ``from anomalib.models import Name`` and name lookups work.

    The CLI's short name (``--model OneNIP``) and ``get_model("OneNIP")`` only need the class to
    be imported (it subclasses ``AnomalibModule`` directly); this adds the module attribute too.
    """
    if not hasattr(anomalib.models, model_class.__name__):
        setattr(anomalib.models, model_class.__name__, model_class)

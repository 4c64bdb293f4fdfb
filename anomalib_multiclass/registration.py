"""Make a plugin model visible where anomalib looks for models."""

from __future__ import annotations

import importlib


def expose_in_anomalib_models(model_class: type) -> None:
    """Set ``anomalib.models.<Name>`` so that ``from anomalib.models import Name`` and name lookups work.

    The CLI's short name (``--model OneNIP``) and ``get_model("OneNIP")`` only need the class to
    be imported (it subclasses ``AnomalibModule`` directly); this adds the module attribute too.
    The module is taken from ``sys.modules`` through ``import_module``: when the autoload hook runs,
    ``anomalib.models`` is loaded but not yet an attribute of the ``anomalib`` package.
    """
    models = importlib.import_module("anomalib.models")
    if not hasattr(models, model_class.__name__):
        setattr(models, model_class.__name__, model_class)

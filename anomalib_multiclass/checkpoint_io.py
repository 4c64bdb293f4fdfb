"""anomalib's checkpoint IO for this package's models: CPU loading by default, a named error for a bad file.

Imported when a model sets up its trainer, not with the package: ``anomalib.engine`` imports
``anomalib.models``, whose start-up hook imports this package's models.
"""

from __future__ import annotations

from typing import Any

from anomalib.engine.plugins import AnomalibCheckpointIO
from lightning.fabric.utilities.types import _MAP_LOCATION_TYPE, _PATH

from anomalib_multiclass.anomalib_fixes import check_checkpoint_file, keep_on_cpu


class MultiClassCheckpointIO(AnomalibCheckpointIO):
    """anomalib's checkpoint IO (its safe globals) that loads on the CPU by default and names a bad local file.

    Installed by this package's models on their own trainer (``UnifiedModelComponents.setup``) in
    place of a plain :class:`AnomalibCheckpointIO`; a checkpoint IO the user configured is kept.
    Lightning moves the loaded state to the run's device afterwards.
    """

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: _MAP_LOCATION_TYPE = None,
        weights_only: bool = True,
    ) -> dict[str, Any]:
        """Check a local ``path`` (see :func:`check_checkpoint_file`), then load it, on the CPU unless told otherwise."""
        check_checkpoint_file(path)
        if map_location is None:
            map_location = keep_on_cpu
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

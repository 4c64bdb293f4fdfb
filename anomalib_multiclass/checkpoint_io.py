"""anomalib's checkpoint IO for this package's models: CPU loading by default, a named error for a bad file."""

from __future__ import annotations

import zipfile
from typing import Any

import fsspec
from anomalib.engine.plugins import AnomalibCheckpointIO
from fsspec.utils import get_protocol
from lightning.fabric.utilities.types import _MAP_LOCATION_TYPE, _PATH

LOCAL_PROTOCOLS = ("file", "local")


def check_checkpoint_file(checkpoint_path: _PATH) -> _PATH:
    """``checkpoint_path`` when it names a complete local torch checkpoint (remote URLs pass unchecked).

    Local paths (plain or ``file://``) are opened through fsspec as Lightning opens them; a remote
    path (``s3://``, ``gs://``, ...) is returned as given, for Lightning to read.

    Raises:
        FileNotFoundError: a local file that does not exist.
        ValueError: a local file that is not a torch checkpoint (truncated by an interrupted copy, or another file).
    """
    name = str(checkpoint_path)
    if get_protocol(name) not in LOCAL_PROTOCOLS:
        return checkpoint_path
    filesystem, path = fsspec.core.url_to_fs(name)
    if not filesystem.isfile(path):
        msg = f"Checkpoint '{name}' does not exist: give the model.ckpt that `anomalib train` wrote."
        raise FileNotFoundError(msg)
    with filesystem.open(path, "rb") as file:
        complete = zipfile.is_zipfile(file)
    if not complete:
        msg = (
            f"Checkpoint '{name}' is not a readable torch checkpoint (truncated or corrupted?): give the "
            "model.ckpt that `anomalib train` wrote."
        )
        raise ValueError(msg)
    return checkpoint_path


def keep_on_cpu(storage: Any, location: str) -> Any:  # noqa: ANN401
    """``torch.load`` location function: every storage stays where it was read, on the CPU (Lightning's default)."""
    del location
    return storage


class MultiClassCheckpointIO(AnomalibCheckpointIO):
    """anomalib's checkpoint IO (its safe globals) that loads on the CPU by default and names a bad local file.

    Installed by this package's models on their own trainer (``MultiClassModule.setup``) in
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

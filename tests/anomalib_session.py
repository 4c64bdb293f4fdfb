"""Run several ``anomalib`` commands in one interpreter and print what each produced, as JSON.

    python tests/anomalib_session.py COMMANDS_JSON [--rename-cli-method OLD NEW]

``COMMANDS_JSON`` is a file holding a list of argument lists, each run as ``anomalib ARGS`` (anomalib's
own ``AnomalibCLI``) after ``seed_everything(i)`` for the ``i``-th command: the same command draws the
same numbers in two interpreters, and two commands of one session start from different random states.
For each command it records the saved checkpoint's tensors (a digest), the logged metrics, the
predicted scores, or the error (type and message). The start-up hook is active or not as the
environment says (``ANOMALIB_MULTICLASS_MODELS_AUTOLOAD``).

``--rename-cli-method OLD NEW`` simulates a future anomalib whose CLI renamed a method: the source of
``anomalib.cli.cli`` is compiled with ``OLD`` replaced by ``NEW`` everywhere (definition and callers),
and this package's start-up hook then runs on that module as it would on the real one.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any


def rename_in_anomalib_cli(old: str, new: str) -> None:
    """Make the next import of ``anomalib.cli.cli`` compile its source with ``old`` renamed to ``new``."""
    find_spec = importlib.machinery.PathFinder.find_spec

    class RenamingLoader(importlib.machinery.SourceFileLoader):
        def get_code(self, fullname: str) -> Any:  # noqa: ANN401
            source = Path(self.path).read_text().replace(old, new)
            return compile(source, self.path, "exec")

    def renaming_find_spec(fullname: str, path: Any = None, target: Any = None) -> Any:  # noqa: ANN401
        spec = find_spec(fullname, path, target)
        if fullname == "anomalib.cli.cli" and spec is not None:
            spec.loader = RenamingLoader(fullname, spec.origin)
        return spec

    importlib.machinery.PathFinder.find_spec = renaming_find_spec


def checkpoint_digest(path: Path) -> str:
    """SHA-256 of every tensor of a checkpoint's ``state_dict``, in key order."""
    import torch

    state_dict = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run(args: list[str], seed: int) -> dict[str, Any]:
    """``anomalib ARGS`` after ``seed_everything(seed)``: what it saved, logged or predicted, or the error it raised."""
    from anomalib.cli.cli import AnomalibCLI
    from lightning.pytorch import seed_everything

    seed_everything(seed, verbose=False)
    try:
        cli = AnomalibCLI(args)
    except SystemExit as exit_:
        return {"exit": exit_.code}
    except Exception as error:  # noqa: BLE001 - the error is the result
        return {"error": f"{type(error).__name__}: {error}".replace(str(Path.cwd()), "<cwd>")}
    trainer = cli.engine.trainer
    result: dict[str, Any] = {
        "metrics": {name: round(float(value), 6) for name, value in sorted(trainer.callback_metrics.items())},
    }
    checkpoints = sorted(Path(trainer.default_root_dir).glob("weights/lightning/model.ckpt"))
    if args[0] == "train" and checkpoints:
        result["digest"] = checkpoint_digest(checkpoints[0])
    predictions = trainer.predict_loop.predictions if args[0] == "predict" else None
    if predictions:
        result["scores"] = [round(float(score), 6) for batch in predictions for score in batch.pred_score]
    return result


def main() -> None:
    """Run the commands of the JSON file given as first argument; print one JSON object per command."""
    logging.basicConfig(level=logging.WARNING)
    if "--rename-cli-method" in sys.argv:
        position = sys.argv.index("--rename-cli-method")
        rename_in_anomalib_cli(sys.argv[position + 1], sys.argv[position + 2])
    commands = json.loads(Path(sys.argv[1]).read_text())
    for index, args in enumerate(commands):
        try:
            outcome = run(args, seed=index)
        except Exception:  # noqa: BLE001 - a broken session is reported, not hidden
            outcome = {"session_error": traceback.format_exc()}
        print("RESULT " + json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main()

"""Run the ``anomalib`` console script of the test environment in a subprocess, offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def anomalib_command() -> list[str]:
    """The ``anomalib`` console script of the environment that runs the tests."""
    executable = Path(sys.executable).with_name("anomalib")
    return [str(executable)] if executable.exists() else [shutil.which("anomalib") or "anomalib"]


def run_anomalib(args: list[str], cwd: Path, expect_success: bool = True, hook: bool = True) -> subprocess.CompletedProcess:
    """``anomalib ARGS`` in ``cwd``; asserts the exit status (0, or non-zero with ``expect_success=False``).

    ``hook=False`` disables this package's start-up hook (``ANOMALIB_MULTICLASS_MODELS_AUTOLOAD=0``).
    """
    result = subprocess.run(
        [*anomalib_command(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400",  # wide: no wrapped messages
             "ANOMALIB_MULTICLASS_MODELS_AUTOLOAD": "1" if hook else "0"},
    )
    succeeded = result.returncode == 0
    assert succeeded == expect_success, (result.returncode, result.stdout[-3000:], result.stderr[-3000:])
    return result

"""DiAD registration with anomalib, each check in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("diffusers")


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_get_model_and_anomalib_models_attribute() -> None:
    output = _python(
        "from anomalib.models import get_model, DiAD\n"
        "from anomalib_diad import DiAD as Same\n"
        "model = get_model('DiAD', architecture='tiny', input_size=(128, 128), diffusion_weights=None,"
        " pre_trained=False, backbone='resnet18')\n"
        "print(type(model).__module__, DiAD is Same)"
    )
    assert output == "anomalib_diad.lightning_model True"


"""Registration with anomalib, as a user types it: each check runs in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_interpreter_start_up_stays_light() -> None:
    output = _python("import sys; print('anomalib_plugins_autoload' in sys.modules, 'torch' in sys.modules, 'anomalib' in sys.modules)")
    assert output == "True False False", "the .pth hook is installed and imports nothing heavy at start-up"


def test_get_model_by_short_name() -> None:
    output = _python(
        "from anomalib.models import get_model, list_models\n"
        "model = get_model('OneNIP', backbone='tf_efficientnet_lite0', pre_trained=False, input_size=(64, 64))\n"
        "print(type(model).__module__, 'one_n_i_p' in list_models())  # anomalib's snake case of OneNIP"
    )
    assert output == "anomalib_onenip.lightning_model True"


def test_from_anomalib_models_import() -> None:
    output = _python("from anomalib.models import OneNIP\nfrom anomalib_onenip import OneNIP as Same\nprint(OneNIP is Same)")
    assert output == "True"


def test_plugin_imported_first_still_registers() -> None:
    output = _python("from anomalib_onenip import OneNIP\nimport anomalib.models\nprint(anomalib.models.OneNIP is OneNIP)")
    assert output == "True"


def test_entry_point_group_declares_the_model() -> None:
    output = _python(
        "from importlib.metadata import entry_points\n"
        "print([(e.name, e.value) for e in entry_points(group='anomalib.models') if e.name == 'OneNIP'])"
    )
    assert output == "[('OneNIP', 'anomalib_onenip:OneNIP')]"


@pytest.mark.slow
def test_wheel_records_every_installed_file(tmp_path: Path) -> None:
    """pip uninstall removes exactly the files of the wheel's RECORD: it must list the hook files and nothing foreign."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next(tmp_path.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        record_name = next(name for name in names if name.endswith(".dist-info/RECORD"))
        recorded = {line.split(",")[0] for line in archive.read(record_name).decode().splitlines() if line}
    assert set(names) == recorded
    top_level = {name.split("/")[0] for name in names}
    dist_info = record_name.split("/")[0]
    assert top_level == {"anomalib_multiclass", "anomalib_onenip", "anomalib_diad", "anomalib_plugins_autoload.py",
                         "anomalib_plugins_autoload.pth", dist_info}
    assert not any(name.endswith((".ckpt", ".pth", ".png")) and "autoload" not in name for name in names)

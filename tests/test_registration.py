"""Registration with anomalib, as a user types it: each check runs in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOOK = "anomalib_multiclass_models_autoload"


def _python(code: str, hook: bool = True, pythonpath: Path | None = None) -> str:
    env = {**os.environ, "ANOMALIB_MULTICLASS_MODELS_AUTOLOAD": "1" if hook else "0"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failed to load" not in result.stderr, result.stderr[-3000:]
    return result.stdout.strip()


def test_interpreter_start_up_stays_light() -> None:
    output = _python(f"import sys; print('{HOOK}' in sys.modules, 'torch' in sys.modules, 'anomalib' in sys.modules)")
    assert output == "True False False", "the .pth hook is installed and imports nothing heavy at start-up"


def test_disabled_hook_installs_nothing_and_class_paths_still_work() -> None:
    """ANOMALIB_MULTICLASS_MODELS_AUTOLOAD=0: anomalib is untouched until the user imports a model by its path."""
    output = _python(
        "import sys\n"
        f"from {HOOK} import MultiClassModelsFinder\n"
        "print(any(isinstance(finder, MultiClassModelsFinder) for finder in sys.meta_path))\n"
        "import anomalib.cli.cli, anomalib.models\n"
        "print(hasattr(anomalib.models, 'OneNIP'), 'anomalib_onenip' in sys.modules,\n"
        "      getattr(anomalib.cli.cli.AnomalibCLI.before_instantiate_classes, 'anomalib_multiclass_seed_fix', False))\n"
        "from anomalib_onenip import OneNIP\n"
        "from anomalib_diad import DiAD\n"
        "print(anomalib.models.OneNIP is OneNIP, anomalib.models.DiAD is DiAD)",
        hook=False,
    )
    assert output.splitlines() == ["False", "False False False", "True True"]


def test_hook_imports_only_this_distributions_models(tmp_path: Path) -> None:
    """Another plugin declared in the generic ``anomalib.models`` entry-point group is not imported by this hook."""
    dist_info = tmp_path / "other_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: other-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[anomalib.models]\nOther = other_plugin:Other\n")
    (tmp_path / "other_plugin.py").write_text("raise RuntimeError('other_plugin imported')\n")
    output = _python("import sys, anomalib.models\nprint(sorted(name for name in ('anomalib_onenip', 'anomalib_diad', "
                     "'other_plugin') if name in sys.modules))", pythonpath=tmp_path)
    assert output == "['anomalib_diad', 'anomalib_onenip']"


def test_get_model_by_short_name() -> None:
    output = _python(
        "from anomalib.models import get_model, list_models\n"
        "model = get_model('OneNIP', backbone='tf_efficientnet_lite0', pre_trained=False, input_size=(64, 64))\n"
        "names = list_models()\n"
        "print(type(model).__module__, 'one_n_i_p' in names, 'di_a_d' in names, 'multi_class_module' in names)"
    )
    # anomalib's snake case of OneNIP and DiAD; the shared base is no model and stays out of the list
    assert output == "anomalib_onenip.lightning_model True True False"


def test_a_model_that_anomalib_could_not_find_by_name_is_refused() -> None:
    from anomalib.models import AnomalibModule

    from anomalib_multiclass.multiclass_module import MultiClassModule
    from anomalib_onenip import OneNIP

    with pytest.raises(TypeError, match=r"class Hidden\(MultiClassModule, AnomalibModule\)"):
        type("Hidden", (MultiClassModule,), {})
    assert issubclass(type("Variant", (OneNIP,), {}), AnomalibModule), "a subclass of a model is still allowed"


def test_from_anomalib_models_import() -> None:
    output = _python("from anomalib.models import OneNIP\nfrom anomalib_onenip import OneNIP as Same\nprint(OneNIP is Same)")
    assert output == "True"


def test_plugin_imported_first_still_registers() -> None:
    """Importing a model first (which imports anomalib) still registers both models, without import cycles."""
    output = _python("from anomalib_onenip import OneNIP\nimport anomalib.models\n"
                     "print(anomalib.models.OneNIP is OneNIP, hasattr(anomalib.models, 'DiAD'))")
    assert output == "True True"
    for first in ("import anomalib_diad", "from anomalib_multiclass import MultiClassAD"):
        output = _python(f"{first}\nimport anomalib.engine, anomalib.models\n"
                         "print(hasattr(anomalib.models, 'OneNIP'), hasattr(anomalib.models, 'DiAD'))")
        assert output == "True True", first


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
        entry_points = archive.read(record_name.replace("RECORD", "entry_points.txt")).decode()
    assert set(names) == recorded
    top_level = {name.split("/")[0] for name in names}
    dist_info = record_name.split("/")[0]
    assert top_level == {"anomalib_multiclass", "anomalib_onenip", "anomalib_diad", f"{HOOK}.py", f"{HOOK}.pth",
                         dist_info}
    assert "[anomalib.models]" not in entry_points, "no generic entry-point group that another plugin could share"
    assert "onenip-add-category = anomalib_onenip.new_category:main" in entry_points
    assert not any(name.endswith((".ckpt", ".pth", ".png")) and "autoload" not in name for name in names)


# Every module of the three packages, each imported first in a process where anomalib is not imported yet.
# The process pre-imports the third-party libraries (not anomalib, not this distribution) and forks once per
# module, so that each import starts from the state of a fresh interpreter without paying torch's start-up.
IMPORT_EACH_FIRST = """
import importlib, json, os, pkgutil, sys, tempfile
import torch, torchvision, lightning, timm, torchmetrics, kornia, einops, pandas, matplotlib, rich, fsspec
assert not any(name == "anomalib" or name.startswith(("anomalib.", "anomalib_onenip", "anomalib_diad"))
               for name in sys.modules), "the parent must not import anomalib or the plugins"
modules = []
for package in ("anomalib_multiclass", "anomalib_onenip", "anomalib_diad"):
    spec = importlib.util.find_spec(package)
    modules.append(package)
    modules += [info.name for info in pkgutil.walk_packages(spec.submodule_search_locations, package + ".")]
results = {}
for module in modules:
    with tempfile.TemporaryFile() as errors:
        pid = os.fork()
        if pid == 0:
            os.dup2(errors.fileno(), 2)
            try:
                importlib.import_module(module)
                import anomalib.models
                ok = hasattr(anomalib.models, "OneNIP") and hasattr(anomalib.models, "DiAD")
            except BaseException:
                import traceback
                traceback.print_exc()
                ok = False
            sys.stderr.flush()
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        errors.seek(0)
        text = errors.read().decode()
        problems = [line for line in text.splitlines() if "Warning" not in line and "warn" not in line]
        results[module] = {"registered": os.waitstatus_to_exitcode(status) == 0, "stderr": problems}
print(json.dumps(results))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_importing_any_module_first_registers_both_models_without_errors() -> None:
    import json

    results = json.loads(_python(IMPORT_EACH_FIRST).splitlines()[-1])
    assert len(results) >= 30, sorted(results)
    failures = {module: result for module, result in results.items() if not result["registered"] or result["stderr"]}
    assert not failures, failures

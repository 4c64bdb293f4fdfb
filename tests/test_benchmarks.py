"""Benchmark scripts run end to end with tiny arguments and write their reports: a script that rots fails here.

The slowest (export_speed, predict_memory, ddp_equality: 20-50 s each; diad_speed's compiled path: 80 s) are ``long``
tests (``pytest -m long``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parent / "benchmarks"


def run_script(name: str, arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``tests/benchmarks/<name>`` with ``arguments`` on the CPU, offline; fail with its output."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(BENCHMARKS / name), *arguments], cwd=cwd, env=environment,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def quality_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """quality.py: one epoch of OneNIP (with its patch memory), PatchCore and PaDiM on two tiny categories, at 64 px."""
    output = tmp_path_factory.mktemp("quality")
    run_script("quality.py", ["--root", str(tiny_dataset), "--categories", "brick", "grass", "--input-size", "64",
                              "--onenip-epochs", "1", "--models", "OneNIP", "PatchCore", "PaDiM", "--num-workers", "0",
                              "--onenip-options", json.dumps({"patch_memory_size": 256}), "--output", str(output)],
               output)
    return output


def test_quality_writes_its_report_and_the_checkpoint(quality_run: Path) -> None:
    report = json.loads((quality_run / "quality.json").read_text())
    assert set(report["models"]) == {"OneNIP", "PatchCore", "PaDiM"}
    for model in report["models"].values():
        assert set(model["per_category"]) == {"brick", "grass"}
        assert all(0 <= value <= 1 for value in model["per_category"]["brick"].values())
    assert "| brick |" in (quality_run / "quality.md").read_text()
    assert (quality_run / "quality.png").stat().st_size > 0
    assert (quality_run / "runs" / "onenip" / "onenip.ckpt").is_file()


def test_detection_study_chooses_leave_one_category_out(quality_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    run_script("detection.py", ["--checkpoint", str(quality_run / "runs" / "onenip" / "onenip.ckpt"),
                                "--root", str(tiny_dataset), "--categories", "brick", "grass",
                                "--baselines", str(quality_run / "quality.json"), "--output", str(tmp_path)], tmp_path)
    study = json.loads((tmp_path / "detection.json").read_text())
    chosen = study["leave_one_out"]["all candidates"]
    assert set(chosen) == {"brick", "grass"}
    candidates = json.loads((tmp_path / "candidates.json").read_text())
    for held_out, entry in chosen.items():
        other = next(category for category in chosen if category != held_out)
        # the choice is the best candidate on the *other* category, whatever it scores on the held-out one
        assert candidates[entry["chosen"]][other] == max(values[other] for values in candidates.values())
        assert entry["image_AUROC"] == candidates[entry["chosen"]][held_out]
    assert "fixed: model default" in (tmp_path / "detection.md").read_text()
    assert (tmp_path / "detection.png").stat().st_size > 0


def test_new_category_reuses_the_quality_baselines(quality_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    run_script("new_category.py", ["--root", str(tiny_dataset), "--categories", "brick", "grass", "--held-out", "grass",
                                   "--input-size", "64", "--epochs", "1", "--adapt-epochs", "1", "--image-counts", "1",
                                   "--num-workers", "0", "--baselines", str(quality_run / "quality.json"),
                                   "--output", str(tmp_path)], tmp_path)
    report = json.loads((tmp_path / "new_category.json").read_text())
    assert set(report["held_out"]) == {"grass"}
    assert set(report["held_out"]["grass"]["added"]) == {"1", "8"}
    quality = json.loads((quality_run / "quality.json").read_text())
    assert report["baselines"]["PaDiM"]["per_category"]["grass"] == quality["models"]["PaDiM"]["per_category"]["grass"]
    assert "| grass | added, no training, 1 images |" in (tmp_path / "new_category.md").read_text()


def test_each_compiled_speed_path_compiles_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """speed.py's compiled paths share one lambda (code object) across shapes and precisions: each configuration must
    compile afresh, or past dynamo's recompile limit the "compiled" rows would silently time eager code."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import speed

    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for size in (2, 3, 4):  # without the reset, the second shape already exceeds the limit of 1 and raises
            run = speed.compiled(lambda values: values * 2, "default")
            assert torch.equal(run(torch.ones(size)), torch.full((size,), 2.0))


def test_speed_runs_every_onenip_path_with_several_categories(tmp_path: Path) -> None:
    run_script("speed.py", ["--backbone", "tf_efficientnet_lite0", "--input-size", "64", "--categories", "3",
                            "--batch-sizes", "3", "--skip-diad", "--growth-categories", "1", "3", "--growth-sizes", "64",
                            "--devices", "cpu", "--precisions", "fp32", "--repeats", "1",
                            "--json", str(tmp_path / "speed.json"), "--plot", str(tmp_path / "speed.png")], tmp_path)
    report = json.loads((tmp_path / "speed.json").read_text())
    assert {row["path"] for row in report["rows"]} == {"onenip_backbone", "onenip_official", "onenip_bank"}
    assert all(row["seconds"] > 0 for row in report["rows"])
    bank = next(row for row in report["rows"] if row["path"] == "onenip_bank")
    assert bank["map_difference"] < 1e-4  # the prompt bank's maps are the official-style path's
    assert (tmp_path / "speed.png").stat().st_size > 0


@pytest.mark.long
def test_export_speed_exports_and_times_the_checkpoint(quality_run: Path, tmp_path: Path) -> None:
    run_script("export_speed.py", ["--checkpoint", str(quality_run / "runs" / "onenip" / "onenip.ckpt"),
                                   "--input-size", "64", "--repeats", "1", "--output", str(tmp_path / "exports"),
                                   "--json", str(tmp_path / "export.json")], tmp_path)
    report = json.loads((tmp_path / "export.json").read_text())
    assert report, "export_speed.py wrote an empty report"
    assert any((tmp_path / "exports").rglob("*.xml")), "no OpenVINO export"


@pytest.mark.long
def test_predict_memory_measures_anomalib_predict(quality_run: Path, tmp_path: Path) -> None:
    run_script("predict_memory.py", ["--checkpoint", str(quality_run / "runs" / "onenip" / "onenip.ckpt"),
                                     "--counts", "3", "--image-size", "64", "--json", str(tmp_path / "memory.json")],
               tmp_path)
    rows = json.loads((tmp_path / "memory.json").read_text())
    assert [row["return_predictions"] for row in rows] == [True, False]
    assert all(row["peak_rss_mb"] > 0 for row in rows)


def test_onenip_train_speed_reports_its_phases(tiny_dataset: Path, tmp_path: Path) -> None:
    run_script("onenip_train_speed.py", ["--root", str(tiny_dataset), "--categories", "brick", "grass",
                                         "--input-size", "64", "--batch-size", "2", "--steps", "2",
                                         "--json", str(tmp_path / "train.json")], tmp_path)
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["images_per_s"] > 0
    assert all(seconds >= 0 for seconds in report["phases_s"].values())


def test_diad_speed_times_inference_and_a_training_step(tmp_path: Path) -> None:
    run_script("diad_speed.py", ["--architecture", "tiny", "--input-size", "128", "--ddim-steps", "1",
                                 "--batch-sizes", "1", "--train-batch-size", "1", "--repeats", "1",
                                 "--json", str(tmp_path / "diad.json")], tmp_path)
    assert json.loads((tmp_path / "diad.json").read_text())


@pytest.mark.long
def test_diad_speed_compiles_the_ddim_loop_with_one_shared_step(tmp_path: Path) -> None:
    """``--compile``: the compiled evaluation path (2 DDIM steps sharing one compiled step) against eager."""
    run_script("diad_speed.py", ["--architecture", "tiny", "--input-size", "128", "--backbone", "resnet18",
                                 "--ddim-steps", "2", "--batch-sizes", "1", "--repeats", "1", "--compile", "default",
                                 "--skip-training", "--json", str(tmp_path / "diad.json")], tmp_path)
    report = json.loads((tmp_path / "diad.json").read_text())
    assert "train_step_s" not in report
    assert report["compiled"]["compile_s"] > 0 and report["compiled"]["ms_per_image"]["1"] > 0
    assert report["compiled"]["map_difference"] <= 1e-5


def test_diad_ablation_tests_each_variant(tiny_dataset: Path, tmp_path: Path) -> None:
    from anomalib.engine import Engine

    from anomalib_diad import DiAD
    from anomalib_multiclass import MultiClassAD

    model = DiAD(architecture="tiny", input_size=(128, 128), stage="autoencoder", diffusion_weights=None,
                 pre_trained=False, backbone="resnet18", ddim_steps=1, calibration_images_per_category=2,
                 visualizer=False)
    datamodule = MultiClassAD(root=tiny_dataset, categories=["brick", "grass"], train_batch_size=4, num_workers=0)
    engine = Engine(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path / "fit", logger=False,
                    enable_progress_bar=False, limit_train_batches=1)
    engine.fit(model=model, datamodule=datamodule)
    engine.trainer.save_checkpoint(tmp_path / "diad.ckpt")
    run_script("diad_ablation.py", ["--checkpoint", str(tmp_path / "diad.ckpt"), "--root", str(tiny_dataset),
                                    "--categories", "brick", "grass", "--output", str(tmp_path / "ablation"),
                                    "--variants", '{"name": "as trained"}', '{"name": "sigma 2", "sigma": 2.0}'],
               tmp_path)
    report = json.loads((tmp_path / "ablation" / "ablation.json").read_text())
    assert set(report) == {"as trained", "sigma 2"}
    assert all(0 <= entry["mean/image_AUROC"] <= 1 for entry in report.values())


@pytest.mark.long
def test_ddp_equality_compares_two_processes_with_one(tiny_dataset: Path, tmp_path: Path) -> None:
    run_script("ddp_equality.py", ["--root", str(tiny_dataset), "--categories", "brick", "grass", "--epochs", "1",
                                   "--output", str(tmp_path / "ddp")], tmp_path)
    report = json.loads((tmp_path / "ddp" / "ddp_equality.json").read_text())
    assert all(row["ranks_identical"] for row in report["constants"])
    assert {row["category"] for row in report["metrics"]} >= {"brick", "grass"}
    assert "| constant |" in (tmp_path / "ddp" / "ddp_equality.md").read_text()


def test_gpu_command_runs_every_section_on_the_cpu(tiny_dataset: Path, tmp_path: Path) -> None:
    """gpu.py with tiny arguments on the CPU: inference (OneNIP, DiAD), training throughput and quality, one report."""
    run_script("gpu.py", ["--root", str(tiny_dataset), "--categories", "brick", "grass", "--output", str(tmp_path),
                          "--device", "cpu", "--backbone", "tf_efficientnet_lite0", "--onenip-input-size", "64",
                          "--prompt-categories", "3", "--batch-sizes", "2", "--precisions", "fp32",
                          "--diad-architectures", "tiny", "--diad-input-size", "128", "--diad-backbone", "resnet18",
                          "--diad-batch-sizes", "1", "--diad-target-batch", "1", "--ddim-steps", "1",
                          "--repeats", "1", "--input-size", "128",
                          "--train-diad-architecture", "tiny", "--train-backbones", "tf_efficientnet_lite0",
                          "--train-batch-sizes", "2", "--train-steps", "2", "--warmup-steps", "1", "--num-workers", "0",
                          "--quality-epochs", "1", "--quality-options", json.dumps({"patch_memory_size": 256})],
               tmp_path)
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert {row["path"] for row in report["inference"]} >= {"onenip_bank", "onenip_official", "diad", "diad_official"}
    assert {row["run"] for row in report["inference"] if row["path"] == "diad"} == {"diad_tiny"}
    assert [(row["model"], row["batch_size"]) for row in report["training"]] == [("OneNIP", 2), ("DiAD", 2)]
    assert all(row["images_per_s"] > 0 for row in report["training"]), "ThroughputMonitor measured nothing"
    assert set(report["quality"]["per_category"]) == {"brick", "grass"}
    assert report["skipped"] == [] and report["targets"]
    assert "## Training throughput" in (tmp_path / "gpu.md").read_text()


def test_gpu_command_stops_a_script_at_the_budget_end(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu

    budget = gpu.Budget(1.0)
    assert not budget.run_script("sleeping", [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "log")
    assert budget.skipped == ["sleeping (stopped at the budget's end)"]
    assert not budget.allows("next step") and budget.skipped[-1] == "next step"


def test_gpu_command_measures_the_targets_first_and_the_rest_of_the_grid_last(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu

    args = argparse.Namespace(backbone="b4", onenip_input_size=256, prompt_categories=15, batch_sizes=[1, 32],
                              diad_architectures=["small", "sd15"], diad_input_size=256, diad_backbone="lite0",
                              ddim_steps=[1, 2, 10], diad_batch_sizes=[1, 16, 32], diad_target_batch=16)

    def grid(runs: list[tuple[str, str, list[str]]]) -> list[tuple[str, str, str, str]]:
        """(log name, run label, --ddim-steps, --diad-batch-sizes) of the DiAD runs."""
        return [(name, run, arguments[arguments.index("--ddim-steps") + 1],
                 " ".join(arguments[arguments.index("--diad-batch-sizes") + 1:arguments.index("--ddim-steps")]))
                for name, run, arguments in runs if run != "onenip"]

    first, last = gpu.speed_runs(args, grid=False), gpu.speed_runs(args, grid=True)
    assert first[0][:2] == ("onenip", "onenip") and "onenip" not in [run for _, run, _ in last]
    assert grid(first) == [("diad_small_10_steps_batch_16", "diad_small", "10", "16")]
    assert grid(last) == [("diad_sd15_10_steps_batch_16", "diad_sd15", "10", "16")] + [
        (f"diad_{architecture}_{steps}_steps_batch_{batches.replace(' ', '_')}", f"diad_{architecture}", steps, batches)
        for architecture in ("small", "sd15")
        for steps, batches in (("1", "1 16 32"), ("2", "1 16 32"), ("10", "1 32"))]

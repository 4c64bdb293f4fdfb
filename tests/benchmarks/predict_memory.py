"""Peak memory of `anomalib predict` on a folder of N images, to see whether prediction streams.

    python tests/benchmarks/predict_memory.py --checkpoint CKPT --model OneNIP --counts 500 5000

Writes N copies (slightly varied) of one texture image at ``--image-size`` into a temporary folder,
then runs ``anomalib predict --ckpt_path CKPT --data FOLDER`` in a subprocess under ``/usr/bin/time``
for each count, with anomalib's default (``return_predictions`` on: Lightning keeps every output
in memory to return it) and with ``--return_predictions false``. Prints peak RSS and wall time.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder: Path, count: int, size: int) -> None:
    """``count`` RGB PNGs of ``size`` px: one random texture with a different brightness offset each."""
    folder.mkdir(parents=True, exist_ok=True)
    base = np.random.default_rng(0).integers(0, 200, (size, size, 3), dtype=np.uint8)
    for index in range(count):
        Image.fromarray(base + np.uint8(index % 50)).save(folder / f"{index:05d}.png")


def peak_rss_and_wall(command: list[str], cwd: Path) -> tuple[float, float]:
    """Run ``command`` under ``/usr/bin/time``: (peak RSS in MB, wall seconds)."""
    result = subprocess.run(["/usr/bin/time", "-f", "%M %e", *command], cwd=cwd, capture_output=True, text=True,
                            check=False, env={"HF_HUB_OFFLINE": "1", "PATH": str(Path(sys.executable).parent)})
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    kilobytes, seconds = re.findall(r"^(\d+) ([\d.]+)$", result.stderr, flags=re.MULTILINE)[-1]
    return int(kilobytes) / 1024, float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--model", default="OneNIP")
    parser.add_argument("--counts", type=int, nargs="+", default=[500, 5000])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    anomalib = str(Path(sys.executable).with_name("anomalib"))
    work = Path(tempfile.mkdtemp(prefix="predict_memory_"))
    results = []
    for count in args.counts:
        folder = work / f"images_{count}"
        write_images(folder, count, args.image_size)
        for keep in (True, False):
            command = [anomalib, "predict", "--model", args.model, "--model.pre_trained", "false",
                       "--model.visualizer", "false", "--ckpt_path", str(args.checkpoint), "--data", str(folder),
                       "--return_predictions", str(keep).lower(), "--trainer.enable_progress_bar", "false",
                       "--default_root_dir", str(work / "runs")]
            rss, wall = peak_rss_and_wall(command, work)
            results.append({"images": count, "return_predictions": keep, "peak_rss_mb": round(rss), "wall_s": wall})
            print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(folder)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()

"""A tiny synthetic nnU-Net dataset (bright discs on noise) for the demo, tests and benchmark.

`make_disc_dataset` writes ``DatasetNNN_Disc`` in nnU-Net's raw format: 2D PNG
cases read by nnU-Net's natural-image reader, one label (the disc).
`plan_and_preprocess` runs ``nnUNetv2_plan_and_preprocess`` for the ``2d``
configuration in a subprocess, with one worker (it peaks at about 1.6 GB).
Needs numpy and Pillow (both come with nnunetv2), not torch: it imports nothing else of
this package, so it loads before (and without) the trainer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["dataset_name", "make_disc_dataset", "nnunet_env", "plan_and_preprocess"]


def dataset_name(dataset_id: int, name: str = "Disc") -> str:
    """nnU-Net's folder name for a dataset id, e.g. ``Dataset042_Disc``."""
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be between 1 and 999, but got {dataset_id}.")
    return f"Dataset{dataset_id:03d}_{name}"


def make_disc_dataset(
    raw_dir: Path,
    dataset_id: int = 42,
    *,
    cases: int = 10,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write `cases` ``size`` x ``size`` grayscale cases, one bright disc each; return the folder.

    The disc's centre, radius and brightness vary per case, and the image has
    Gaussian noise and a soft edge, so that a few epochs learn something but
    not everything.
    """
    if cases < 2 or size < 16:
        raise ValueError(f"cases must be >= 2 and size >= 16, but got {cases} and {size}.")
    folder = Path(raw_dir) / dataset_name(dataset_id)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for case in range(cases):
        radius = rng.uniform(0.12, 0.28) * size
        cy, cx = rng.uniform(radius + 2, size - radius - 2, size=2)
        distance = np.hypot(yy - cy, xx - cx)
        label = (distance <= radius).astype(np.uint8)
        brightness = rng.uniform(90.0, 150.0)
        edge = 1.0 / (1.0 + np.exp((distance - radius) / 1.5))
        image = 40.0 + brightness * edge + rng.normal(0.0, 18.0, size=(size, size))
        image = np.clip(image, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / "imagesTr" / f"disc_{case:03d}_0000.png")
        Image.fromarray(label).save(folder / "labelsTr" / f"disc_{case:03d}.png")
    dataset_json = {
        "channel_names": {"0": "intensity"},
        "labels": {"background": 0, "disc": 1},
        "numTraining": cases,
        "file_ending": ".png",
        "overwrite_image_reader_writer": "NaturalImage2DIO",
        "name": "Disc",
        "description": "Synthetic bright discs on noise (training-control demo and tests).",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")
    return folder


def nnunet_env(root: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: ``os.environ``) plus nnU-Net's folders under `root`, tuned for a small CPU.

    ``nnUNet_n_proc_DA=0`` gives the single-threaded augmenter (fastest on two
    cores); ``nnUNet_compile`` off, one worker for everything else.
    """
    root = Path(root)
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "nnUNet_raw": str(root / "nnUNet_raw"),
            "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
            "nnUNet_results": str(root / "nnUNet_results"),
            "nnUNet_n_proc_DA": "0",
            "nnUNet_def_n_proc": "1",
            "nnUNet_compile": "0",
        }
    )
    return env


def plan_and_preprocess(dataset_id: int, env: Mapping[str, str], *, quiet: bool = True) -> Path:
    """Plan and preprocess the ``2d`` configuration; return the preprocessed folder.

    Runs nnU-Net's own ``plan_and_preprocess`` entry point in a subprocess so that
    its memory peak and its warnings stay out of the caller.
    """
    run_env = dict(env)
    # Planning needs at least one data-augmentation worker to size the batch.
    run_env["nnUNet_n_proc_DA"] = "1"
    command = [
        sys.executable,
        "-m",
        "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
        "-d",
        str(dataset_id),
        "-c",
        "2d",
        "-np",
        "1",
        "-npfp",
        "1",
        "--no_pbar",
    ]
    result = subprocess.run(
        command,
        env=run_env,
        stdout=subprocess.PIPE if quiet else None,
        stderr=subprocess.STDOUT if quiet else None,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"nnUNetv2_plan_and_preprocess failed with exit code {result.returncode}:\n"
            f"{result.stdout or ''}"
        )
    preprocessed = Path(run_env["nnUNet_preprocessed"])
    matches = sorted(preprocessed.glob(f"Dataset{dataset_id:03d}_*"))
    if not matches:
        raise RuntimeError(f"no preprocessed dataset {dataset_id} under {preprocessed}")
    return matches[0]

"""The outcome benchmark's synthetic task: hard enough to plateau well below Dice 0.9.

`make_hard_dataset` writes ``DatasetNNN_Vessels`` in nnU-Net's raw format (2D
grayscale PNG, read by the natural-image reader), deterministic from a seed.
Each case has three foreground classes that are hard in different ways, so a
short training learns part of each and then stalls:

- ``vessel`` (thin): one to three curves 1-2 px wide, only a little brighter
  than the noise;
- ``lesion`` (small, rare): zero to three blobs of radius 1.5-3 px, with
  unlabelled look-alikes of slightly lower contrast beside them;
- ``organ`` (large, faint): an ellipse told from the background by its texture
  (stripes) more than by its mean intensity.

The classes are imbalanced (organ pixels outnumber lesion pixels about 30 to
1) and the labels are noisy: some lesions are left unlabelled, and the organ's
outline is drawn 1 px too large or too small at random, as annotators do.
Needs numpy and Pillow only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["LABELS", "TASK_NAME", "make_hard_dataset"]

TASK_NAME = "Vessels"
LABELS = {"background": 0, "vessel": 1, "lesion": 2, "organ": 3}
#: Share of lesions left out of the label (missing annotations).
MISSED_LESION_SHARE = 0.2


def make_hard_dataset(
    raw_dir: Path,
    dataset_id: int,
    *,
    cases: int = 40,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write `cases` ``size`` x ``size`` cases of the hard task under `raw_dir`; return the folder.

    The same arguments always write the same bytes: case k is drawn from a
    generator seeded by (seed, k), so a dataset of more cases keeps the first ones.
    """
    if cases < 5 or size < 32:
        raise ValueError(f"cases must be >= 5 and size >= 32, but got {cases} and {size}.")
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be between 1 and 999, but got {dataset_id}.")
    folder = Path(raw_dir) / f"Dataset{dataset_id:03d}_{TASK_NAME}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for case in range(cases):
        image, label = _case(np.random.default_rng([seed, case]), size)
        Image.fromarray(image).save(folder / "imagesTr" / f"case_{case:03d}_0000.png")
        Image.fromarray(label).save(folder / "labelsTr" / f"case_{case:03d}.png")
    dataset_json = {
        "channel_names": {"0": "intensity"},
        "labels": LABELS,
        "numTraining": cases,
        "file_ending": ".png",
        "overwrite_image_reader_writer": "NaturalImage2DIO",
        "name": TASK_NAME,
        "description": "Synthetic thin vessels, small lesions and a faint textured organ "
        f"with label noise (outcome benchmark, seed {seed}).",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")
    return folder


def _case(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8, label uint8) pair."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    label = np.zeros((size, size), np.uint8)
    # A slow intensity gradient: no single threshold separates anything.
    gy, gx = rng.normal(0.0, 0.35, size=2)
    signal = 100.0 + 20.0 * (gy * (yy / size - 0.5) + gx * (xx / size - 0.5))

    organ, organ_label = _organ(rng, yy, xx, size)
    signal = signal + organ
    label[organ_label] = LABELS["organ"]

    for _ in range(rng.integers(1, 4)):
        distance = _curve_distance(rng, yy, xx, size)
        width = rng.uniform(0.6, 1.1)
        signal = signal + 22.0 * np.exp(-((distance / width) ** 2))
        label[distance <= width] = LABELS["vessel"]

    for _ in range(rng.integers(0, 4)):
        mask, bump = _blob(rng, yy, xx, size, contrast=rng.uniform(45.0, 60.0))
        signal = signal + bump
        if rng.random() >= MISSED_LESION_SHARE:
            label[mask] = LABELS["lesion"]
    for _ in range(rng.integers(1, 3)):
        _, bump = _blob(rng, yy, xx, size, contrast=rng.uniform(20.0, 30.0))
        signal = signal + bump  # a look-alike: never labelled

    image = signal + rng.normal(0.0, 16.0, size=(size, size))
    return np.clip(image, 0, 255).astype(np.uint8), label


def _organ(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A striped ellipse (intensity added, label mask with a noisy outline)."""
    cy, cx = rng.uniform(0.3, 0.7, size=2) * size
    ay, ax = rng.uniform(0.15, 0.28, size=2) * size
    angle = rng.uniform(0.0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = dy * np.cos(angle) + dx * np.sin(angle)
    v = -dy * np.sin(angle) + dx * np.cos(angle)
    radius = np.sqrt((u / ay) ** 2 + (v / ax) ** 2)
    inside = 1.0 / (1.0 + np.exp((radius - 1.0) * 12.0))
    stripes = 14.0 * np.sin(u * rng.uniform(1.2, 1.8))
    # Annotators draw the outline a pixel off now and then.
    slack = rng.choice([-1.0, 0.0, 1.0]) / max(ay, ax)
    return inside * (stripes + 6.0), radius <= 1.0 + slack


def _curve_distance(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int
) -> np.ndarray:
    """Distance of every pixel to a random smooth curve across the image."""
    t = np.linspace(0.0, 1.0, 4 * size)
    start, end = rng.uniform(0, size, size=(2, 2))
    bend = rng.normal(0.0, size * 0.25, size=2)
    wiggle = rng.uniform(1.0, 3.0)
    phase = rng.uniform(0.0, 2 * np.pi)
    direction = end - start
    normal = np.array([-direction[1], direction[0]]) / (np.linalg.norm(direction) + 1e-9)
    points = (
        start[None, :]
        + t[:, None] * direction[None, :]
        + (4 * t * (1 - t))[:, None] * bend[None, :]
        + (3.0 * np.sin(2 * np.pi * wiggle * t + phase))[:, None] * normal[None, :]
    )
    distance = np.full(yy.shape, np.inf)
    for chunk in np.array_split(points, 8):
        d = np.hypot(yy[..., None] - chunk[:, 0], xx[..., None] - chunk[:, 1]).min(axis=-1)
        distance = np.minimum(distance, d)
    return distance


def _blob(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int, *, contrast: float
) -> tuple[np.ndarray, np.ndarray]:
    """A small soft disc: (its label mask, its intensity)."""
    radius = rng.uniform(1.5, 3.0)
    cy, cx = rng.uniform(radius + 2, size - radius - 2, size=2)
    distance = np.hypot(yy - cy, xx - cx)
    return distance <= radius, contrast / (1.0 + np.exp((distance - radius) / 0.7))

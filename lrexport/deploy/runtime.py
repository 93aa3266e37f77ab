"""Torch-free inference on exported artifacts: numpy, Pillow and one runtime only.

An artifact directory holds meta.json (input shape, normalisation, class names) beside
the ONNX graphs and the target runtime's own files; this module loads it, preprocesses image files
the way validation did (resize the shorter side, center crop, scale to [0, 1], normalise) and
returns top-k classes. The model runs on the runtime the artifacts were exported for where its
backend serves its own files torch-free (``BackendEntry.serves``), else the ONNX graph on the
reference ONNX runtime. Nothing here may import torch: it is what runs on the edge device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LrexportError
from .artifacts import META_FILE
from .backends import ONNX_REFERENCE, RUNTIMES, backend_of
from .backends.base import run_batched


class ImageError(LrexportError):
    """A file that cannot be read as an image."""


def load_meta(artifacts_dir: str | Path) -> dict:
    path = Path(artifacts_dir) / META_FILE
    if not path.is_file():
        raise LrexportError(f"{artifacts_dir} is not an artifact directory (no {META_FILE}); run `lrexport export` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LrexportError(f"{path} is not valid JSON: {e}") from None


# -- preprocessing -------------------------------------------------------------------------
def _resize_shorter(img, size: int):
    from PIL import Image

    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img.resize(new, Image.BILINEAR)


def _center_crop(img, height: int, width: int):
    w, h = img.size
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return img.crop((left, top, left + width, top + height))


def preprocess(path: str | Path, meta: dict) -> np.ndarray:
    """One image file → a float32 C×H×W array, as the run's validation transform made it."""
    from PIL import Image, UnidentifiedImageError

    inp = meta["input"]
    _, height, width = inp["shape"][1:]
    try:
        with Image.open(path) as img:
            img = img.convert(inp.get("color", "RGB"))  # "RGB", or "L" for a one-channel model
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    # validation resized the shorter side to meta's resize (0: none) before cropping;
    # an image smaller or larger than the crop is brought to the crop size first
    resize = inp.get("resize") or 0
    if resize:
        img = _resize_shorter(img, resize)
    elif img.size != (width, height):
        img = _resize_shorter(img, max(height, width))
    img = _center_crop(img, height, width)
    x = np.asarray(img, dtype=np.float32).reshape(height, width, -1) / 255.0
    x = (x - np.asarray(inp["mean"], np.float32)) / np.asarray(inp["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class Prediction:
    image: str
    top: list[tuple[str, float]]  # (class name, probability), best first


class Classifier:
    """The low-rank model of an artifact directory, ready to classify image files."""

    def __init__(self, artifacts_dir: str | Path, threads: int | None = None, model: str = "lowrank"):
        self.meta = load_meta(artifacts_dir)
        runtime = RUNTIMES.get(self.meta.get("runtime"))
        serving = runtime.name if runtime is not None and runtime.serves else ONNX_REFERENCE
        self.runner = backend_of(serving).serve(Path(artifacts_dir), self.meta, model, threads)
        self.class_names = list(self.meta["class_names"])

    def predict(self, images: list[str | Path], top_k: int = 5) -> list[Prediction]:
        if top_k < 1:
            raise LrexportError(f"top-k must be ≥ 1; got {top_k}")
        x = np.stack([preprocess(p, self.meta) for p in images])
        probs = softmax(run_batched(self.runner.run, x, self.runner.batch))
        k = min(top_k, probs.shape[1])
        order = np.argsort(-probs, axis=1)[:, :k]
        return [
            Prediction(str(p), [(self.class_names[j], float(probs[i, j])) for j in order[i]])
            for i, p in enumerate(images)
        ]


def infer(artifacts_dir: str | Path, images: list[str | Path], top_k: int = 5, threads: int | None = None) -> list[Prediction]:
    """Top-k classes of each image file through the exported low-rank model."""
    return Classifier(artifacts_dir, threads).predict(images, top_k)

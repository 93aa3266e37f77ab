"""Torch-free inference on exported artifacts: onnxruntime, numpy and Pillow only.

An artifact directory holds meta.json (input shape, normalisation, class names) beside
model.onnx; this module loads it, preprocesses image files the way validation did
(resize the shorter side, center crop, scale to [0, 1], normalise) and returns top-k classes.
Nothing here may import torch: it is what runs on the edge device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LrexportError

META_FILE = "meta.json"


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


class OrtRunner:
    """One onnxruntime session (CPU provider unless told otherwise); ``run(x) -> logits`` for a float32 NCHW batch."""

    clock = "wall"
    spinning = "during runs only"  # as recorded in verify.json and the benchmarks

    def __init__(self, model: str | Path | bytes, threads: int | None = None, precision: str = "fp32",
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.threads = threads or os.cpu_count() or 1
        self.precision = precision  # of the model it runs: an int8 model is a QDQ graph
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        # Worker threads busy-wait between the ops of a run (onnxruntime's default, and what a
        # deployed session does: a model of many small convs loses 5-10 % without it) but stop
        # when the run returns, so that sessions timed in turn do not steal each other's cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        source = model if isinstance(model, bytes) else str(model)
        try:
            self.session = ort.InferenceSession(source, opts, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own non-exported exception types
            raise LrexportError(f"onnxruntime cannot load {'the model' if isinstance(model, bytes) else model}: {e}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        # a fixed batch dimension is an int; a dynamic one is a name
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def bind(self, x: np.ndarray):
        """The call that runs ``x``, for timing (the Runner protocol of lrexport.deploy.runners)."""
        feed = {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}
        return lambda: self.session.run(None, feed)

    def settings(self) -> dict:
        import onnxruntime

        from .timing import cpu_name

        return {"runtime": "ort", "version": onnxruntime.__version__, "device": cpu_name(),
                "provider": self.session.get_providers()[0], "threads": self.threads, "precision": self.precision,
                "spinning": self.spinning}


def run_batched(run, x: np.ndarray, batch: int | None, chunk: int = 64) -> np.ndarray:
    """Run ``x`` through ``run`` in chunks; a fixed-batch model gets its last chunk zero-padded."""
    size = batch or chunk
    outs = []
    for start in range(0, len(x), size):
        part = x[start:start + size]
        n = len(part)
        if batch and n < batch:
            part = np.concatenate([part, np.zeros((batch - n, *part.shape[1:]), part.dtype)])
        outs.append(run(part)[:n])
    return np.concatenate(outs)


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
        entry = self.meta["models"][model]
        self.runner = OrtRunner(Path(artifacts_dir) / entry["file"], threads)
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

"""int8 calibration data: fixed-size batches of preprocessed images, and a calibration cache file.

``CalibrationReader`` needs no runtime and no GPU: it cuts images into fixed-size, contiguous
float32 NCHW batches and reads/writes the cache file a runtime's own calibrator may keep.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import LrexportError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class CalibrationError(LrexportError):
    """Calibration images that are missing or do not fit the model's input."""


def _as_chw(item) -> np.ndarray:
    """One sample → a float32 C×H×W array; accepts (image, label) pairs and CPU tensors."""
    if isinstance(item, (tuple, list)):
        item = item[0]
    arr = np.asarray(item, dtype=np.float32)
    if arr.ndim != 3:
        raise CalibrationError(f"a calibration image must be C×H×W; got shape {arr.shape}")
    return arr


class CalibrationReader:
    """Fixed-size batches of preprocessed images, plus the calibration cache file.

    ``images`` yields C×H×W arrays (or (image, label) pairs, as a data set does), already
    preprocessed the way validation does it. The last, incomplete batch is dropped: the
    calibration profile has one batch size.
    """

    def __init__(
        self,
        images: Iterable,
        batch_size: int = 32,
        max_batches: int = 16,
        cache_path: str | Path | None = None,
    ):
        if batch_size < 1 or max_batches < 1:
            raise CalibrationError(f"calibration batch size and batch count must be ≥ 1; got {batch_size}, {max_batches}")
        self.images = images
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self._shape: tuple[int, int, int] | None = None

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_dataset(cls, dataset, **kwargs) -> "CalibrationReader":
        """From a validation data set (``lrexport.data.build_datasets``): its transform preprocesses."""
        return cls((dataset[i] for i in range(len(dataset))), **kwargs)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        input_shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        resize: int = 0,
        **kwargs,
    ) -> "CalibrationReader":
        """From image files under ``folder`` (recursively, sorted), preprocessed as ``lrexport infer`` does."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CalibrationError(f"calibration folder not found: {folder}")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CalibrationError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
        # the same preprocessing as inference: calibration must see what the engine will see
        from .runtime import preprocess

        meta = {"input": {"shape": [1, *input_shape], "mean": list(mean), "std": list(std), "resize": resize,
                          "color": "RGB" if input_shape[0] == 3 else "L"}}
        return cls((preprocess(f, meta) for f in files), **kwargs)

    # -- batches -----------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, int, int] | None:
        """C×H×W of the images, known once the first batch was made."""
        return self._shape

    def batches(self) -> Iterator[np.ndarray]:
        """Up to ``max_batches`` contiguous float32 arrays of shape (batch_size, C, H, W)."""
        buf: list[np.ndarray] = []
        made = 0
        for item in self.images:
            arr = _as_chw(item)
            if self._shape is None:
                self._shape = arr.shape
            elif arr.shape != self._shape:
                raise CalibrationError(f"calibration images differ in shape: {self._shape} and {arr.shape}")
            buf.append(arr)
            if len(buf) == self.batch_size:
                yield np.ascontiguousarray(np.stack(buf), dtype=np.float32)
                buf, made = [], made + 1
                if made == self.max_batches:
                    return
        if made == 0:
            raise CalibrationError(
                f"calibration needs at least {self.batch_size} images (one batch); got {len(buf)}"
            )

    def materialize(self) -> list[np.ndarray]:
        """All batches as a list, so that they can be replayed (the images iterable may be one-shot)."""
        batches = list(self.batches())
        self.images = [img for batch in batches for img in batch]
        return batches

    def check_input(self, input_shape: Sequence[int]) -> None:
        """Raise unless the images fit a model input of shape (N, C, H, W)."""
        if self._shape is None:
            self.materialize()
        if tuple(input_shape[1:]) != self._shape:
            raise CalibrationError(
                f"calibration images are {self._shape} (C×H×W) but the model input is {tuple(input_shape[1:])}"
            )

    # -- cache -------------------------------------------------------------------------------
    def read_cache(self) -> bytes | None:
        """The calibration table from an earlier build, if the cache file exists."""
        if self.cache_path is None or not self.cache_path.is_file():
            return None
        return self.cache_path.read_bytes()

    def write_cache(self, data: bytes) -> None:
        """Write the table atomically, so that an interrupted build never leaves half a cache."""
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_path.parent, prefix=f".{self.cache_path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(bytes(data))
            os.replace(tmp, self.cache_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

"""Write scikit-learn's 1,797 handwritten digits as an ImageFolder: real images without a download.

Each 8×8 grey digit is scaled to 32×32 RGB (nearest neighbour) and saved as PNG under
ROOT/train/<digit>/ and ROOT/val/<digit>/, every fifth image of each class to val.

    pip install scikit-learn && python benchmarks/digits/make_folder.py data/digits
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: Path, size: int = 32) -> tuple[int, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = {"train": 0, "val": 0}
    seen: dict[int, int] = {}
    for image, label in zip(digits.images, digits.target):
        k = seen[label] = seen.get(label, -1) + 1
        split = "val" if k % 5 == 4 else "train"
        grey = np.uint8(np.round(image * 255 / 16))
        path = root / split / str(label) / f"{k:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grey).resize((size, size), Image.NEAREST).convert("RGB").save(path)
        counts[split] += 1
    return counts["train"], counts["val"]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    train, val = write_digits(Path(sys.argv[1]))
    print(f"{sys.argv[1]}: {train} train and {val} val images in 10 classes")

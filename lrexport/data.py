"""Data sets: CIFAR-10, ImageNet, any ImageFolder, and a built-in learnable synthetic set.

Augmentations follow the paper (DESIGN §4): CIFAR RandomCrop(32, 4) + flip; ImageNet
RandomResizedCrop(224) + flip, validation Resize(256) + CenterCrop(224).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from .errors import DataError

if TYPE_CHECKING:  # torch loads on first use: recipe validation (and its errors) stays fast
    import torch
    from torch.utils.data import Dataset, TensorDataset
    from torchvision import transforms as T

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SYNTHETIC_MEAN, SYNTHETIC_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
DATASETS = ("synthetic", "cifar10", "imagenet", "imagefolder")
CHANNELS = (0, 1, 3)


def resolve_input(cfg: DataConfig, model_input: dict | None) -> DataConfig:
    """``cfg`` with the input settings it leaves open (0, []) taken from the model's own (``model_input``:
    channels, image_size, mean, std, as timm's pretrained config gives them); the rest stay the data set's."""
    if not model_input:
        return cfg
    changes = {key: model_input[key] for key in ("channels", "image_size", "mean", "std") if not getattr(cfg, key)}
    if cfg.channels and changes.get("channels", cfg.channels) != len(model_input["mean"]):  # the recipe's channel count wins
        changes.pop("mean", None), changes.pop("std", None)
    return dataclasses.replace(cfg, **changes)


def normalisation(cfg: DataConfig, mean: tuple, std: tuple) -> tuple[tuple, tuple]:
    """The recipe's mean/std, else the data set's (``mean``, ``std``), for ``cfg``'s channel count
    (a grayscale input takes the average of RGB statistics)."""
    channels = cfg.channels or 3
    if cfg.mean:
        return tuple(cfg.mean), tuple(cfg.std)
    if channels != len(mean):
        return (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    return tuple(mean), tuple(std)


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    root: str = "data"
    download: bool = False
    batch_size: int = 100
    eval_batch_size: int = 0  # 0: same as batch_size
    workers: int = 0
    image_size: int = 0  # 0: the model's (timm's pretrained config), else the data set's own (32 CIFAR/synthetic, 224 ImageNet/ImageFolder)
    channels: int = 0  # 1 (grayscale) or 3 (RGB); 0: the model's, else 3
    mean: list[float] = field(default_factory=list)  # per channel, of pixels in [0, 1]; []: the model's, else the data set's
    std: list[float] = field(default_factory=list)
    augment: bool = True
    # synthetic set only
    num_classes: int = 10
    train_size: int = 2000
    val_size: int = 500
    seed: int = 0


@dataclass
class DataInfo:
    """What later stages need to know about the data, without the data itself."""

    num_classes: int
    class_names: list[str]
    input_size: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]  # per channel
    std: tuple[float, ...]
    resize: int = 0  # validation resize before the center crop (0: none)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "num_classes": self.num_classes, "class_names": self.class_names, "input_size": list(self.input_size),
            "mean": list(self.mean), "std": list(self.std), "resize": self.resize,
        }


# -- synthetic ---------------------------------------------------------------------------
def _class_templates(num_classes: int, size: int, gen: torch.Generator, channels: int = 3) -> torch.Tensor:
    """Per class: a colour and a sum of three oriented sinusoids (procedural, seeded)."""
    import torch

    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    templates = torch.empty(num_classes, channels, size, size)
    for k in range(num_classes):
        pattern = torch.zeros(size, size)
        for _ in range(3):
            angle = torch.rand((), generator=gen) * math.pi
            freq = 1.0 + 3.0 * torch.rand((), generator=gen)
            phase = 2 * math.pi * torch.rand((), generator=gen)
            pattern += torch.sin(2 * math.pi * freq * (xx * torch.cos(angle) + yy * torch.sin(angle)) + phase)
        colour = 0.3 + 0.7 * torch.rand(3, 1, 1, generator=gen)
        # grayscale: the colour's mean, so that the first channel count drawn keeps the same random sequence
        templates[k] = 0.5 + 0.15 * (colour if channels == 3 else colour.mean(0, keepdim=True)) * pattern
    return templates


def synthetic_split(cfg: DataConfig, train: bool) -> TensorDataset:
    """Noisy, randomly shifted and flipped copies of per-class templates, values in [0, 1].

    Classes and samples depend only on ``cfg.seed``: the same recipe sees the same data.
    """
    import torch
    from torch.utils.data import TensorDataset

    size = cfg.image_size or 32
    gen = torch.Generator().manual_seed(cfg.seed)
    templates = _class_templates(cfg.num_classes, size, gen, cfg.channels or 3)
    n = cfg.train_size if train else cfg.val_size
    gen.manual_seed(cfg.seed * 7919 + (1 if train else 2))
    labels = torch.randint(cfg.num_classes, (n,), generator=gen)
    images = templates[labels]
    shifts = torch.randint(-size // 8, size // 8 + 1, (n, 2), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    for i in range(n):
        img = torch.roll(images[i], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
        images[i] = img.flip(-1) if flips[i] else img
    images = images * (0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen))
    images = images + 0.25 * torch.randn(images.shape, generator=gen)
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in normalisation(cfg, SYNTHETIC_MEAN, SYNTHETIC_STD))
    return TensorDataset((images.clamp(0, 1) - mean) / std, labels)


# -- real data sets ----------------------------------------------------------------------
def _cifar10(cfg: DataConfig):
    from torchvision import datasets, transforms as T

    root = Path(cfg.root)
    mean, std = normalisation(cfg, CIFAR_MEAN, CIFAR_STD)
    norm = T.Normalize(mean, std)
    gray = _to_channels(cfg)
    train_tf = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if cfg.augment else []
    if not cfg.download and not (root / "cifar-10-batches-py").is_dir():
        raise DataError(
            f"CIFAR-10 not found: looked for {root / 'cifar-10-batches-py'}; set data.download = true "
            f"(or --set data.download=true) or extract cifar-10-python.tar.gz under {root}"
        )
    try:
        train = datasets.CIFAR10(str(root), train=True, download=cfg.download, transform=T.Compose([*gray, *train_tf, T.ToTensor(), norm]))
        val = datasets.CIFAR10(str(root), train=False, download=cfg.download, transform=T.Compose([*gray, T.ToTensor(), norm]))
    except (RuntimeError, OSError) as e:
        raise DataError(f"CIFAR-10 under {root} could not be loaded or downloaded: {e}") from None
    info = DataInfo(10, list(train.classes), (cfg.channels or 3, 32, 32), mean, std)
    return train, val, info


def _to_channels(cfg: DataConfig) -> list:
    """The transform that makes grayscale images of RGB files where the recipe asks for one channel."""
    from torchvision import transforms as T

    return [T.Grayscale(1)] if cfg.channels == 1 else []


def imagenet_transforms(cfg: DataConfig, mean: tuple, std: tuple) -> tuple[T.Compose, T.Compose, int]:
    from torchvision import transforms as T

    size = cfg.image_size or 224
    resize = int(round(size * 256 / 224))
    norm, gray = T.Normalize(mean, std), _to_channels(cfg)
    train = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if cfg.augment else [T.Resize(resize), T.CenterCrop(size)]
    val = [T.Resize(resize), T.CenterCrop(size)]
    return T.Compose([*gray, *train, T.ToTensor(), norm]), T.Compose([*gray, *val, T.ToTensor(), norm]), resize


def _image_folders(cfg: DataConfig, what: str):
    from torchvision import datasets

    root = Path(cfg.root)
    size = cfg.image_size or 224
    mean, std = normalisation(cfg, IMAGENET_MEAN, IMAGENET_STD)
    train_tf, val_tf, resize = imagenet_transforms(cfg, mean, std)
    if (root / "train").is_dir() and (root / "val").is_dir():
        try:
            train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
            val = datasets.ImageFolder(str(root / "val"), transform=val_tf)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"{what} folders under {root} are not usable: {e}") from None
        if train.classes != val.classes:
            raise DataError(f"{root}/train and {root}/val have different class folders")
        names = list(train.classes)
    elif what == "ImageNet" and (root / "ILSVRC2012_devkit_t12.tar.gz").is_file():
        try:
            train = datasets.ImageNet(str(root), split="train", transform=train_tf)
            val = datasets.ImageNet(str(root), split="val", transform=val_tf)
        except (RuntimeError, OSError) as e:
            raise DataError(f"ImageNet archives under {root} could not be read: {e}") from None
        names = [c[0] for c in train.classes]
    else:
        hint = (
            "put ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz there, or "
            "extracted train/ and val/ class folders"
            if what == "ImageNet"
            else "make train/ and val/ folders with one sub-folder of images per class"
        )
        raise DataError(f"{what} not found: looked for {root}/train and {root}/val; {hint} (data.root sets the place)")
    info = DataInfo(len(names), names, (cfg.channels or 3, size, size), mean, std, resize=resize)
    return train, val, info


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: no check
        return None


def _check_synthetic_fits(cfg: DataConfig) -> None:
    """The synthetic set lives in memory: a size that cannot fit is one DataError, not an allocator crash."""
    size = cfg.image_size or 32
    # float32 class templates, then one split's images with about two temporaries of them
    need = 4 * (cfg.channels or 3) * size * size * (cfg.num_classes + 3 * max(cfg.train_size, cfg.val_size))
    memory = _memory_bytes()
    if memory and need > memory // 2:
        raise DataError(
            f"the synthetic set ({cfg.train_size} + {cfg.val_size} images of {size}×{size}, {cfg.num_classes} classes) needs about "
            f"{need / 2**30:.3g} GiB, over half of this machine's {memory / 2**30:.3g} GiB; lower data.train_size, "
            f"data.val_size, data.image_size or data.num_classes"
        )


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset, DataInfo]:
    """(train, val, info) for a data config; missing data raises one clear DataError."""
    if cfg.dataset == "synthetic":
        _check_synthetic_fits(cfg)
        size = cfg.image_size or 32
        mean, std = normalisation(cfg, SYNTHETIC_MEAN, SYNTHETIC_STD)
        info = DataInfo(cfg.num_classes, [f"class{k}" for k in range(cfg.num_classes)], (cfg.channels or 3, size, size), mean, std)
        return synthetic_split(cfg, True), synthetic_split(cfg, False), info
    if cfg.dataset == "cifar10":
        return _cifar10(cfg)
    if cfg.dataset == "imagenet":
        return _image_folders(cfg, "ImageNet")
    if cfg.dataset == "imagefolder":
        return _image_folders(cfg, "ImageFolder data")
    raise DataError(f"unknown dataset {cfg.dataset!r}; choose from {', '.join(DATASETS)}")


def recorded_datasets(data_config: dict, where: str, **changes) -> tuple[Dataset, Dataset, DataInfo]:
    """``build_datasets`` of a data config that a run or an export recorded (``where`` names the file)."""
    try:
        cfg = DataConfig(**(data_config | changes))
    except TypeError as e:
        raise DataError(f"{where} has a data_config this lrexport cannot read: {e}") from None
    return build_datasets(cfg)


def recorded_validation_set(data_config: dict, where: str) -> Dataset:
    """The validation set of a recorded data config, with its validation transform."""
    return recorded_datasets(data_config, where)[1]

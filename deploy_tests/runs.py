"""What the deploy tests share: the settings of their tiny runs (which the training pipeline writes) and helpers."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from lrexport.deploy.export import ExportConfig
from lrexport.deploy.planning.plan import TuneConfig
from lrexport.rundir import open_run
from lrexport.train.checkpoint import load_model

IMAGE_SIZE = 16
# The deploy tests' runs: the shared tiny recipe (tiny_recipe) at 16×16 with "B" shortcuts and on the CPU,
# like the exports. Energy 0.2 leaves some layers factored and some dense; two dense epochs at lr 0.1
# (16 steps) lift the model clear of chance, so that cutting every layer to rank 1 costs accuracy
# (test_tune_below): top-1 about 45 % on the validation images, 6 % at rank 1.
TINY_RUN = (f"data.image_size={IMAGE_SIZE}", "prune.energy=0.2", 'model.kwargs.shortcut="B"',
            "phases.dense.epochs=2", "phases.dense.lr=0.1", "device=cpu")
NO_TUNE = TuneConfig(enabled=False)
UNTUNED = ExportConfig(tune=NO_TUNE)  # the MACs rule: what the structural tests check against


def expected_conv_shapes(run, layers, mode) -> list[tuple]:
    """Conv weight shapes the export should hold, from the dense geometry and the planned ranks."""
    dense, _ = load_model(run / "checkpoints/dense.pt")
    convs = {name: m for name, m in dense.named_modules() if isinstance(m, torch.nn.Conv2d)}
    shapes = []
    for layer in layers:
        n, c, kh, kw = convs[layer["name"]].weight.shape
        r = layer["deployed_rank"]
        if layer["dense"]:
            shapes.append((n, c, kh, kw))
        elif mode == "channel":
            shapes += [(r, c, kh, kw), (n, r, 1, 1)]
        else:
            shapes += [(r, c, kh, 1), (n, r, 1, kw)]
    return sorted(shapes)


def one_line(res) -> str:
    """The CLI's error output of ``res`` (a click CliRunner result): one line starting with "error:"."""
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


REPO = Path(__file__).resolve().parents[1]


def no_torch_env(tmp_path) -> dict:
    """An environment in which `import torch` fails, as on an edge device without it."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "torch.py").write_text("raise ImportError('torch is not installed on this device')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), str(REPO)])
    return env


def save_val_image(run, index: int, path: Path) -> int:
    """Write validation image ``index`` as an 8-bit PNG, RGB or grayscale (undoing the normalisation); returns its label."""
    summary = open_run(run)
    x, y = summary.validation_set()[index]
    mean, std = (torch.tensor(summary.data_info[k]).view(-1, 1, 1) for k in ("mean", "std"))
    pixels = ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)
    return int(y)

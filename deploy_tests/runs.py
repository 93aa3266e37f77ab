"""Build small but real run directories, the way the training pipeline lays them out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

import lrexport
from lrexport.data import DataConfig, build_datasets
from lrexport.deploy.export import ExportConfig
from lrexport.deploy.plan import TuneConfig
from lrexport.lowrank import decompose, prune
from lrexport.rundir import open_run
from lrexport.train.checkpoint import load_model, model_arch, save_checkpoint

IMAGE_SIZE = 16
NO_TUNE = TuneConfig(enabled=False)
UNTUNED = ExportConfig(tune=NO_TUNE)  # the MACs rule: what the structural tests check against


def _train(model, loader, steps: int, lr: float) -> None:
    """A few SGD steps: enough to move BN statistics and shape the spectra."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    done = 0
    while done < steps:
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    model.eval()


def make_run(root: Path, mode: str = "channel", energy: float = 0.2, shortcut: str = "B", val_size: int = 64) -> Path:
    """runs/<name>/ with summary.json, checkpoints/dense.pt and checkpoints/finetune_best.pt."""
    run = Path(root) / f"tiny-{mode}-{shortcut}"
    cfg = DataConfig(dataset="synthetic", train_size=256, val_size=val_size, image_size=IMAGE_SIZE, batch_size=32, seed=1)
    train_ds, _, info = build_datasets(cfg)
    loader = DataLoader(train_ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    kwargs = {"shortcut": shortcut}
    model = lrexport.create_model("cifar_resnet20", num_classes=info.num_classes, **kwargs)
    _train(model, loader, steps=24, lr=0.05)
    save_checkpoint(run / "checkpoints/dense.pt", model, model_arch(model, "cifar_resnet20", info.num_classes, info.input_size, kwargs))
    decompose(model, mode)
    ranks = prune(model, energy)
    _train(model, loader, steps=8, lr=0.01)
    save_checkpoint(
        run / "checkpoints/finetune_best.pt", model, model_arch(model, "cifar_resnet20", info.num_classes, info.input_size, kwargs)
    )
    summary = {
        "name": run.name, "run_dir": str(run), "recipe_hash": f"test-{mode}",
        "data_config": vars(cfg), "data_info": info.to_dict(),
        "phases": {"prune": {"ranks": {r.name: r.after for r in ranks}}},
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return run


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
    """Write validation image ``index`` as an 8-bit PNG (undoing the normalisation); returns its label."""
    summary = open_run(run)
    x, y = summary.validation_set()[index]
    mean, std = (torch.tensor(summary.data_info[k]).view(3, 1, 1) for k in ("mean", "std"))
    pixels = ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(path)
    return int(y)

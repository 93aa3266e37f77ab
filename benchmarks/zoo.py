"""Model-zoo conformance: timm CNN families and two hand-written nets through the whole tool.

    python benchmarks/zoo.py --json zoo.json            # every model (about 20 minutes on 2 CPU cores)
    python benchmarks/zoo.py --only resnet18d,dla34     # some of them

For each model, in its own process (a crash or hang is that model's failure, not the run's):

1. decompose: every conv (channel-wise, exact SVD) must reproduce the dense model's logits
   (largest error ≤ 1e-4 of the largest logit, eval mode, one batch of noise); else the first
   layer that alone breaks it is named;
2. train: lrexport's whole method on the built-in synthetic data at small settings (SIZE×SIZE
   images, TRAIN_SIZE of them, one epoch a phase), the SVD phase at the dense phase's learning
   rate, every other setting the recipe default (scaled factor steps, divergence limits and
   recoveries on). A failure is the error's line (a divergence names its layer); recoveries
   are counted;
3. export to ONNX for onnxruntime (MACs-rule plan, no timing), which checks each graph against
   PyTorch, then verify on onnxruntime: a pass needs 0 top-1 disagreements between
   onnxruntime and PyTorch for both the low-rank and the dense model.

The table printed at the end is the one in benchmarks/README.md. Accuracy here says nothing
about the models (a few hundred synthetic images); it shows that training did not diverge.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

SIZE = 32  # image side: small enough for 20+ models in minutes, large enough for timm's 32× downsampling
TRAIN_SIZE, VAL_SIZE, BATCH = 256, 128, 32
DENSE_LR = 0.05  # the quickstart's
TIMEOUT_S = 300

# (family, timm name): the smallest variant timm has of each family
TIMM = [
    ("ResNet", "resnet18"), ("ResNet-D", "resnet18d"), ("RegNet", "regnetx_002"), ("EfficientNet", "efficientnet_b0"),
    ("MobileNetV3", "mobilenetv3_small_050"), ("GhostNet", "ghostnet_050"), ("RepVGG", "repvgg_a0"), ("ConvNeXt", "convnext_atto"),
    ("DLA", "dla34"), ("DenseNet", "densenet121"), ("Res2Net", "res2net50_14w_8s"), ("ResNeSt", "resnest14d"),
    ("CSPNet", "cs3darknet_focus_s"), ("HRNet", "hrnet_w18_small"), ("MixNet", "mixnet_s"), ("VGG", "vgg11_bn"),
    ("Inception-style (InceptionNeXt)", "inception_next_atto"), ("DPN", "dpn48b"), ("SelecSLS", "selecsls42b"),
    ("TResNet", "tresnet_m"), ("NFNet (no BatchNorm)", "nf_resnet26"),
]
OWN = [("own: no BatchNorm", "own_nobn"), ("own: BatchNorm inside, none at stem/fuse", "own_mixed")]
# timm's VGG head is a 7×7 conv of 512→4096 (103M of vgg11_bn's 133M parameters): past the time per
# model on 2 cores, so its hidden width is cut to 512 (the conv layers are vgg11_bn's)
KWARGS = {"vgg11_bn": {"mlp_ratio": 0.125}}


# -- the two hand-written nets: what a user brings (issue 34) ---------------------------------------
def own_net(kind: str, num_classes: int = 10):
    import torch
    from torch import nn

    class OwnNet(nn.Module):
        """Stem without BatchNorm, asymmetric 1×7/7×1, a dilated conv, a concat fused by a 1×1 conv with bias, a residual add."""

        def __init__(self, width: int = 32, bn: bool = True):
            super().__init__()
            w, norm = width, (nn.BatchNorm2d if bn else (lambda c: nn.Identity()))
            self.stem = nn.Conv2d(3, w, 3, padding=1)
            self.a17, self.a17_bn = nn.Conv2d(w, w, (1, 7), padding=(0, 3), bias=not bn), norm(w)
            self.a71, self.a71_bn = nn.Conv2d(w, w, (7, 1), padding=(3, 0), bias=not bn), norm(w)
            self.dil, self.dil_bn = nn.Conv2d(w, w, 3, padding=2, dilation=2, bias=not bn), norm(w)
            self.fuse = nn.Conv2d(2 * w, w, 1, bias=True)
            self.down, self.down_bn = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=not bn), norm(2 * w)
            self.head = nn.Linear(2 * w, num_classes)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            a = torch.relu(self.a71_bn(self.a71(torch.relu(self.a17_bn(self.a17(x))))))
            b = torch.relu(self.dil_bn(self.dil(x)))
            x = torch.relu(x + self.fuse(torch.cat([a, b], 1)))
            return self.head(torch.relu(self.down_bn(self.down(x))).mean((2, 3)))

    return OwnNet(bn=kind == "own_mixed")


# -- one model ----------------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def check_decompose(model, input_size) -> dict:
    """The exact SVD of every conv reproduces the dense logits; else the first layer that alone does not."""
    import torch
    from lrexport.lowrank import decompose, svd_layers

    model.eval()
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        dec = decompose(copy.deepcopy(model), "channel", input_size=input_size).eval()
        err = ((dec(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    layers = len(svd_layers(dec))
    if err <= 1e-4:
        return {"layers": layers, "decompose_error": err}
    for name, _ in svd_layers(dec):  # the first layer that alone breaks it
        with torch.no_grad():
            one = decompose(copy.deepcopy(model), "channel", include=[name], input_size=input_size).eval()
            if ((one(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item() > 1e-4:
                return {"layers": layers, "decompose_error": err, "layer": name, "reason": f"decompose: output differs by {err:.2g}"}
    return {"layers": layers, "decompose_error": err, "reason": f"decompose: output differs by {err:.2g} (no single layer does)"}


def recipe_for(key: str, own: bool, overrides: list[str]):
    from lrexport.recipe import recipe_from_dict

    return recipe_from_dict({
        "name": key, "device": "cpu", "seed": 0,
        "model": {"name": "cifar_resnet20" if own else f"timm/{key}", "kwargs": KWARGS.get(key, {})},
        "data": {"dataset": "synthetic", "image_size": SIZE, "train_size": TRAIN_SIZE, "val_size": VAL_SIZE,
                 "batch_size": BATCH, "eval_batch_size": VAL_SIZE},
        "reg": {"ortho": 1.0, "type": "hoyer", "decay": 0.3, "compile": False},
        "prune": {"energy": 1e-3},
        "phases": {"dense": {"epochs": 1, "lr": DENSE_LR, "schedule": "constant"},
                   "svd": {"epochs": 1, "lr": DENSE_LR, "schedule": "constant"},
                   "finetune": {"epochs": 1, "lr": DENSE_LR / 5, "schedule": "constant"}},
    }, f"zoo:{key}", overrides)


def conform(key: str, work: Path, overrides: list[str]) -> dict:
    """Decompose, train, export, verify one model; the row of the table."""
    import torch
    from lrexport.deploy.export import ExportConfig, export_run
    from lrexport.deploy.planning.plan import TuneConfig
    from lrexport.deploy.verify import VerifyConfig, verify_artifacts
    from lrexport.models import create_model
    from lrexport.train import run_recipe

    torch.set_num_threads(1)
    torch.manual_seed(0)
    own = key.startswith("own_")
    row: dict = {"model": key}
    started = time.perf_counter()
    stage = "build"
    try:
        given = own_net(key) if own else None
        dense = given if own else create_model(f"timm/{key}", num_classes=10, **KWARGS.get(key, {}))
        row["params_m"] = round(sum(p.numel() for p in dense.parameters()) / 1e6, 2)
        stage = "decompose"
        row.update(check_decompose(dense, (3, SIZE, SIZE)))
        if "reason" in row:
            return row
        stage = "train"
        run_dir = work / key
        result = run_recipe(recipe_for(key, own, overrides), run_dir, model=given)
        phases = result.summary["phases"]
        row["recoveries"] = sum(len(p.get("recoveries", [])) for p in phases.values())
        row["recovered"] = [f"{r['phase']}: {r['reason']} at {r['layer']}" for p in phases.values() for r in p.get("recoveries", [])]
        lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        epochs = [l for l in lines if "recovery" not in l]
        row["max_ortho"] = max(l.get("ortho", 0.0) for l in epochs)
        row["ce"] = {l["phase"]: round(l["ce"], 3) for l in epochs}
        row["top1"] = {k: phases[k].get("best_top1", phases[k].get("top1")) for k in ("dense", "svd", "finetune")}
        row["speedup"] = round(result.summary["macs"]["speedup"], 2)
        stage = "export"
        export_run(run_dir, config=ExportConfig(tune=TuneConfig(enabled=False)), model=given)
        stage = "verify"
        report = verify_artifacts(run_dir / "artifacts", "ort", config=VerifyConfig(warmup=1, repeats=3, batch_sizes=(1,))).report
        row["disagree"] = {m: report["accuracy"][m]["top1_disagree"] for m in ("lowrank", "dense")}
        if any(row["disagree"].values()) or report["failures"]:
            row["reason"] = f"verify: {row['disagree']} top-1 disagreements; {'; '.join(report['failures'])}"
        elif not all(math.isfinite(v) for v in row["ce"].values()):
            row["reason"] = "train: a non-finite epoch loss"
    except Exception as e:  # noqa: BLE001 (any failure is this model's row)
        row["reason"] = f"{stage}: {_first_line(e)}"
        row["layer"] = getattr(e, "layer", None) or row.get("layer")
        if os.environ.get("ZOO_TRACEBACK"):
            traceback.print_exc()
    finally:
        row["seconds"] = round(time.perf_counter() - started, 1)
    return row


# -- the run ------------------------------------------------------------------------------------------
def run_one_in_subprocess(key: str, work: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--one", key, "--work", str(work), *(f"--set={o}" for o in overrides)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return {"model": key, "reason": f"timeout: over {TIMEOUT_S} s", "seconds": TIMEOUT_S}
    rows = [l for l in proc.stdout.splitlines() if l.startswith("ZOO ")]
    if not rows:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": key, "reason": f"crash (exit {proc.returncode}): {tail[:200]}", "seconds": round(time.perf_counter() - started, 1)}
    return json.loads(rows[-1][4:])


def table(rows: list[dict], families: dict[str, str]) -> str:
    """The markdown table of benchmarks/README.md."""
    lines = ["| family | model | params M | SVD layers | decompose err | recoveries | max ortho | CE dense → svd → finetune | "
             "top-1 % dense / finetune | MACs x | ORT top-1 disagree (low-rank / dense) | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key, ce, top, d = r["model"], r.get("ce", {}), r.get("top1"), r.get("disagree")
        result = "pass" if "reason" not in r else f"**fail**: {r['reason']}" + (f" (layer {r['layer']})" if r.get("layer") else "")
        cells = [
            families[key], key + "".join(f", {k} {v}" for k, v in KWARGS.get(key, {}).items()), r.get("params_m", ""), r.get("layers", ""),
            f"{r['decompose_error']:.1e}" if "decompose_error" in r else "", r.get("recoveries", ""),
            f"{r['max_ortho']:.2g}" if "max_ortho" in r else "", " → ".join(f"{ce[p]:.3g}" for p in ("dense", "svd", "finetune") if p in ce),
            f"{top['dense']:.1f} / {top['finetune']:.1f}" if top else "", r.get("speedup", ""),
            f"{d['lowrank']} / {d['dense']}" if d else "", result,
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated model keys (timm names, own_nobn, own_mixed)")
    ap.add_argument("--json", default="", help="write the rows here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe change for every model, e.g. train.scale_factor_grads=false")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    ap.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("ZOO " + json.dumps(conform(args.one, Path(args.work), args.set)), flush=True)
        return
    families = {key: fam for fam, key in TIMM + OWN}
    keys = [k for k in args.only.split(",") if k] or list(families)
    unknown = [k for k in keys if k not in families]
    if unknown:
        sys.exit(f"error: unknown model key(s) {', '.join(unknown)}; known: {', '.join(families)}")
    import platform

    import torch
    import timm

    print(f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, 1 thread per model; {SIZE}×{SIZE} synthetic images, {TRAIN_SIZE} train / {VAL_SIZE} val, "
          f"batch {BATCH}, one epoch a phase, lr {DENSE_LR} dense and SVD"
          + (f"; --set {' '.join(args.set)}" if args.set else ""), flush=True)
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lrexport-zoo-") as work:
        for key in keys:
            row = run_one_in_subprocess(key, Path(work), args.set)
            rows.append(row)
            print(f"{key:<24} {'pass' if 'reason' not in row else 'FAIL ' + row['reason']}"
                  f"{' (layer ' + row['layer'] + ')' if row.get('layer') else ''} · {row.get('seconds')} s", flush=True)
    passed = sum("reason" not in r for r in rows)
    print(f"\n{passed}/{len(rows)} pass · {time.perf_counter() - started:.0f} s\n")
    print(table(rows, families))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

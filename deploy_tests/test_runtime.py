"""Torch-free inference: preprocessing as validation did it, `lrexport infer` without torch."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from lrexport.deploy.runtime import ImageError, Classifier, preprocess
from lrexport.train.checkpoint import load_model
from runs import no_torch_env, save_val_image


@pytest.mark.parametrize("size,resize,crop", [((40, 29), 20, 16), ((16, 16), 0, 16), ((50, 70), 0, 16)])
def test_preprocess_matches_the_validation_transform(size, resize, crop, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    meta = {"input": {"shape": [None, 3, crop, crop], "mean": mean, "std": std, "resize": resize}}
    # torchvision's validation pipeline: Resize(shorter side) + CenterCrop + ToTensor + Normalize
    tf = T.Compose([T.Resize(resize or crop), T.CenterCrop(crop), T.ToTensor(), T.Normalize(mean, std)])
    ref = tf(Image.open(path).convert("RGB")).numpy()
    np.testing.assert_allclose(preprocess(path, meta), ref, atol=1e-5)


def test_classifier_top_k_matches_pytorch(channel_export, tmp_path):
    run, result = channel_export
    path = tmp_path / "val3.png"
    save_val_image(run, 3, path)
    (pred,) = Classifier(result.out_dir, threads=1).predict([path], top_k=3)
    meta = result.meta
    x = torch.from_numpy(preprocess(path, meta))[None]
    with torch.no_grad():
        probs = load_model(run / "checkpoints/finetune_best.pt")[0].eval()(x).softmax(1)[0]
    top = probs.topk(3)
    assert [name for name, _ in pred.top] == [meta["class_names"][i] for i in top.indices]
    np.testing.assert_allclose([p for _, p in pred.top], top.values.numpy(), rtol=1e-4)


def test_infer_runs_where_torch_cannot_be_imported(channel_export, tmp_path):
    run, result = channel_export
    env = no_torch_env(tmp_path)
    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "not installed on this device" in blocked.stderr
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    for i, path in enumerate(images):
        save_val_image(run, i, path)
    proc = subprocess.run(
        [sys.executable, "-m", "lrexport", "infer", str(result.out_dir), *map(str, images), "--top-k", "2", "--threads", "1"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # the same answers as in this process, where torch is importable
    expected = Classifier(result.out_dir, threads=1).predict(images, top_k=2)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 * 3
    for k, pred in enumerate(expected):
        assert lines[3 * k].endswith(images[k].name)
        assert [line.split()[-1] for line in lines[3 * k + 1: 3 * k + 3]] == [name for name, _ in pred.top]


def test_infer_rejects_a_non_image_in_one_line(channel_export, tmp_path):
    _, result = channel_export
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    proc = subprocess.run(
        [sys.executable, "-m", "lrexport", "infer", str(result.out_dir), str(bad)],
        env=no_torch_env(tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "notes.png" in proc.stderr and "not a readable image" in proc.stderr
    with pytest.raises(ImageError):
        Classifier(result.out_dir).predict([bad])


def test_runtime_module_imports_no_torch(tmp_path):
    code = "import sys, lrexport.deploy.runtime, lrexport.deploy.timing, lrexport.cli; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], env=no_torch_env(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

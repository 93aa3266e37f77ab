"""The report's numbers come from the runs' files; its PNGs are real images of the expected size."""

import csv
import dataclasses
import json
import tomllib

import pytest
from click.testing import CliRunner
from PIL import Image, ImageStat

from lrexport import plots, seed_results
from lrexport.cli import main
from lrexport.errors import LrexportError
from lrexport.recipe import load_recipe
from lrexport.report import build_report, macs_cell, read_run
from lrexport.train import run_recipe

CHANGES = ("data.train_size=128", "data.batch_size=64", "reg.decay=0.5")  # the shared tiny recipe, half its data
VERIFY = {  # the keys lrexport.deploy.verify writes that the report reads
    "runtime": "ort", "threads": 2,
    "latency": [{"batch": 1, "wall_speedup": 1.5, "ratio": 0.5}, {"batch": 8, "wall_speedup": 2.25, "ratio": 0.75}],
    "macs": {"speedup": 3.0, "deployed_speedup": 2.9},
}



@pytest.fixture(scope="module")
def runs(tiny_recipe, tmp_path_factory):
    """Runs branched from one SVD-trained stem (left unfinished): with a verify.json, a larger e, e searched."""
    root = tmp_path_factory.mktemp("runs")
    recipe = tiny_recipe(*CHANGES)
    stem = run_recipe(load_recipe(recipe), root / "stem", stop_after="svd").run_dir
    a = run_recipe(load_recipe(recipe), root / "a", start_from=stem).run_dir
    b = run_recipe(load_recipe(recipe, ["prune.energy=0.3"]), root / "b", start_from=stem).run_dir
    auto = ['prune.energy="auto"', "prune.ladder=[0.001, 0.3]", "prune.tolerance=100.0"]  # every rung passes: 0.3
    c = run_recipe(load_recipe(recipe, auto), root / "c", start_from=stem).run_dir
    (a / "artifacts").mkdir()
    (a / "artifacts" / "verify.json").write_text(json.dumps(VERIFY))
    return {"stem": stem, "a": a, "b": b, "c": c}


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    return build_report([runs["a"], runs["b"], runs["c"]], tmp_path_factory.mktemp("report") / "out")


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def test_csv_numbers_are_the_summaries(runs, report):
    rows = {r["run"]: r for r in csv.DictReader((report.output / "report.csv").open())}
    assert set(rows) == {"a", "b", "c"}
    for name in ("a", "b", "c"):
        s, row = _summary(runs[name]), rows[name]
        recipe = tomllib.loads((runs[name] / "recipe.toml").read_text())
        assert float(row["base_top1"]) == s["base_top1"]
        assert float(row["best_top1"]) == s["best_finetune_top1"]
        assert float(row["accuracy_gain"]) == s["accuracy_gain"]
        assert float(row["top5_gain"]) == s["best_finetune_top5"] - s["base_top5"]
        assert float(row["macs_speedup"]) == s["macs_speedup"]
        assert int(row["macs"]) == s["macs"]["macs"] and int(row["dense_macs"]) == s["macs"]["dense_macs"]
        assert float(row["paper_macs_speedup"]) == s["macs"]["paper_speedup"] <= s["macs_speedup"]
        assert float(row["energy"]) == s["phases"]["prune"]["energy"]
        assert recipe["prune"]["energy"] in (float(row["energy"]), "auto")
        assert float(row["decay"]) == recipe["reg"]["decay"] == 0.5
        assert (row["model"], row["dataset"], row["decomposition"], row["regularizer"]) == ("cifar_resnet20", "synthetic", "channel", "hoyer")
    assert float(rows["b"]["energy"]) == 0.3 and float(rows["b"]["macs_speedup"]) > float(rows["a"]["macs_speedup"])
    # wall-clock speedup only where verify ran
    assert (rows["a"]["wall_speedup_b1"], rows["a"]["wall_speedup_b8"], rows["a"]["deployed_macs_speedup"]) == ("1.5", "2.25", "2.9")
    assert rows["b"]["wall_speedup_b1"] == rows["b"]["deployed_macs_speedup"] == ""
    # a searched e is reported as the value chosen
    assert float(rows["c"]["energy"]) == _summary(runs["c"])["energy_search"]["energy"] == 0.3


def test_markdown_table_and_links(runs, report):
    md = (report.output / "report.md").read_text()
    s = _summary(runs["a"])
    line = next(l for l in md.splitlines() if l.startswith("| a |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:7] == ["a", "ResNet-20", "synthetic", "channel", "hoyer", "0.5", "1.0e-02"]
    assert cells[7:11] == [f"{s['base_top1']:.2f}", f"{s['best_finetune_top1']:.2f}", f"{s['accuracy_gain']:+.2f}",
                           f"{s['best_finetune_top5'] - s['base_top5']:+.2f}"]
    assert cells[12] == "1.50× (b1), 2.25× (b8) · ort, 2 threads"
    links = [l.split("](")[1].rstrip(")") for l in md.splitlines() if l.startswith("![")]
    assert links and all((report.output / link).is_file() for link in links)
    assert {p.relative_to(report.output).as_posix() for p in report.files} == {
        "report.md", "report.csv", "tradeoff-cifar_resnet20-synthetic.png",
        "pareto-cifar_resnet20-synthetic.png",  # a run was verified: top-1 against measured speedup, with its front
        *(f"runs/{r}/{f}.png" for r in "abc" for f in ("spectra", "ranks", "macs")), "runs/c/energy.png"}


def test_macs_speedup_shows_the_papers_costing_where_it_differs(runs, report):
    md = (report.output / "report.md").read_text()
    cell = {name: next(l for l in md.splitlines() if l.startswith(f"| {name} |")).strip("|").split("|")[11].strip() for name in "ab"}
    a, b = _summary(runs["a"])["macs"], _summary(runs["b"])["macs"]
    # e = 0.01 leaves layers at or above break-even: deployed as dense convs, costed as pairs by the paper's code
    assert a["paper_speedup"] < 0.995 * a["speedup"]
    assert cell["a"] == f"{a['speedup']:.2f}× (paper's costing {a['paper_speedup']:.2f}×)"
    # e = 0.3 factors every layer below break-even: the two costings agree, one number
    assert b["paper_speedup"] == b["speedup"] and cell["b"] == f"{b['speedup']:.2f}×"
    assert "factored pair at any rank" in md
    row = read_run(runs["a"])
    for paper, shown in ((None, "2.00×"), (1.992, "2.00×"), (1.98, "2.00× (paper's costing 1.98×)")):  # None: an older summary
        assert macs_cell(dataclasses.replace(row, macs_speedup=2.0, paper_macs_speedup=paper)) == shown


def _image(path):
    image = Image.open(path)
    image.load()
    return image


def _not_blank(image):
    grey = image.convert("L")
    stat = ImageStat.Stat(grey)
    dark = sum(grey.histogram()[:200])  # pixels clearly darker than the white background
    return stat.stddev[0] > 5 and dark > 0.005 * grey.width * grey.height


def test_pngs_are_real_images_of_the_expected_size(runs, report):
    s = _summary(runs["a"])
    layers = len(s["ranks"])
    expected = {
        "tradeoff-cifar_resnet20-synthetic.png": plots.TRADEOFF_PX,
        "runs/a/spectra.png": plots.spectra_px(layers), "runs/a/ranks.png": plots.bars_px(layers),
        "runs/a/macs.png": plots.bars_px(len(s["macs"]["layers"])), "runs/c/energy.png": plots.LADDER_PX,
    }
    assert plots.TRADEOFF_PX == (880, 600) and plots.spectra_px(21) == (1200, 660) and plots.bars_px(21) == (900, 486)
    for rel, size in expected.items():
        image = _image(report.output / rel)
        assert image.format == "PNG" and image.size == size, rel
        assert _not_blank(image), rel


def test_unfinished_runs(runs, tmp_path):
    with pytest.raises(LrexportError, match="has not finished"):
        read_run(runs["stem"])
    with pytest.raises(LrexportError, match="not a run directory"):
        build_report([tmp_path], tmp_path / "out")


def test_cli_report(runs, tmp_path):
    result = CliRunner().invoke(main, ["report", str(runs["a"]), "--output", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "6 files in" in " ".join(result.output.split()) and (tmp_path / "r" / "report.md").is_file()
    missing = CliRunner().invoke(main, ["report", str(runs["stem"])])
    assert missing.exit_code == 1 and "has not finished" in missing.output


def test_seed_results_are_the_tables():
    points = seed_results.PAPER_POINTS
    assert sum(p.table == 3 for p in points) == 76 and sum(p.table in (4, 5) for p in points) == 14
    assert sum(b.table == 6 for b in seed_results.BASELINES) == 24
    r20 = [(p.decay, p.energy, p.gain, p.speedup) for p in seed_results.paper_points("ResNet-20") if p.decomposition == "channel" and p.regularizer == "hoyer"]
    assert r20 == [(0.03, 1.5e-5, 0.04, 2.20), (0.07, 6.0e-6, -0.27, 2.66), (0.1, 3.0e-6, -0.54, 2.94)]
    assert all(p.regularizer == "none" for p in points if p.decay == 0) and all(p.speedup > 1 for p in points)
    assert {b.method for b in seed_results.baselines("ResNet-50")} >= {"SFP", "CNN-FCF-A", "NISP-50-B", "C-SGD-30"}
    assert seed_results.seed_model("resnet18") == ("ResNet-18", "ImageNet")

import glob

import pytest

from lrexport.errors import RecipeError
from lrexport.recipe import BASE_KEY, load_recipe, recipe_from_dict

RECIPES = sorted(glob.glob("recipes/*.toml"))


def test_recipes_exist_for_every_seed_group():
    names = {r.split("/")[-1] for r in RECIPES}
    for depth in (20, 32, 56, 110):
        for mode in ("channel", "spatial"):
            for reg in ("hoyer", "l1", "none"):
                assert f"cifar10_resnet{depth}_{mode}_{reg}.toml" in names
    assert {"resnet18_imagenet.toml", "resnet50_imagenet.toml", "quickstart.toml"} <= names


@pytest.mark.parametrize("path", RECIPES)
def test_every_recipe_loads_and_validates(path):
    r = load_recipe(path)
    assert r.phases.svd.epochs > 0 and r.phases.finetune.epochs > 0
    assert 0 <= r.prune.energy < 1


def test_seed_settings_in_recipes():
    r = load_recipe("recipes/cifar10_resnet20_channel_hoyer.toml")
    assert (r.reg.type, r.reg.decay, r.prune.energy, r.reg.ortho) == ("hoyer", 0.03, 1.5e-5, 1.0)
    assert r.phases.svd.milestones == [81, 122] and r.data.batch_size == 100
    r = load_recipe("recipes/resnet50_imagenet.toml")
    assert (r.reg.ortho, r.model.weights, r.data.batch_size) == (10.0, "IMAGENET1K_V1", 256)  # the paper's base
    assert load_recipe("recipes/resnet50_imagenet_spatial.toml").reg.ortho == 5.0


def test_overrides_and_types():
    r = recipe_from_dict({}, overrides=["reg.decay=0.01", "phases.svd.milestones=[3, 5]", "model.name=resnet18", "data.download=true"])
    assert r.reg.decay == 0.01 and r.phases.svd.milestones == [3, 5] and r.model.name == "resnet18" and r.data.download is True
    assert isinstance(recipe_from_dict({"reg": {"decay": 1}}).reg.decay, float)
    raw = {"reg": {"decay": 0.5}}
    recipe_from_dict(raw, overrides=["reg.decay=0.1", "reg.type=l1"])
    assert raw == {"reg": {"decay": 0.5}}  # overrides never write into the caller's tables


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"phases": {"svd": {"lrr": 0.1}}}, "unknown key 'phases.svd.lrr'"),
        ({"data": {"batch_size": "64"}}, "data.batch_size must be of type int"),
        ({"phases": {"finetune": {"lr": -0.1}}}, "phases.finetune.lr must be > 0"),
        ({"prune": {"energy": 1.0}}, "prune.energy must be < 1"),
        ({"prune": {"energy": -0.1}}, "prune.energy must be ≥ 0"),
        ({"decompose": {"mode": "diagonal"}}, "decompose.mode must be one of channel, spatial"),
        ({"reg": {"type": "l2"}}, "reg.type must be one of"),
        ({"phases": {"svd": {"epochs": True}}}, "phases.svd.epochs must be of type int"),
        ({"train": {"log_every": 0}}, "train.log_every must be ≥ 1"),
        ({"train": {"cuda_graph": "always"}}, "train.cuda_graph must be one of auto, True, False"),
    ],
)
def test_malformed_recipes_name_key_and_file(raw, message):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw, "bad.toml")
    assert message in str(info.value) and str(info.value).startswith("bad.toml:")


@pytest.mark.parametrize(
    "body,message",
    [
        ("[phases.svd]\nlrr = 0.1\n", "unknown key 'phases.svd.lrr'"),
        ("[data]\nbatch_size = \"64\"\n", "data.batch_size must be of type int"),
        ("[phases.svd]\nlr = -0.1\n", "phases.svd.lr must be > 0"),
        ("[prune]\nenergy = 1.5\n", "prune.energy must be < 1"),
        ("[model\nname = 3\n", "not valid TOML"),
    ],
)
def test_cli_malformed_recipe_one_line_exit_2(tmp_path, body, message, cli):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    proc = cli("train", path, "--output", tmp_path / "run")
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_reference_recipe_lists_every_key_with_its_default():
    """docs/recipe-reference.toml is the recipe documentation: it must match the code."""
    import tomllib
    from pathlib import Path

    from lrexport.recipe import Recipe

    path = Path(__file__).parents[1] / "docs" / "recipe-reference.toml"

    def keys(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "kwargs" else {prefix + k}
        return out

    defaults = Recipe().to_dict()
    assert keys(tomllib.loads(path.read_text())) == keys(defaults)
    assert load_recipe(path).to_dict() == defaults
    # the layering key is no Recipe field, so it is documented as a comment line
    assert f"# {BASE_KEY} = " in path.read_text()


def _write(tmp_path, files: dict[str, str]):
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)


def test_base_recipes_deep_merge_then_overrides(tmp_path):
    _write(tmp_path, {
        "shared/root.toml": 'name = "root"\nseed = 3\n[reg]\ndecay = 0.5\ntype = "l1"\n[phases.svd]\nepochs = 4\nmilestones = [1, 2, 3]\n',
        "shared/mid.toml": 'base = "root.toml"\n[phases.svd]\nmilestones = [2]\nlr = 0.5\n',
        "child.toml": 'base = "shared/mid.toml"\nname = "child"\n[reg]\ndecay = 0.25\n',
    })
    r = load_recipe(tmp_path / "child.toml", ["phases.svd.epochs=7"])
    assert (r.name, r.seed, r.reg.type, r.reg.decay) == ("child", 3, "l1", 0.25)  # tables merge key by key
    assert (r.phases.svd.epochs, r.phases.svd.lr, r.phases.svd.milestones) == (7, 0.5, [2])  # lists replace, --set last
    assert "base" not in r.to_toml()  # the run directory's recipe.toml is the flattened recipe


@pytest.mark.parametrize(
    "files,message",
    [
        ({"a.toml": 'base = "missing.toml"\n'}, "cannot read recipe {tmp}/missing.toml (base of {tmp}/a.toml)"),
        ({"a.toml": 'base = "b.toml"\n', "b.toml": 'base = "a.toml"\n'}, "{tmp}/a.toml -> {tmp}/b.toml -> {tmp}/a.toml"),
        ({"a.toml": 'base = "a.toml"\n'}, "cycle: {tmp}/a.toml -> {tmp}/a.toml"),
        ({"a.toml": 'base = "b.toml"\n', "b.toml": "[model\n"}, "{tmp}/b.toml (base of {tmp}/a.toml): not valid TOML"),
        ({"a.toml": "base = 3\n"}, "{tmp}/a.toml: base must be a recipe file name"),
        ({"a.toml": 'base = "b.toml"\n', "b.toml": "[reg]\nlrr = 1\n"}, "{tmp}/a.toml: unknown key 'reg.lrr'"),
    ],
)
def test_base_recipe_errors_are_one_line_naming_the_file(tmp_path, files, message):
    _write(tmp_path, files)
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "a.toml")
    text = str(info.value)
    assert message.format(tmp=tmp_path) in text and "\n" not in text, text


def test_cli_base_recipe_cycle_one_line_exit_2(tmp_path, cli):
    _write(tmp_path, {"a.toml": 'base = "b.toml"\n', "b.toml": 'base = "a.toml"\n'})
    proc = cli("train", tmp_path / "a.toml", "--output", tmp_path / "run")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "cycle" in proc.stderr, proc.stderr

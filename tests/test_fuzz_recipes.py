"""Fuzzed recipes: every mutation ends in one clear error line or a recipe that runs, never a traceback.

Mutations of recipes/quickstart.toml and of a tiny valid recipe, drawn from one seeded
generator (reproducible): deleted keys and tables, unknown keys, wrong types, strings for
numbers, out-of-range, huge and non-finite numbers, wrong nesting, broken TOML text, --set
overrides, empty files and binary garbage. All are validated in-process; a sample goes
through the real CLI (one stderr line, exit 2); the recipes that validate are started the
way a run starts (device, data, model, decomposition, optimizers, one forward pass), and a
few are trained for real on tiny data.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import random
import tomllib
import traceback
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w
import torch

from lrexport.errors import LrexportError, RecipeError
from lrexport.recipe import Recipe, load_recipe, recipe_from_dict

SEED = 6  # issue 6
QUICKSTART = Path(__file__).parent.parent / "recipes" / "quickstart.toml"
TINY_RECIPE = {
    "name": "fuzz",
    "seed": 1,
    "model": {"name": "cifar_resnet20", "kwargs": {"shortcut": "A"}},
    "data": {"dataset": "synthetic", "image_size": 8, "train_size": 64, "val_size": 32, "batch_size": 32},
    "decompose": {"mode": "spatial", "exclude": ["conv1"]},
    "reg": {"type": "l1", "decay": 0.01},
    "prune": {"energy": "auto", "ladder": [0.01, 0.05], "tolerance": 5.0, "multiple_of": 2},
    "phases": {"svd": {"epochs": 1, "lr": 0.05, "optimizer": "adam", "milestones": [1]},
               "finetune": {"epochs": 1, "lr": 0.01, "schedule": "cosine"}},
    "eval": {"every": 1},
}
UNKNOWN_KEYS = ["lrr", "epoch", "Name", "batchsize", "ünïcode", "a b", "line\nbreak", "", "model", "phases"]
WRONG_VALUES = ["text", "", [1, 2], ["a", 3], {"x": 1}, True, 3, -7, 2.5, datetime.date(2020, 1, 1), []]
NUMBERS = [-1, 0, -1e-9, 1e300, -1e300, 2**63 - 1, -(2**63), float("nan"), float("inf"), float("-inf"), 10**30]
# plausible but wrong values that only the run itself can refuse, beside plain junk
STRINGS = ["", "CHANNEL", "channel ", "☃", "x" * 500, "../../etc", "cifar_resnet21", "resnet", "cuda:7", "auto", "cifar10",
           "imagefolder", "spatial", "l1", "nosuch.pt", "DEFAULT", "cpu"]
LISTS = [["layer9.*"], ["*", "*"], [], [-1, 5], [10**9], ["conv1"], ["fc"], ["*.conv2"]]
KWARGS = [{"shortcut": "C"}, {"depth": 21}, {"foo": 1}, {"shortcut": "B"}, {}, {"zero_init_residual": True}]
OVERRIDES = [
    ("phases.svd.lr=abc", True), ("reg.decay=1e400", True), ("model=3", True), ("=3", True), ("noequals", True),
    ("data.batch_size=[1,2]", True), ("a.b.c.d=1", True), ("reg.decay.x=1", True), ("seed=-1", True),
    ("phases.svd.milestones=[3,1]", False), ("prune.energy=0.5", False), ('model.kwargs.shortcut="A"', False),
    ("device=cpu", False), ("phases.finetune.epochs=0", False),
]
TEXT_CHARS = list('[]="\'{}#\n,.:\\') + ["\x00", "\x7f", "é"]


@dataclass
class Mutant:
    what: str  # how it was made, for failure messages
    data: bytes | None  # file content; None: the path is a directory or missing
    overrides: tuple[str, ...] = ()
    key: str | None = None  # the key an error must name
    must_fail: bool = False
    path_kind: str = "file"  # file | missing | directory


# -- the recipe's shape, for the structural mutations --------------------------------------------
def _table_type(path: tuple[str, ...]):
    """The dataclass behind a table path (``("phases", "svd")`` → PhaseConfig), None for kwargs."""
    cls = Recipe
    for part in path:
        hints = typing.get_type_hints(cls)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            return None
        cls = hints[part]
    return cls


def _leaves(raw: dict, prefix=()) -> list[tuple[tuple[str, ...], object]]:
    out = []
    for k, v in raw.items():
        if isinstance(v, dict) and _table_type(prefix + (k,)) is not None:
            out += _leaves(v, prefix + (k,))
        else:
            out.append((prefix + (k,), v))
    return out


def _tables(raw: dict, prefix=()) -> list[tuple[str, ...]]:
    out = [prefix]
    for k, v in raw.items():
        if isinstance(v, dict) and _table_type(prefix + (k,)) is not None:
            out += _tables(v, prefix + (k,))
    return out


def _get(raw: dict, path):
    for p in path[:-1]:
        raw = raw[p]
    return raw, path[-1]


def _shown(path) -> str:
    text = ".".join(path)
    return text if text.isprintable() else repr(text)[1:-1]


def _toml(raw: dict) -> bytes:
    return tomli_w.dumps(raw).encode()


def structural(base: dict, rng: random.Random) -> Mutant:
    raw = copy.deepcopy(base)
    leaves, tables = _leaves(raw), _tables(raw)
    kind = rng.choice(["delete_leaf", "delete_table", "unknown_key", "wrong_type", "out_of_range", "plausible", "plausible",
                       "string_for_number", "move_leaf", "scalar_to_table", "table_to_scalar", "array_of_tables", "self_nest"])
    if kind == "delete_leaf":  # every key has a default: still a recipe
        path, _ = rng.choice(leaves)
        parent, k = _get(raw, path)
        del parent[k]
        return Mutant(f"delete {_shown(path)}", _toml(raw))
    if kind == "delete_table":
        path = rng.choice([t for t in tables if t])
        parent, k = _get(raw, path)
        del parent[k]
        return Mutant(f"delete [{_shown(path)}]", _toml(raw))
    if kind == "unknown_key":
        table = rng.choice(tables)
        fields = {f.name for f in dataclasses.fields(_table_type(table))}
        key = rng.choice([k for k in UNKNOWN_KEYS if k not in fields])
        parent = raw
        for p in table:
            parent = parent[p]
        parent[key] = rng.choice([1, "x", {"y": 2}])
        return Mutant(f"unknown key {key!r} in [{_shown(table)}]", _toml(raw), key=_shown(table + (key,)), must_fail=True)
    if kind in ("wrong_type", "out_of_range", "string_for_number", "plausible"):
        if kind == "plausible":  # a text, list or table value: the ones validation passes and the run must judge
            kind = "out_of_range"
            leaves = [(p, v) for p, v in leaves if isinstance(v, (str, list, dict))]
        path, old = rng.choice(leaves)
        parent, k = _get(raw, path)
        if kind == "string_for_number" and isinstance(old, (bool, int, float)):
            parent[k] = str(old).lower()
            must_fail = True
        elif kind == "out_of_range":
            parent[k] = rng.choice({str: STRINGS, list: LISTS, dict: KWARGS}.get(type(old), NUMBERS))
            # where a number goes, NaN, inf and floats beyond float32 are never valid
            numeric = isinstance(old, (int, float)) and not isinstance(old, bool)
            must_fail = numeric and isinstance(parent[k], float) and not abs(parent[k]) <= 3.4e38
        else:
            parent[k] = rng.choice(WRONG_VALUES)
            must_fail = False
        return Mutant(f"{kind}: {_shown(path)} = {parent[k]!r} (was {old!r})", _toml(raw), key=_shown(path), must_fail=must_fail)
    if kind == "move_leaf":  # into another table: an unknown key there, or by chance one of its own
        path, value = rng.choice(leaves)
        table = rng.choice([t for t in tables if t != path[:-1]])
        parent, k = _get(raw, path)
        dest = raw
        for p in table:
            dest = dest[p]
        if k in dest:
            return Mutant(f"move {_shown(path)} onto existing {_shown(table + (k,))}", None, path_kind="skip")
        del parent[k]
        dest[k] = value
        return Mutant(f"move {_shown(path)} to [{_shown(table)}]", _toml(raw), key=_shown(table + (k,)))
    if kind == "scalar_to_table":
        path, old = rng.choice([(p, v) for p, v in leaves if not isinstance(v, dict)])
        parent, k = _get(raw, path)
        parent[k] = {"value": old}
        return Mutant(f"{_shown(path)} as a table", _toml(raw), key=_shown(path), must_fail=True)
    if kind == "table_to_scalar":
        path = rng.choice([t for t in tables if t])
        parent, k = _get(raw, path)
        parent[k] = rng.choice([3, "svd", [1], True])
        return Mutant(f"[{_shown(path)}] as {parent[k]!r}", _toml(raw), key=_shown(path), must_fail=True)
    if kind == "array_of_tables":
        path = rng.choice([t for t in tables if t])
        parent, k = _get(raw, path)
        parent[k] = [parent[k], parent[k]]
        return Mutant(f"[[{_shown(path)}]]", _toml(raw), key=_shown(path), must_fail=True)
    path = rng.choice([t for t in tables if t])  # self_nest: [phases.svd.svd]
    parent, k = _get(raw, path)
    parent[k][k] = copy.deepcopy(parent[k])
    return Mutant(f"[{_shown(path)}.{k}]", _toml(raw), key=_shown(path + (k,)), must_fail=True)


def textual(text: str, rng: random.Random) -> Mutant:
    """A change to the TOML text itself: usually not TOML any more, sometimes a different recipe."""
    lines = text.splitlines(keepends=True)
    kind = rng.choice(["delete_char", "insert_char", "duplicate_line", "truncate", "swap_lines", "colon", "header", "flip_byte"])
    if kind == "delete_char":
        i = rng.randrange(len(text))
        out = (text[:i] + text[i + 1:]).encode()
    elif kind == "insert_char":
        i = rng.randrange(len(text))
        out = (text[:i] + rng.choice(TEXT_CHARS) + text[i:]).encode()
    elif kind == "duplicate_line":
        i = rng.randrange(len(lines))
        out = "".join(lines[: i + 1] + [lines[i]] + lines[i + 1:]).encode()
    elif kind == "truncate":
        out = text[: rng.randrange(len(text))].encode()
    elif kind == "swap_lines":
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
        out = "".join(lines).encode()
    elif kind == "colon":
        i = rng.choice([n for n, l in enumerate(lines) if "=" in l])
        lines[i] = lines[i].replace("=", ":", 1)
        out = "".join(lines).encode()
    elif kind == "header":
        i = rng.choice([n for n, l in enumerate(lines) if l.startswith("[")])
        lines[i] = lines[i].replace("]", "", 1)
        out = "".join(lines).encode()
    else:
        data = bytearray(text.encode())
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        out = bytes(data)
    return Mutant(f"text {kind}", out)


def all_mutants() -> list[Mutant]:
    rng = random.Random(SEED)
    quick_text = QUICKSTART.read_text()
    bases = [("quickstart", tomllib.loads(quick_text), quick_text), ("tiny", TINY_RECIPE, tomli_w.dumps(TINY_RECIPE))]
    mutants = []
    for name, raw, text in bases:
        for _ in range(110):
            m = structural(raw, rng)
            if m.path_kind != "skip":
                mutants.append(dataclasses.replace(m, what=f"{name}: {m.what}"))
        for _ in range(35):
            m = textual(text, rng)
            mutants.append(dataclasses.replace(m, what=f"{name}: {m.what}"))
        for o, bad in OVERRIDES:
            mutants.append(Mutant(f"{name}: --set {o}", text.encode(), (o,), must_fail=bad))
    mutants += [
        Mutant("empty file", b""), Mutant("whitespace", b"  \n\t\n"), Mutant("comment only", b"# nothing\n"),
        Mutant("UTF-16 recipe", quick_text.encode("utf-16"), must_fail=True),
        Mutant("UTF-8 BOM", b"\xef\xbb\xbf" + quick_text.encode()),
        Mutant("JSON, not TOML", b'{"name": "x", "seed": 1}', must_fail=True),
        Mutant("NUL bytes", b"\x00" * 64, must_fail=True),
        Mutant("huge integer", b"seed = " + b"9" * 5000 + b"\n", must_fail=True),
        Mutant("a directory", None, path_kind="directory", must_fail=True),
        Mutant("no such file", None, path_kind="missing", must_fail=True),
    ]
    mutants += [Mutant(f"binary garbage {i}", rng.randbytes(rng.randrange(1, 4096)), must_fail=True) for i in range(8)]
    return mutants


# -- what a valid recipe must survive ---------------------------------------------------------------
def _small(r: Recipe) -> Recipe:
    """The same recipe over a data set small enough to check in milliseconds (size is a resource, not validity).

    Downloads are off: CI has no network, and a missing data set must still be one DataError.
    """
    d = r.data
    data = dataclasses.replace(d, train_size=min(d.train_size, 64), val_size=min(d.val_size, 32), workers=0,
                               image_size=min(d.image_size, 16), num_classes=min(d.num_classes, 20), download=False)
    return dataclasses.replace(r, data=data)


def _tiny_run(r: Recipe) -> Recipe:
    """``r`` on 64 images of 8×8 pixels, at most one epoch per phase, and a fixed name."""
    r = _small(r)
    data = dataclasses.replace(r.data, image_size=8, batch_size=min(r.data.batch_size, 32), eval_batch_size=0,
                               train_size=64, val_size=32)
    phases = {k: dataclasses.replace(getattr(r.phases, k), epochs=min(getattr(r.phases, k).epochs, 1))
              for k in ("dense", "fullrank", "svd", "finetune")}
    return dataclasses.replace(r, name="fuzz", output_dir="runs", data=data, phases=dataclasses.replace(r.phases, **phases))


def start_like_a_run(r: Recipe, where: Path, cache: dict) -> str:
    """Device, data, model, decomposition, optimizers and one forward pass, as Pipeline.run starts.

    Returns "ok" or the LrexportError line; any other exception fails the test.
    """
    from lrexport.lowrank import decompose
    from lrexport.lowrank.energy_search import check_ladder
    from lrexport.models import create_model
    from lrexport.train import pipeline
    from lrexport.train.loop import build_optimizer, build_scheduler, evaluate

    small = _small(r)
    try:
        for cfg in (small.phases.dense, small.phases.fullrank, small.phases.svd, small.phases.finetune):
            build_scheduler(build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg), cfg)
        if small.prune.energy == "auto":  # the line search's rungs are judged when pruning starts
            check_ladder(small.prune.ladder)
        key = repr((small.device, small.amp, small.channels_last, small.data, small.model, small.decompose))
        if key not in cache:
            p = pipeline.Pipeline(small, where)
            p._setup_data()
            m = r.model
            model = create_model(m.name, num_classes=p.num_classes, weights=m.weights or None, **m.kwargs)
            decompose(model, small.decompose.mode, small.decompose.include, small.decompose.exclude, small.decompose.linear)
            evaluate(p.place(model), p.val_loader, p.precision)
            cache[key] = "ok"
        return cache[key]
    except LrexportError as e:
        assert "\n" not in str(e), str(e)
        return str(e)


# -- the tests -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Each mutant validated in-process: (mutant, path, RecipeError or Recipe)."""
    root = tmp_path_factory.mktemp("fuzz")
    results = []
    for i, m in enumerate(all_mutants()):
        path = root / f"m{i:03d}.toml"
        if m.path_kind == "directory":
            path.mkdir()
        elif m.path_kind == "file":
            path.write_bytes(m.data)
        try:
            got = load_recipe(path, m.overrides)
        except LrexportError as e:
            got = e
        except Exception:
            pytest.fail(f"mutant {i} ({m.what}) raised instead of a RecipeError:\n{traceback.format_exc()}")
        results.append((m, path, got))
    return results


def test_enough_mutants_of_each_outcome(outcomes):
    errors = [g for _, _, g in outcomes if isinstance(g, LrexportError)]
    valid = [g for _, _, g in outcomes if isinstance(g, Recipe)]
    assert len(outcomes) >= 200
    assert len(errors) >= 100 and len(valid) >= 40  # the fuzz reaches both sides of validation


def test_every_error_is_one_line_naming_the_file_and_key(outcomes):
    for m, path, got in outcomes:
        if isinstance(got, Recipe):
            assert not m.must_fail, f"{m.what}: accepted {got}"
            continue
        msg = str(got)
        assert isinstance(got, RecipeError), f"{m.what}: {type(got).__name__}: {msg}"
        assert msg and "\n" not in msg and "\r" not in msg, f"{m.what}: {msg!r}"
        assert str(path) in msg or msg.startswith("--set"), f"{m.what}: {msg}"
        if m.key is not None:
            assert m.key in msg, f"{m.what}: {msg}"


def test_valid_mutants_round_trip_and_start_like_a_run(outcomes, tmp_path):
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared machine
    cache, results = {}, []
    try:
        for m, path, got in outcomes:
            if not isinstance(got, Recipe):
                continue
            # the resolved recipe written beside every run reads back as the same recipe
            assert recipe_from_dict(tomllib.loads(got.to_toml()), "resolved") == got, m.what
            try:
                results.append(start_like_a_run(got, tmp_path / "start", cache))
            except Exception:
                pytest.fail(f"{m.what}: starting a run raised:\n{traceback.format_exc()}")
    finally:
        torch.set_num_threads(torch_threads)
    assert "ok" in results


def test_a_few_valid_mutants_train(outcomes, tmp_path):
    """Up to three recipes that validate, trained on tiny data: a finished run or one clear error."""
    from lrexport.train import run_recipe

    rng = random.Random(SEED)
    bases = [_tiny_run(recipe_from_dict(tomllib.loads(QUICKSTART.read_text()))), _tiny_run(recipe_from_dict(TINY_RECIPE))]
    # mutants that still differ from both bases once shrunk to tiny data: something new gets trained
    candidates = [(m, _tiny_run(g)) for m, _, g in outcomes if isinstance(g, Recipe) and _tiny_run(g) not in bases]
    picked = rng.sample(candidates, 3)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, (m, r) in enumerate(picked):
            print("training", m.what)
            try:
                result = run_recipe(r, tmp_path / f"run{i}")
            except LrexportError as e:
                assert "\n" not in str(e), f"{m.what}: {e}"
                print("  refused:", e)
                continue
            except Exception:
                pytest.fail(f"{m.what}: training raised:\n{traceback.format_exc()}")
            assert "finished" in result.summary and (result.run_dir / "checkpoints" / "finetune_best.pt").is_file(), m.what
    finally:
        torch.set_num_threads(torch_threads)


def test_cli_shows_one_line_and_exits_2(outcomes, tmp_path, cli):
    """A seeded sample of the rejected mutants through `lrexport train`: what a user sees."""
    rng = random.Random(SEED)
    rejected = [(m, p, g) for m, p, g in outcomes if isinstance(g, RecipeError)]
    for m, path, got in rng.sample(rejected, 15):
        out = tmp_path / "run"
        sets = [a for o in m.overrides for a in ("--set", o)]
        proc = cli("train", path, "--output", out, *sets)
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert proc.returncode == 2, f"{m.what}: {proc.stderr}"
        assert "Traceback" not in proc.stderr and len(lines) == 1, f"{m.what}: {proc.stderr}"
        assert lines[0] == f"error: {got}", f"{m.what}: {lines[0]!r} vs {str(got)!r}"
        assert not out.exists()

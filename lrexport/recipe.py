"""Recipes: TOML → validated, typed recipe objects, with --set overrides and clear errors.

Layering: dataclass defaults < base recipes < recipe file < ``--set key.path=value``. A recipe
may name a ``base`` recipe (a path relative to its own file, which may have a base in turn): its
tables are deep-merged over the base's. Every unknown key, wrong type or out-of-range value is a
RecipeError naming the key and the file.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from .data import CHANNELS, DATASETS, DataConfig
from .deploy.backends import RUNTIMES, all_devices, all_precisions, tunable_runtimes
from .errors import RecipeError


FLOAT32_MAX = 3.4028234663852886e38  # training runs in float32 (or narrower)
METHODS = ("lowrank", "channels", "channels+lowrank")


def _check(*choices: Any, ge: float | None = None, gt: float | None = None, lt: float | None = None, words: tuple = (),
           nonempty: bool = False) -> dict:
    """Field metadata: allowed choices, numeric bounds (of each item of a list), the words a number
    field also takes, and whether a list may be empty."""
    return {"choices": choices, "ge": ge, "gt": gt, "lt": lt, "words": words, "nonempty": nonempty}


@dataclass
class ModelConfig:
    name: str = "cifar_resnet20"
    num_classes: int = field(default=0, metadata=_check(ge=0))  # 0: take it from the data set
    weights: str = ""  # "": none; a state-dict file, or a torchvision weights name ("DEFAULT")
    kwargs: dict = field(default_factory=dict)  # passed to the model builder, e.g. shortcut = "A"


@dataclass
class DecomposeConfig:
    mode: str = field(default="channel", metadata=_check("channel", "spatial"))
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    linear: bool = False  # decompose Linear layers too
    # "dense": exact SVD of the dense weights (pretrained, or after the dense phase);
    # "scratch": SVD layers freshly initialised
    init: str = field(default="dense", metadata=_check("dense", "scratch"))


@dataclass
class RegConfig:
    ortho: float = field(default=1.0, metadata=_check(ge=0))  # λ_o
    type: str = field(default="hoyer", metadata=_check("hoyer", "l1", "none"))
    decay: float = field(default=0.0, metadata=_check(ge=0))  # λ_s
    # torch.compile the summed terms: per layer they are a dozen tiny kernels, which on a GPU
    # cost more launch time than the convolutions take ("auto": on CUDA devices only)
    compile: bool | str = field(default="auto", metadata=_check("auto", True, False))


@dataclass
class PruneConfig:
    # e: fraction of energy removed per layer, or "auto": the largest e of ``ladder`` whose
    # accuracy right after pruning stays within ``tolerance`` points (the paper's line search)
    energy: float | str = field(default=1e-3, metadata=_check(ge=0, lt=1, words=("auto",)))
    multiple_of: int = field(default=1, metadata=_check(ge=1))  # round ranks to this (before finetuning)
    ladder: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.2, 0.3])
    tolerance: float = field(default=1.0, metadata=_check(ge=0))  # accuracy points, for energy = "auto" and tune_below
    # export --tune may deploy a layer below its energy rank where that is faster and the
    # validation top-1 stays within ``tolerance`` points (lrexport.deploy.planning.below)
    tune_below: bool = False
    # choose each decomposed conv's rank from its measured latency on this runtime, within the
    # energy rule's budget (lrexport.deploy.planning.latency_ranks); "none": the energy rule alone
    latency: str = field(default="none", metadata=_check("none", *tunable_runtimes()))
    latency_batches: list[int] = field(default_factory=lambda: [1, 8], metadata=_check(ge=1, nonempty=True))
    latency_threads: int = field(default=0, metadata=_check(ge=0))  # 0: all CPUs
    latency_device: str = field(default="cpu", metadata=_check(*all_devices()))
    # the deployment's device and precision: which runtime measures layers at which, its registry entry says
    latency_precision: str = field(default="fp32", metadata=_check(*all_precisions()))
    latency_grid: int = field(default=8, metadata=_check(ge=1))  # candidate ranks: multiples of this, powers of two below it
    # largest fraction of one layer's energy the allocation may discard; "auto": 10·e
    max_layer_energy: float | str = field(default="auto", metadata=_check(gt=0, words=("auto",)))


@dataclass
class ChannelsConfig:
    """Filter pruning (method "channels" or "channels+lowrank"), through Torch-Pruning (lrexport.channels)."""

    # the target, one of the two: dense MACs over pruned MACs, or the fraction of each prunable group's channels removed
    speedup: float = field(default=0.0, metadata=_check(ge=0))
    ratio: float = field(default=0.0, metadata=_check(ge=0, lt=1))
    # which channels go: "l2"/"l1" a filter's own weight norm, "group" the norm over all layers the channel
    # couples, "taylor" |weight × gradient| on training batches, "fpgm" the geometric median, "random"
    importance: str = field(default="l2", metadata=_check("l2", "l1", "group", "taylor", "fpgm", "random"))
    round_to: int = field(default=8, metadata=_check(ge=1))  # widths stay multiples of this: odd widths run slowly (docs/recipes.md)
    steps: int = field(default=1, metadata=_check(ge=1))  # prune in this many rounds, importance taken anew each round
    taylor_batches: int = field(default=8, metadata=_check(ge=1))  # training batches the taylor gradients sum over
    exclude: list[str] = field(default_factory=list)  # conv/linear layers whose outputs stay whole (the classifier always does)


@dataclass
class PhaseConfig:
    epochs: int = field(default=0, metadata=_check(ge=0))  # 0 skips the phase
    optimizer: str = field(default="sgd", metadata=_check("sgd", "adam"))
    lr: float = field(default=0.1, metadata=_check(gt=0))
    momentum: float = field(default=0.9, metadata=_check(ge=0, lt=1))
    weight_decay: float = field(default=5e-4, metadata=_check(ge=0))
    schedule: str = field(default="multistep", metadata=_check("multistep", "step", "cosine", "constant"))
    milestones: list[int] = field(default_factory=list)  # multistep: epochs at which lr *= gamma
    step_size: int = field(default=30, metadata=_check(ge=1))  # step: every step_size epochs
    gamma: float = field(default=0.1, metadata=_check(gt=0))


@dataclass
class PhasesConfig:
    dense: PhaseConfig = field(default_factory=PhaseConfig)  # optional dense pretraining
    recover: PhaseConfig = field(default_factory=PhaseConfig)  # finetuning right after channel pruning
    fullrank: PhaseConfig = field(default_factory=PhaseConfig)  # full-rank SVD form, λ_o only
    svd: PhaseConfig = field(default_factory=PhaseConfig)  # λ_o and λ_s
    finetune: PhaseConfig = field(default_factory=PhaseConfig)  # pruned ranks fixed, λ_o only


@dataclass
class EvalConfig:
    every: int = field(default=1, metadata=_check(ge=1))  # validate every N epochs (and at each phase end)


@dataclass
class CheckpointConfig:
    every: int = field(default=1, metadata=_check(ge=1))  # write the resume checkpoint every N epochs


@dataclass
class TrainConfig:
    # the running loss, the NaN check and stop signals are read every N steps (and at each
    # epoch's end): each read waits for the GPU, so reading every step starves it
    log_every: int = field(default=50, metadata=_check(ge=1))
    # capture each training step as one CUDA graph (SVD training is bound by kernel launches);
    # "auto": on one CUDA GPU without fp16's gradient scaler; where capture fails, one warning
    # and eager steps
    cuda_graph: bool | str = field(default="auto", metadata=_check("auto", True, False))
    # divide each SVD layer's U-column and V-row gradients by max(1, s_i²): a factor step then
    # moves W no farther than the dense step would (unscaled, up to 2·s²+1 times as far);
    # "auto": in the layers whose output no normalization layer (BatchNorm, GroupNorm,
    # LayerNorm) takes, which the normalization's scale invariance does not protect
    scale_factor_grads: bool | str = field(default="auto", metadata=_check("auto", True, False))
    # a step has diverged when its cross-entropy passes diverge_ce × ln(classes) or its
    # orthogonality term (unweighted) passes diverge_ortho per SVD layer, and twice its value
    # at the epoch's first step; 0: no limit
    diverge_ce: float = field(default=10.0, metadata=_check(ge=0))
    diverge_ortho: float = field(default=1.0, metadata=_check(ge=0))
    # a non-finite or diverged step rolls the phase back to its epoch's start and multiplies
    # the learning rate by recovery_lr_factor, at most this many times a phase (0: stop at once)
    recoveries: int = field(default=3, metadata=_check(ge=0))
    recovery_lr_factor: float = field(default=0.5, metadata=_check(gt=0, lt=1))


@dataclass
class Recipe:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = field(default=0, metadata=_check(ge=0, lt=2**32))  # seed·100003 + epoch seeds a 64-bit torch generator
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = field(default="none", metadata=_check("none", "bf16", "fp16"))
    channels_last: bool = False
    # "lowrank": the paper's method; "channels": filter pruning alone; "channels+lowrank": filter
    # pruning, then the paper's method on the narrower network
    method: str = field(default="lowrank", metadata=_check(*METHODS))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    channels: ChannelsConfig = field(default_factory=ChannelsConfig)
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    phases: PhasesConfig = field(default_factory=PhasesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def hash(self) -> str:
        return hashlib.sha256(self.to_toml().encode()).hexdigest()[:16]


# DataConfig lives in data.py (it has no recipe dependency); its checks are declared here.
_DATA_CHECKS = {
    "dataset": _check(*DATASETS), "batch_size": _check(ge=1), "eval_batch_size": _check(ge=0), "workers": _check(ge=0),
    "image_size": _check(ge=0), "num_classes": _check(ge=2), "train_size": _check(ge=1), "val_size": _check(ge=1),
    "seed": _check(ge=0, lt=2**32), "channels": _check(*CHANNELS), "std": _check(gt=0),
}


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is types.UnionType:
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if tp is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is types.UnionType:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _show(value: Any, limit: int = 60) -> str:
    """A value as it appears in an error: repr (so never a line break), cut to ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _key(text: str) -> str:
    """A key path as it appears in an error; quoted TOML keys may hold line breaks."""
    return text if text.isprintable() else repr(text)[1:-1]


def _build(cls, raw: dict, where: str, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise RecipeError(f"{where}: unknown key '{_key(prefix + key)}'; known keys: {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        tp, key = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise RecipeError(f"{where}: {key} must be a table, got {_show(value)}")
            values[name] = _build(tp, value, where, key + ".")
            continue
        if not _type_ok(value, tp):
            raise RecipeError(f"{where}: {key} must be of type {_type_name(tp)}, got {_show(value)}")
        texts = value if isinstance(value, list) else [value]
        if any(isinstance(t, str) and not t.isprintable() for t in texts):  # names become paths: no NUL, no line breaks
            raise RecipeError(f"{where}: {key} must be printable text (no control characters), got {_show(value)}")
        if tp is float:
            try:
                value = float(value)
            except OverflowError:  # a TOML integer may have any number of digits
                value = math.inf
            if not abs(value) <= FLOAT32_MAX:  # inf and 1e300 pass "≥ 0", then break float32 training
                raise RecipeError(f"{where}: {key} must be a finite float32 number (at most {FLOAT32_MAX:.4g} in size), got {value!r}")
        meta = fields[name].metadata or (_DATA_CHECKS.get(name, {}) if cls is DataConfig else {})
        if isinstance(value, str) and meta.get("words"):  # a number field that also takes a word ("auto")
            if value not in meta["words"]:
                raise RecipeError(f"{where}: {key} must be a number or one of {', '.join(meta['words'])}, got {_show(value)}")
            values[name] = value
            continue
        if isinstance(value, int) and not isinstance(value, bool) and float in typing.get_args(tp):
            value = float(value)
        if meta.get("choices") and value not in meta["choices"]:
            raise RecipeError(f"{where}: {key} must be one of {', '.join(map(str, meta['choices']))}, got {_show(value)}")
        if meta.get("nonempty") and not value:
            raise RecipeError(f"{where}: {key} must not be empty")
        for bound, ok, word in (("ge", lambda a, b: a >= b, "≥"), ("gt", lambda a, b: a > b, ">"), ("lt", lambda a, b: a < b, "<")):
            for item in value if isinstance(value, list) else [value]:
                if meta.get(bound) is not None and not ok(item, meta[bound]):
                    raise RecipeError(f"{where}: {key} must be {word} {meta[bound]}, got {_show(value)}")
        values[name] = value
    return cls(**values)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` with a TOML value (numbers, booleans, lists, quoted strings); bare words are strings."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {text!r}: expected key.path=value")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except ValueError:  # TOMLDecodeError, or an integer of over 4300 digits
        parsed = value.strip()
    return key.strip().split("."), parsed


def _apply_override(raw: dict, path: list[str], value: Any, text: str) -> None:
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {text}: {part!r} is not a table")
    node[path[-1]] = value


def recipe_from_dict(raw: dict, where: str = "<recipe>", overrides: typing.Iterable[str] = ()) -> Recipe:
    raw = copy.deepcopy(raw)  # overrides write into nested tables: never into the caller's
    for text in overrides:
        path, value = parse_override(text)
        _apply_override(raw, path, value, text)
    recipe = _build(Recipe, raw, where, "")
    _check_latency(recipe.prune, where)
    _check_channels(recipe, where)
    _check_normalisation(recipe.data, where)
    return recipe


def _check_normalisation(d: DataConfig, where: str) -> None:
    """data.mean and data.std come together, one value per input channel."""
    channels = d.channels or 3
    for key in ("mean", "std"):
        values = getattr(d, key)
        if (d.mean or d.std) and len(values) != channels:
            raise RecipeError(f"{where}: data.{key} must have one value per channel ({channels}), got {_show(values)}")


def _check_channels(r: Recipe, where: str) -> None:
    """A method that prunes channels needs exactly one target."""
    c = r.channels
    if "channels" not in r.method:
        return
    if (c.speedup > 0) == (c.ratio > 0):
        raise RecipeError(f"{where}: method = \"{r.method}\" needs one target: channels.speedup (dense MACs over pruned MACs, > 1) "
                          "or channels.ratio (the fraction of channels removed, between 0 and 1)")
    if c.speedup and c.speedup <= 1:
        raise RecipeError(f"{where}: channels.speedup must be > 1 (dense MACs over pruned MACs), got {c.speedup:g}")


def _check_latency(p: PruneConfig, where: str) -> None:
    """Settings the runtime cannot measure layers at (its entry in the backend registry says which)."""
    if p.latency == "none" or RUNTIMES[p.latency].measures(p.latency_device, p.latency_precision):
        return
    able = " or ".join(f'"{name}"' for name, r in RUNTIMES.items() if r.measures(p.latency_device, p.latency_precision))
    raise RecipeError(f'{where}: prune.latency_device = "{p.latency_device}" with latency_precision = "{p.latency_precision}" '
                      f"needs prune.latency = {able or 'a runtime that measures there (none does)'}; {p.latency} measures layers "
                      f"in {RUNTIMES[p.latency].describe(RUNTIMES[p.latency].tunes_on)}")


BASE_KEY = "base"  # the one key a recipe file has that a Recipe does not: resolved away on reading


def _read_toml(path: Path, via: str) -> dict:
    """One TOML file as a dict; ``via`` says which recipe named it as a base (for errors)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}{via}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}{via}: not a text (UTF-8) file: byte {e.start} is {e.object[e.start:e.start + 1]!r}") from None
    try:
        return tomllib.loads(text)
    except ValueError as e:  # TOMLDecodeError, or an integer of over 4300 digits
        raise RecipeError(f"{path}{via}: not valid TOML: {e}") from None


def merge_tables(base: dict, over: dict) -> dict:
    """``over`` deep-merged onto ``base``: tables merge key by key, scalars and lists replace."""
    out = dict(base)
    for key, value in over.items():
        both_tables = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_tables(out[key], value) if both_tables else value
    return out


def read_recipe_dict(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A recipe file as one flat dict, its ``base`` chain merged in (not yet validated)."""
    path = Path(path)
    via = f" (base of {_chain[-1]})" if _chain else ""
    raw = _read_toml(path, via)
    if BASE_KEY not in raw:
        return raw
    base = raw.pop(BASE_KEY)
    if not isinstance(base, str) or not base or not base.isprintable():
        raise RecipeError(f"{path}: {BASE_KEY} must be a recipe file name, relative to this file, got {_show(base)}")
    chain = (*_chain, path)
    base_path = path.parent / base
    if any(base_path.resolve() == p.resolve() for p in chain):  # resolve(): a/../a.toml is a.toml
        cycle = " -> ".join(str(p) for p in (*chain, base_path))
        raise RecipeError(f"{path}: {BASE_KEY} recipes form a cycle: {cycle}")
    return merge_tables(read_recipe_dict(base_path, chain), raw)


def load_recipe(path: str | Path, overrides: typing.Iterable[str] = ()) -> Recipe:
    """Read and validate a recipe file (and its bases); ``overrides`` are ``key.path=value`` strings."""
    return recipe_from_dict(read_recipe_dict(path), str(path), overrides)

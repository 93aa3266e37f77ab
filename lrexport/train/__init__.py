from .checkpoint import build_model, load_checkpoint, load_model, save_checkpoint
from .loop import Loss, evaluate, train_one_epoch
from .pipeline import Pipeline, RunResult, run_recipe

__all__ = [
    "build_model", "load_checkpoint", "load_model", "save_checkpoint", "Loss", "evaluate", "train_one_epoch",
    "Pipeline", "RunResult", "run_recipe",
]

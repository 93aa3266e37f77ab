"""The one exception family users can cause; the CLI prints its message and exits non-zero."""


class LrexportError(Exception):
    """Base of every error caused by user input (recipe, data, checkpoint, runtime)."""

    exit_code = 1


class RecipeError(LrexportError):
    """A recipe that cannot be used: unknown key, wrong type, out-of-range value."""

    exit_code = 2


class DataError(LrexportError):
    """A data set that is missing or does not fit the model."""


class CheckpointError(LrexportError):
    """A checkpoint that is missing, corrupt, or does not match the model."""


class WriteError(LrexportError):
    """A file that could not be written (disk full, no permission); its previous version is intact."""


class ModelError(LrexportError):
    """A model the recipe (or the caller) names that cannot be built: an unknown name, an import path that
    does not resolve, a factory that raises, weights that do not fit it."""

    exit_code = 2


class RuntimeMissingError(LrexportError):
    """An optional runtime (TensorRT, a GPU) that this machine lacks."""

    exit_code = 2


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception raised by code that is not ours (a user's model, a runtime) as one short line: its type and first line."""
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0][:limit]}" if text else e.__class__.__name__

import pytest
import torch

# The tests train and export tiny models: on a 2-core machine a second intra-op thread only
# adds contention (and under load it made tiny runs many times slower). Subprocesses the
# tests start set OMP_NUM_THREADS themselves.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def recipe_file(tmp_path_factory):
    """Writes a recipe's text into a fresh folder and returns the file's path."""

    def write(text: str):
        path = tmp_path_factory.mktemp("recipe") / "tiny.toml"
        path.write_text(text)
        return path

    return write

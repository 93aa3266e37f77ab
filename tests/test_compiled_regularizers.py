"""reg.compile: the regularizer terms through torch.compile equal the eager ones, and a machine
that cannot compile (no C++ compiler) warns once and trains eagerly."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lrexport.errors import RecipeError
from lrexport.recipe import recipe_from_dict
from lrexport.train.loop import Loss

TINY = """
import torch
from torch import nn
from lrexport.lowrank import SVDConv2d
torch.manual_seed(0)
model = nn.Sequential(SVDConv2d(3, 8, 3, padding=1, mode="channel"), nn.ReLU(), SVDConv2d(8, 6, 3, mode="spatial"))
"""


def tiny_model() -> nn.Module:
    namespace = {}
    exec(TINY, namespace)
    return namespace["model"]


def grads_and_terms(model: nn.Module, loss: Loss):
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(6, (4,))
    model.zero_grad()
    terms = loss.terms(model, model(x).mean((2, 3)), y)
    loss.total(terms).backward()
    return {k: v.item() for k, v in terms.items()}, [p.grad.clone() for p in model.parameters()]


def test_compiled_terms_and_gradients_equal_eager():
    model = tiny_model()
    eager = Loss(ortho=1.0, sparsity_type="hoyer", decay=0.3)
    terms, grads = grads_and_terms(model, eager)
    compiled = eager.compiled()
    for _ in range(2):  # the first call compiles, the second runs the compiled code
        c_terms, c_grads = grads_and_terms(model, compiled)
        assert c_terms.keys() == {"ce", "ortho", "sparsity"}
        for k in terms:
            assert abs(c_terms[k] - terms[k]) <= 1e-5 * max(1.0, abs(terms[k])), k
        for g, cg in zip(grads, c_grads):
            assert torch.allclose(g, cg, rtol=1e-4, atol=1e-6)
    assert compiled._regularizers.fn is not compiled._regularizers.eager  # it compiled: no eager fallback


def test_without_a_compiler_it_warns_and_runs_eagerly(tmp_path):
    script = TINY + textwrap.dedent("""
        import warnings
        from lrexport.train.loop import Loss
        loss = Loss(ortho=1.0, sparsity_type="l1", decay=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = loss.compiled()._regularizers(model)
        eager = loss.regularizers(model)
        print("WARN", [str(w.message) for w in caught if "torch.compile" in str(w.message)])
        print("EQUAL", all(torch.equal(compiled[k], eager[k]) for k in eager))
    """)
    # the compiler inductor calls for CPU code does not exist; no cached kernels to fall back on
    env = os.environ | {"CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
                        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    warn_line = next(line for line in out.stdout.splitlines() if line.startswith("WARN"))
    assert "torch.compile of the regularizers failed" in warn_line and "reg.compile = false" in warn_line
    assert "EQUAL True" in out.stdout


def test_reg_compile_accepts_auto_true_false_only():
    for value in ("auto", True, False):
        assert recipe_from_dict({"reg": {"compile": value}}).reg.compile == value
    for bad in ("yes", 1):
        with pytest.raises(RecipeError, match="reg.compile"):
            recipe_from_dict({"reg": {"compile": bad}})

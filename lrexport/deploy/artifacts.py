"""An artifact directory's shared files: their names and meta.json's version. Export writes them, verify
and ``lrexport infer`` read them; a backend's own files are named by its module. Torch-free."""

MODELS = ("lowrank", "dense")
FILES = {"lowrank": "model.onnx", "dense": "dense.onnx", "dense_fp32": "dense_fp32.onnx"}  # the last with QDQ int8 only
PROGRAMS = {"lowrank": "model.pt2", "dense": "dense.pt2"}  # the plain models as PyTorch programs
META_FILE = "meta.json"
PLAN_FILE = "plan.json"
REFERENCE_FILE = "reference.npz"  # PyTorch's predictions on the validation set: what verify compares with
META_VERSION = 2  # 2: plan.json, reference.npz, PyTorch programs; verify needs no run directory

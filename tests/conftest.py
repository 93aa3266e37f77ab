import torch

# The tests train and export tiny models: on a 2-core machine a second intra-op thread only
# adds contention (and under load it made tiny runs many times slower). Subprocesses the
# tests start set OMP_NUM_THREADS themselves.
torch.set_num_threads(1)

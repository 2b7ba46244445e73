"""grpo-pipeline: GRPO fine-tuning of language models as reproducible, tracked pipeline stages."""

import os as _os

__version__ = "0.1.0"

# The same settings on the same machine and thread count give the same bytes only if every parallel region runs on
# the same number of threads. OpenMP (OMP_DYNAMIC) and MKL (MKL_DYNAMIC) may otherwise shrink a team when the machine
# is loaded (libgomp: by the 15-minute load average), and a reduction split over fewer threads sums in another order:
# the curves part and the weights differ. Pinned here, before any of our modules loads torch and with it the OpenMP
# runtime that reads these once; inherited by every launched rank and stage subprocess. Unloaded, a pinned team is the
# runtimes' own default, so this costs nothing; loaded, it keeps the configured thread count (docs/operations.md).
DYNAMIC_THREAD_VARIABLES = ("OMP_DYNAMIC", "MKL_DYNAMIC")
for _name in DYNAMIC_THREAD_VARIABLES:
    _os.environ[_name] = "FALSE"
# cuBLAS is deterministic only with a fixed workspace, read when CUDA starts (grpo_steps/platform/modeling.py's
# deterministic_kernels turns torch's deterministic algorithms on).
_os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

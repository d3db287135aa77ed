"""mdlora: multi-domain CTR prediction with low-rank adapters."""

import os as _os

__version__ = "0.1.0"

# OpenMP threads that finish a parallel region early spin before they sleep; GNU OpenMP's
# default (300k spins) is tuned for a machine the process has to itself. On a busy machine a
# spinning thread holds a core its partner needs, and a 2-thread training step measured
# 5 ms quiet went to 26-137 ms next to two other busy processes; with 10k spins it took
# 12-16 ms busy and still 5 ms quiet. Only a default: an explicit GOMP_SPINCOUNT or
# OMP_WAIT_POLICY wins, and it must be set before torch loads OpenMP (``import torch``).
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "10000")

"""``python -m fairchem_dens.data``: generate small OC20/OC22-format LMDB datasets.

The BLAS/OpenMP thread counts are pinned to 1 *before* numpy is imported, overriding the
environment. There are two reasons. ASE's BFGS on these small systems is dominated by tiny
linear-algebra calls, and multi-threaded BLAS made it 5-10x slower (observed with numpy 2.x).
Also, the thread count changes the floating-point rounding of the BLAS results, so pinning it
keeps the output bytes reproducible.
"""

import os
import sys

from fairchem_dens.data import options

for _key, _val in options.THREAD_ENV.items():
    os.environ[_key] = _val
# Relaxations may run in this process only if numpy loads after the pinning.
options.BLAS_PINNED = "numpy" not in sys.modules

from fairchem_dens.data.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())

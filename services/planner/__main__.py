import os

# statsmodels' fits make many tiny BLAS calls; BLAS threads only contend for the cores the workers
# need (single fits took seconds on a loaded 2-core machine). Set before numpy loads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from common.rpc.server import run  # noqa: E402
from services.planner.server import main  # noqa: E402

run(main)

"""fusionct: kernels.

numba's parallel kernels run on its OpenMP threading layer. By default OpenMP's idle worker
threads spin (active waiting) for a while after every parallel region; between kernel calls
the pipeline runs single-threaded NumPy/SciPy work, and on a small machine (2 cores) the
spinning workers steal those cores: the whole study ran 2.1x slower than with passive
waiting. ``OMP_WAIT_POLICY`` is read once, when numba loads its OpenMP pool (the first
parallel call), so it is set here, before any kernel module is imported;
``os.environ.setdefault`` leaves a value the user set (e.g. ``OMP_WAIT_POLICY=ACTIVE``)
alone.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import os

# Keep every test single-threaded per process: CI has 2 cores and tests may spawn workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")

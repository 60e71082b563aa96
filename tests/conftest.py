import os

# Keep every test single-threaded per process: CI has 2 cores and tests may spawn workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_model_cache(tmp_path_factory):
    """ONNX exports made by `backend="auto"` go to a temporary cache, never the user's."""
    previous = os.environ.get("FACEKD_CACHE_DIR")
    os.environ["FACEKD_CACHE_DIR"] = str(tmp_path_factory.mktemp("facekd-cache"))
    yield
    if previous is None:
        os.environ.pop("FACEKD_CACHE_DIR", None)
    else:
        os.environ["FACEKD_CACHE_DIR"] = previous


@pytest.fixture
def keep_torch_threads():
    """`open_model` sets torch's process-wide thread count: put it back after the test (modules
    that open models set `pytestmark = pytest.mark.usefixtures("keep_torch_threads")`)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)

"""Shared test configuration.

- ``@pytest.mark.torch`` tests run the original's PyTorch code path (timm 0.9.16) beside
  ours; they are skipped with a clear reason when torch/timm are not installed.
- ``@pytest.mark.slow`` tests (full ViT-Large) run only with RUN_SLOW=1.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# huggingface_hub reads HF_* at import time: never let a test reach the network.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _have_torch_stack():
    import warnings
    try:
        with warnings.catch_warnings():  # torch 2.14 warns about its own torch.jit at import
            warnings.simplefilter("ignore", FutureWarning)
            import torch  # noqa: F401
            import timm  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def pytest_sessionstart(session):
    """RETFOUND_REQUIRE_KERNELS=1 (set by .ci/run when a C++ compiler is present): fail at once if
    the fused CPU kernel library does not build and load with oneDNN's GEMMs, instead of letting
    every kernel test skip."""
    if os.environ.get("RETFOUND_REQUIRE_KERNELS") != "1":
        return
    from util_mindspore import cpu_kernels
    if not (cpu_kernels.enabled() and cpu_kernels.linear_available() and cpu_kernels.linear_available(bf16=True)):
        pytest.exit(f"RETFOUND_REQUIRE_KERNELS=1 but the fused CPU kernels are not usable: {cpu_kernels.status()}",
                    returncode=1)


def pytest_collection_modifyitems(config, items):
    have_torch = _have_torch_stack()
    run_slow = os.environ.get("RUN_SLOW") == "1"
    skip_torch = pytest.mark.skip(reason="needs torch==2.14.1 and timm==0.9.16 (pip install -r requirements_test.txt)")
    skip_slow = pytest.mark.skip(reason="slow: set RUN_SLOW=1 to run")
    for item in items:
        if "torch" in item.keywords and not have_torch:
            item.add_marker(skip_torch)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _restore_print():
    """main() installs the original's timestamped print (setup_for_distributed); undo it per test."""
    import builtins
    saved = builtins.print
    yield
    builtins.print = saved

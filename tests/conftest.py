"""Shared test set-up: hypothesis profiles and the device every test runs on.

Profiles (choose with HYPOTHESIS_PROFILE=...):
  ci        the default: few examples, no deadline, so the suite stays within a few
            minutes on 2 CPU cores.
  thorough  many more examples, for a local hunt for counterexamples.

References: comparisons with PyTorch, transformers, tiktoken, tokenizers, gensim,
sacrebleu and sentence-transformers skip cleanly where those are not installed, so
the two-package test command works anywhere. With MINILLM_REQUIRE_REFERENCES=1
(what CI sets) every skip is a failure instead, except a skip for a missing GPU:
a comparison that did not run has proved nothing.

Device: tests take the ``xp`` fixture, the array module chosen by MINILLM_DEVICE
(cpu by default). ``MINILLM_DEVICE=gpu python -m pytest`` runs the very same tests
on CuPy; without a GPU those tests are skipped, never failed.
"""
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # tests/strategies.py, tests/helpers.py

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.filter_too_much])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def xp():
    """numpy, or cupy under MINILLM_DEVICE=gpu (skipped when no GPU is usable)."""
    from minillm import backend
    name = backend.device_name()
    if name == "gpu":
        if not backend.gpu_available():
            pytest.skip("MINILLM_DEVICE=gpu but no usable GPU/CuPy here")
        import cupy
        return cupy
    return np


REQUIRE_REFERENCES = os.environ.get("MINILLM_REQUIRE_REFERENCES", "") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under MINILLM_REQUIRE_REFERENCES=1 a skipped test fails, naming why it skipped."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_REFERENCES and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "GPU" not in reason:
            report.outcome = "failed"
            report.longrepr = (f"skipped under MINILLM_REQUIRE_REFERENCES=1 (a reference comparison "
                               f"must run in CI): {reason}")

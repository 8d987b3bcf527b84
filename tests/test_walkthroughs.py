"""Every walkthrough script runs to the end (in its fast mode, MINILLM_FAST=1)."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "walkthroughs").glob("[0-9]*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_walkthrough_runs(script, tmp_path):
    env = dict(os.environ, MINILLM_FAST="1", MPLBACKEND="Agg", MINILLM_DEVICE=os.environ.get("MINILLM_DEVICE", "cpu"))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{script.name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert r.stdout.strip(), f"{script.name} printed nothing: a walkthrough narrates"

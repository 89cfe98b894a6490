"""Without Ray (a client-only install), Ray training fails in one line that names the `train` extra."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dtype("none")  # no model numerics

REPO = Path(__file__).resolve().parents[3]

# Hides Ray as a client-only install would; then asks for Ray training.
_PROBE = """
import sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoRay())
from student_client.training.ray_runner import TrainingError, run_with_ray
try:
    run_with_ray(None)
except TrainingError as err:
    print(f"TrainingError: {err}")
"""


def test_ray_training_without_ray_names_the_train_extra() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("TrainingError: Ray is not installed"), out.stdout
    assert "pip install 'maskedkd-service[train]'" in lines[0]

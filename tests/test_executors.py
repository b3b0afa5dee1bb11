"""The executor options a user can get wrong are refused with exit 2 and one message naming the
option, before anything runs (the cluster paths themselves: tests/test_cluster.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_spec import base_spec


@pytest.mark.parametrize(("args", "field", "says"), [
    (["--executor", "kubernetes"], "--executor", "local, ray or slurm"),
    (["--executor", "slurm"], "--executor", "no Slurm here"),
    (["--address", "127.0.0.1:6379"], "--address", "goes with --executor ray"),
    (["--storage", "/tmp/x"], "--storage", "experiment directory"),
])
def test_a_wrong_executor_option_is_a_user_error(tmp_path: Path, articles_data: dict,
                                                 args: list[str], field: str, says: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(base_spec(articles_data), sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "run", str(path), "--out",
                           str(tmp_path / "exp"), *args], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert field in done.stderr and says in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "exp" / "runs").exists()  # nothing ran

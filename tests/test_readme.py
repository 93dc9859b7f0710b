"""The README's command sequence runs as written, in a fresh project folder, on tiny parameters.

The block after the marker ``<!-- tests/test_readme.py runs this block -->`` is run by bash, line for line, in a
temporary folder holding a `.venv` link to this virtualenv and the project's params.yaml with sizes cut down (the
same cut as tests/test_dvc.py). Nothing is prefixed or rewritten: what the README says is what runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from test_dvc import tiny_params

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- tests/test_readme.py runs this block -->"


def readme_block() -> str:
    """The fenced block that follows the marker."""
    text = (ROOT / "README.md").read_text()
    assert MARKER in text, f"README.md lost the marker {MARKER!r}"
    found = re.search(r"```(?:bash|sh)?\n(.*?)```", text[text.index(MARKER):], flags=re.S)
    assert found, "no fenced block after the marker"
    return found.group(1)


def test_the_block_is_the_sequence_users_need():
    block = readme_block()
    assert block.splitlines()[0].startswith("source .venv/bin/activate")
    for stage in ("synth", "ingest", "base", "encode", "train", "evaluate", "compare", "register", "promote"):
        assert re.search(rf"^sdpo {stage}\b", block, flags=re.M), f"the sequence has no `sdpo {stage}`"
    assert "--split heldout" in block  # the held-out shards that training and evaluation read


def test_readme_sequence_runs_as_written(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / ".venv").symlink_to(Path(sys.executable).parents[1])
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(tmp_path / "toy-cache"), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "VIRTUAL_ENV")}
    script = "set -euo pipefail\n" + readme_block()
    proc = subprocess.run(["bash", "-c", script], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert (project / "data" / "models" / "dpo-sdpo" / "model" / "model_index.json").is_file()
    assert (project / "data" / "evals" / "dpo-sdpo" / "metrics.json").is_file()
    assert (project / "mlflow.db").is_file()  # the default store: ./mlflow.db where the commands run
    assert re.search(r"version \d+", output), output[-3000:]  # register says which version holds the model

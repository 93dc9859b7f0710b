"""The import-order trap: a process that imported metaflow after typing_extensions still loads our model.

Metaflow's vendored typing_extensions, imported after the real one, breaks a later first import of torch or
diffusers (see sdpo/compat.py). The registered pyfunc model restores the real patches before it imports them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import mlflow
from train_world import tiny_sd15  # noqa: F401  (fixture)

TRAP = "import typing_extensions\nimport metaflow._vendor.typing_extensions  # as metaflow.Runner imports it\n"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def test_the_trap_is_real_without_the_fix():
    proc = _python(TRAP + "from diffusers import DiffusionPipeline\n")
    assert proc.returncode != 0 and "without a default follows type parameter" in proc.stderr, proc.stderr[-2000:]


def test_metaflow_first_then_the_logged_model_loads_and_generates(tiny_sd15, tmp_path):  # noqa: F811
    from sdpo.tracking.pyfunc import log_pipeline_model

    store, before = f"sqlite:///{tmp_path / 'mlflow.db'}", mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    try:
        experiment = mlflow.create_experiment("import-order")  # an active experiment of another store is unknown here
        with mlflow.start_run(experiment_id=experiment):
            info = log_pipeline_model(str(tiny_sd15), steps=1)
    finally:
        mlflow.set_tracking_uri(before)
    proc = _python(TRAP + textwrap.dedent(f"""
        import mlflow, pandas as pd
        mlflow.set_tracking_uri("{store}")
        model = mlflow.pyfunc.load_model("{info.model_uri}")
        out = model.predict(pd.DataFrame({{"prompt": ["a red square"], "seed": [0]}}),
                            params={{"num_inference_steps": 1}})
        assert len(out) == 1 and len(out["image"][0]) > 100
        print("generated")
        """))
    assert proc.returncode == 0 and "generated" in proc.stdout, proc.stderr[-4000:]

"""Test-wide environment. Tools read these at import time, so they are set before anything imports them."""

import os

import pytest

# Metaflow rejects 'root' (CI runs as root) and reads the user when it is imported.
os.environ.setdefault("METAFLOW_USER", "sdpo-test")
os.environ.setdefault("USERNAME", "sdpo-test")
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["GIT_PYTHON_REFRESH"] = "quiet"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no spinning threads under contention
# Metaflow's vendored typing_extensions patches `typing`; torch and diffusers imported for the first time after it
# fail ("Type parameter ... without a default follows type parameter with a default"). Import them first.
import diffusers  # noqa: E402,F401
import torch  # noqa: E402,F401
from mlflow_fixtures import mlflow_server, mlflow_tracking, tiny_pipeline_dir  # noqa: E402,F401
from pipeline_fixtures import small_shards, toy_base, toy_cache, toy_shards  # noqa: E402,F401
from train_world import moto_s3, tiny_sd15, tracking, tracking_uri  # noqa: E402,F401

_TORCH_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Some code under test (benchmarks, flow steps run in process) sets torch's thread count: undo it after each."""
    yield
    torch.set_num_threads(_TORCH_THREADS)

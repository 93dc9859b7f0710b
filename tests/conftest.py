"""Test-wide environment. Tools read these at import time, so they are set before anything imports them."""

import os
import tempfile

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
# The local S3 server's port is fixed now: Metaflow reads its S3 endpoint when it is imported, and this process reads
# the artifacts of flows that ran on the S3 datastore (tests/store_fixtures.py starts the server on this port).
from sdpo.devstack import CREDENTIALS, free_port  # noqa: E402

os.environ["METAFLOW_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
os.environ.setdefault("METAFLOW_S3_RETRY_COUNT", "2")  # a misdirected S3 call fails in seconds, not minutes
for _name, _value in CREDENTIALS.items():
    os.environ.setdefault(_name, _value)  # dummy credentials: no test may reach a real cloud
# Shard-verification verdicts and reward-weight copies go to a throwaway folder, never the user's ~/.cache.
os.environ["SDPO_VERIFY_CACHE"] = tempfile.mkdtemp(prefix="sdpo-test-verify-")
os.environ["SDPO_CACHE"] = tempfile.mkdtemp(prefix="sdpo-test-cache-")
# Stages log to MLflow: by default into a throwaway store, never the project's mlflow.db (tests that need a server
# point MLFLOW_TRACKING_URI at one).
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp(prefix='sdpo-test-mlflow-')}/mlflow.db"
# Metaflow's vendored typing_extensions patches `typing`; torch and diffusers imported for the first time after it
# fail ("Type parameter ... without a default follows type parameter with a default"). Import them first.
import diffusers  # noqa: E402,F401
import torch  # noqa: E402,F401
from mlflow_fixtures import mlflow_server, mlflow_tracking, tiny_pipeline_dir  # noqa: E402,F401
from pipeline_fixtures import small_shards, toy_base, toy_cache, toy_latents, toy_shards  # noqa: E402,F401
from store_fixtures import s3_server  # noqa: E402,F401
from train_world import moto_s3, tiny_sd15, tracking, tracking_uri  # noqa: E402,F401

# Under pytest-xdist the workers share the cores: each gets its share of torch threads (oversubscribed OpenMP
# threads slow every worker down, see the Makefile's OMP_WAIT_POLICY).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))
_TORCH_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Some code under test (benchmarks, flow steps run in process) sets torch's thread count: undo it after each."""
    yield
    torch.set_num_threads(_TORCH_THREADS)


# The longest work units (xdist groups), heaviest first, measured with `pytest --durations` on 2 workers and 2 cores.
# Under `--dist=loadgroup --no-loadscope-reorder` the groups are handed out in collection order, and a worker with
# at most two tests pending is given the next group at once (xdist's LoadScopeScheduling). So worker A takes the
# first pathology group (which builds the shared toy base) and, queued behind it, the second (which needs that
# base: it runs on the same worker, after it, with no wait); worker B takes the S3 flow run (three tests) and then
# the colour-following base (its own 8x8-latent VAE and UNet, about a minute; it needs nothing of A's). A training
# queued on B instead would sit idle until A's base is done (measured: 72 s). Starting the long units first keeps
# any of them from becoming a tail that one worker runs alone at the end. The pathology tests are one group per
# (arm, seed); every other module is its own group, so its module fixtures run once, as with `--dist=loadfile`.
HEAVY_FIRST = ("pathology-dpo-0", "flow-s3", "pathology-dpo-sdpo-0", "test_toy_base.py", "pathology-dpo-1",
               "pathology-dpo-sdpo-1", "test_dvc.py", "flow-local", "test_bench.py", "test_readme.py",
               "test_tracking_registry.py", "test_tracking_gate.py", "test_train.py", "test_experiments.py",
               "test_cache.py")


def _group(item: pytest.Item) -> str:
    return item.get_closest_marker("xdist_group").args[0]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """One xdist group per module unless a test names its own; the heavy groups first (stable otherwise)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(HEAVY_FIRST)))


def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    """Fail fast when xdist silently drops the groups (pytest 9.2 with xdist 3.8: pytest-dev/pytest-xdist#1386).

    A worker tags each grouped test's node id with "@group"; without the tag every test is its own work unit and each
    module fixture (flow runs, `dvc repro`) runs once per worker, doubling the suite.
    """
    untagged = [nodeid for nodeid in ids if "@" not in nodeid]
    if node.config.getvalue("dist") == "loadgroup" and untagged:
        raise pytest.UsageError(
            f"pytest-xdist ignored the xdist_group markers ({len(untagged)} tests untagged, e.g. {untagged[0]}); "
            f"install the pytest pinned in constraints.txt (pytest {pytest.__version__} is not supported here)"
        )

"""A cloud-shaped stack on 127.0.0.1: an S3-compatible server (moto) and an MLflow server with S3 artifacts.

The tests use it to run the pipeline against real servers, and ``make run-s3`` uses it to show the cloud mode
without an account::

    python -m sdpo.devstack run-s3 [-- FLOW ARGS...]

starts both servers, runs the flow on the embedded default with Metaflow's S3 datastore and ``data.root`` in the
bucket, prints where everything went, and stops the servers. Every setting is the ecosystem's own:
``AWS_ENDPOINT_URL`` (boto3, s3fs, pyarrow), ``METAFLOW_S3_ENDPOINT_URL`` / ``METAFLOW_DATASTORE_SYSROOT_S3``
(Metaflow) and ``MLFLOW_S3_ENDPOINT_URL`` (the MLflow server's artifact store).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT_S = 120
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class LocalS3:
    """A running S3-compatible server and the environment that points every client at it."""

    endpoint: str
    bucket: str

    def env(self) -> dict[str, str]:
        """Variables for boto3/s3fs/pyarrow, Metaflow's S3 datastore and MLflow's S3 artifact client."""
        return {
            **CREDENTIALS,
            "AWS_ENDPOINT_URL": self.endpoint,
            "METAFLOW_S3_ENDPOINT_URL": self.endpoint,
            "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{self.bucket}/metaflow",
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **{
            "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": CREDENTIALS["AWS_DEFAULT_REGION"]})

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under ``prefix``."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@contextlib.contextmanager
def local_s3(bucket: str = "sdpo-local", port: int | None = None) -> Iterator[LocalS3]:
    """Run moto's S3 server in this process on 127.0.0.1 with ``bucket`` created; stopped when the block ends."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port or free_port(), verbose=False)
    server.start()
    try:
        host, bound = server.get_host_and_port()
        s3 = LocalS3(f"http://{host}:{bound}", bucket)
        s3.client().create_bucket(Bucket=bucket)
        yield s3
    finally:
        server.stop()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@contextlib.contextmanager
def mlflow_server(workdir: str | Path, *, artifacts: str | None = None, env: dict[str, str] | None = None,
                  port: int | None = None) -> Iterator[str]:
    """Run ``mlflow server`` (SQLite backend in ``workdir``, proxied artifacts) on 127.0.0.1; yields its URL.

    ``artifacts`` is the artifact destination (default: a folder in ``workdir``; ``s3://...`` with ``env`` pointing
    at an S3 server). One worker, no job runner: the pipeline uses neither.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).parent / "mlflow"), "server",
               "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
               "--artifacts-destination", artifacts or str(workdir / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    server_env.update(env or {}, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=workdir, env=server_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (_healthy(url) and proc.poll() is None):  # alive: not another server answering on that port
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not ready in {READY_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        _stop(proc)


def run_s3(flow_args: list[str]) -> int:
    """``make run-s3``: the embedded default through a local S3 server and MLflow server, then both stopped."""
    project = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="sdpo-run-s3-") as tmp, local_s3("sdpo-local") as s3, \
            mlflow_server(Path(tmp) / "mlflow", artifacts=f"s3://{s3.bucket}/mlflow", env=s3.env()) as tracking:
        root = f"s3://{s3.bucket}/sdpo"
        env = {**os.environ, **s3.env(), "MLFLOW_TRACKING_URI": tracking}
        overrides = " ".join([f"data.root={root}", *flow_args])
        print(f"local S3 server: {s3.endpoint} (bucket {s3.bucket}); MLflow server: {tracking}", flush=True)
        cmd = [sys.executable, str(project / "flows" / "sdpo_flow.py"), "--datastore=s3", "run", "--set", overrides]
        code = subprocess.run(cmd, env=env, cwd=tmp, check=False).returncode
        keys = s3.keys()
        tops: dict[str, int] = {}
        for key in keys:
            parts = key.split("/")
            top = "/".join(parts[:3]) + ("/" if len(parts) > 3 else "")
            tops[top] = tops.get(top, 0) + 1
        print(f"\n{len(keys)} objects in s3://{s3.bucket}:",
              *[f"  s3://{s3.bucket}/{top}  ({n} objects)" for top, n in sorted(tops.items())], sep="\n")
        print("the servers stop now: this stack is gone when the command ends (run it again to repeat)")
    return code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "run-s3":
        print("usage: python -m sdpo.devstack run-s3 [OVERRIDE=VALUE ...]", file=sys.stderr)
        return 2
    return run_s3(args[1:])


if __name__ == "__main__":
    sys.exit(main())

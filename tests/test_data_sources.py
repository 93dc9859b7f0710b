"""An input that cannot be reached or read is one DataError line naming the URI; the old dataset stays."""

import contextlib
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import sdpo.data.pickapic as pickapic
from sdpo.cli import main
from sdpo.data.pickapic import ingest
from sdpo.data.sources import resolve_inputs
from sdpo.data.synthetic import make_pairs, write_parquet
from sdpo.errors import DataError


def _free_port() -> int:
    """A port nothing listens on: bound once to get a number, then closed, so connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_env(monkeypatch):
    """Point S3 at a local endpoint with dummy credentials, no instance metadata, no config files, no retries."""

    def point_at(port: int, credentials: bool = True) -> str:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        if credentials:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        return f"127.0.0.1:{port}"

    return point_at


@contextlib.contextmanager
def s3_error_server(status: int, code: str) -> Iterator[int]:
    """A stand-in endpoint that answers every S3 request with one error (AccessDenied, NoSuchBucket...)."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, body: bool) -> None:
            xml = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            if body:
                self.wfile.write(xml)

        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            self._reply(True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._reply(False)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def existing(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A good dataset in the output folder, and its bytes."""
    out = tmp_path / "root" / "shards" / "train"  # where `sdpo ingest` with data.root=ROOT writes the train split
    ingest(str(write_parquet(make_pairs(6, seed=1), tmp_path / "good.parquet")), out)
    return out, {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _assert_intact(out: Path, before: dict[str, bytes]) -> None:
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == before
    # no staging folder left behind (the writer lock's file may stay: filelock keeps it to avoid races)
    assert [p.name for p in out.parent.glob(f".{out.name}.*")] in ([], [f".{out.name}.lock"])


@pytest.mark.parametrize("spec", ["s3://pickapic/train/*.parquet", "s3://pickapic/train/part-0.parquet",
                                  "s3://pickapic/train/"])
def test_a_refused_endpoint_is_one_line_naming_the_uri(s3_env, existing, spec):
    endpoint = s3_env(_free_port())
    out, before = existing
    with pytest.raises(DataError) as info:
        ingest(spec, out)
    message = str(info.value)
    assert message.startswith(f"{spec}: lookup failed (") and "\n" not in message
    assert "NETWORK_CONNECTION" in message and endpoint.split(":")[1] in message
    _assert_intact(out, before)


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [(403, "AccessDenied", "ACCESS_DENIED"), (404, "NoSuchBucket", "NO_SUCH_BUCKET")],
)
def test_denied_and_missing_buckets_are_one_line_naming_the_uri(s3_env, existing, status, code, expected):
    out, before = existing
    spec = "s3://pickapic/train/*.parquet"
    with s3_error_server(status, code) as port:
        s3_env(port, credentials=code != "AccessDenied")  # no credentials: the store refuses the request
        with pytest.raises(DataError) as info:
            ingest(spec, out)
    message = str(info.value)
    assert message.startswith(f"{spec}: lookup failed (") and expected in message and "\n" not in message
    _assert_intact(out, before)


def test_a_bad_retry_setting_is_named(s3_env, monkeypatch):
    s3_env(_free_port())
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "many")
    with pytest.raises(DataError, match="AWS_MAX_ATTEMPTS='many'"):
        resolve_inputs("s3://pickapic/train/*.parquet")


def test_the_cli_prints_one_line_without_a_traceback(s3_env, existing, capsys):
    s3_env(_free_port())
    out, before = existing
    spec = "s3://pickapic/train/*.parquet"
    root = out.parent.parent
    real_data_eval = ["--set", "eval.rewards=[synthetic]", "--set", "registry.primary_reward=synthetic"]
    assert main(["ingest", "--set", f"data.input={spec}", "--set", f"data.root={root}", "--split", "train",
                 *real_data_eval]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sdpo ingest: error: {spec}: lookup failed (") and err.count("\n") == 1
    assert "Traceback" not in err
    _assert_intact(out, before)


def test_a_connection_lost_while_scanning_names_the_input_and_keeps_the_old_dataset(tmp_path, existing, monkeypatch):
    out, before = existing
    source = write_parquet(make_pairs(8, seed=2), tmp_path / "in.parquet")
    real = pickapic.ds.dataset

    def dropping(*args, **kwargs):
        dataset = real(*args, **kwargs)

        class Dropping:
            def scanner(self, **options):
                scanner = dataset.scanner(**options)

                class Batches:
                    def to_batches(self):
                        yield next(iter(scanner.to_batches()))
                        raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation:\n connection reset")

                return Batches()

        return Dropping()

    monkeypatch.setattr(pickapic.ds, "dataset", dropping)
    with pytest.raises(DataError) as info:
        ingest(str(source), out, shard_max_pairs=2)
    message = str(info.value)
    assert message.startswith(f"{source}: scanning failed (AWS Error NETWORK_CONNECTION") and "\n" not in message
    _assert_intact(out, before)  # the failure happened while writing shards: the staging folder was discarded

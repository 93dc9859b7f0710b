"""A local S3-compatible server (moto, in process) for every object-store path the tests exercise."""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest

from sdpo.devstack import LocalS3, local_s3


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3]:
    """One S3 server on 127.0.0.1 for the session, with the bucket ``sdpo-test``; tests use their own prefixes."""
    port = urlparse(os.environ["METAFLOW_S3_ENDPOINT_URL"]).port  # fixed in conftest, before Metaflow loads
    with local_s3("sdpo-test", port=port) as server:
        yield server

"""Process-level settings: CPU threads of parallel branches, and private scratch folders for flow steps."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def share_cpu(parallel_tasks: int) -> int:
    """On a machine without CUDA, give this process its share of the cores when ``parallel_tasks`` run at once.

    Oversubscribed OpenMP threads make every process much slower (measured: 10x on 2 cores with two 2-thread
    trainers). ``SDPO_NUM_THREADS`` overrides. Returns the thread count in use.
    """
    import torch

    if torch.cuda.is_available():
        return torch.get_num_threads()
    threads = int(os.environ.get("SDPO_NUM_THREADS", 0)) or max(1, (os.cpu_count() or 1) // max(1, parallel_tasks))
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def isolated_scratch(prefix: str = "sdpo-step-") -> Iterator[Path]:
    """Give this process a private temporary folder for the block (``TMPDIR``, ``SDPO_SCRATCH_DIR``), then delete it.

    A flow step on a cloud worker shares nothing with other steps but the store: whatever it stages or builds locally
    lives here and is gone when the step ends.
    """
    base = Path(tempfile.mkdtemp(prefix=prefix))
    saved = {name: os.environ.get(name) for name in ("TMPDIR", "SDPO_SCRATCH_DIR")}
    saved_tempdir = tempfile.tempdir
    os.environ["TMPDIR"] = os.environ["SDPO_SCRATCH_DIR"] = str(base)
    tempfile.tempdir = str(base)
    try:
        yield base
    finally:
        tempfile.tempdir = saved_tempdir
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(base, ignore_errors=True)

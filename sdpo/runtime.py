"""Process-level settings for CPU runs."""

from __future__ import annotations

import os


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

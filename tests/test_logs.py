"""sdpo.logs: the libraries' loading bars are quiet, and quieting them imports nothing heavy.

Each check runs in a fresh interpreter: what matters is the order of imports, which this test process has long fixed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SETUP = "from sdpo.logs import configure_logging\nconfigure_logging(False)\n"


def _python(code: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_configuring_the_logs_imports_neither_torch_nor_diffusers():
    proc = _python(SETUP + "import sys\nprint(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))\n")
    assert proc.stdout.strip() == "[]", proc.stdout


def test_a_pipeline_imported_after_configuring_loads_without_bars(tiny_pipeline_dir):
    load = ("from diffusers import StableDiffusionPipeline\n"
            f"StableDiffusionPipeline.from_pretrained({str(tiny_pipeline_dir)!r})\n")
    quiet = _python(SETUP + load)
    assert "Loading pipeline components" not in quiet.stderr, quiet.stderr[-2000:]
    assert "Loading weights" not in quiet.stderr, quiet.stderr[-2000:]
    loud = _python(load)  # the same load unconfigured shows the bars: the check above can fail
    assert "Loading pipeline components" in loud.stderr, loud.stderr[-2000:]

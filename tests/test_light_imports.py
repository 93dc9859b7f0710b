"""Processes that never load a diffusion model do not import diffusers or transformers (seconds per process).

Every flow task, DVC stage and CLI command is a fresh process; the light ones (ingest, rewards, compare, the
promotion gate, the CLI parser) must not pay for the model libraries, and ``sdpo.models`` loads its names on first
use. Checked in one fresh interpreter: this one imported diffusers in conftest.py.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap

LIGHT_MODULES = ("sdpo.cli", "sdpo.config", "sdpo.stages", "sdpo.models", "sdpo.models._atomic",
                 "sdpo.data.pickapic", "sdpo.eval.rewards.preference", "sdpo.eval.winrate", "sdpo.tracking.gate",
                 "sdpo.tracking.registry", "sdpo.models.components", "sdpo.train.encode")
MODEL_LIBRARIES = ("diffusers", "transformers", "peft")


def test_light_modules_import_no_model_library_and_models_load_on_first_use():
    code = textwrap.dedent(f"""
        import importlib, json, sys
        for name in {LIGHT_MODULES!r}:
            importlib.import_module(name)
        light = [m for m in {MODEL_LIBRARIES!r} if m in sys.modules]
        from sdpo.models import TINY_FAMILIES, load_model
        import sdpo.models.families
        print(json.dumps({{"light": light, "after": "diffusers" in sys.modules,
                          "same": load_model is sdpo.models.families.load_model, "tiny": sorted(TINY_FAMILIES)}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.splitlines()[-1])
    assert found["light"] == [], found
    assert found["after"] and found["same"] and "sd15" in found["tiny"], found


def test_the_models_package_lists_each_lazy_name_once_and_resolves_it():
    import sdpo.models as models

    assert sorted(models.__all__) == sorted(models._MODULE_OF)  # __all__ and the export table agree
    for name in models.__all__:
        assert getattr(models, name) is getattr(importlib.import_module(models._MODULE_OF[name]), name)

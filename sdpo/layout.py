"""Where every artifact of a run lives: one object over a local folder or an object-store root.

The flow, the stages and ``dvc.yaml`` use these paths and nothing else (``tests/test_layout.py`` checks that
``dvc.yaml`` agrees)::

    ROOT/raw/<split>.parquet            synthetic world as Pick-a-Pic parquet (embedded default only)
    ROOT/staging/ingest/<split>-<n>/    parts ingested in parallel, removed once merged
    ROOT/shards/<split>/                pairs-000000.tar ..., rejects.jsonl, manifest.json (written last)
    ROOT/cache/encoded/<split>/         latent cache of the split's shards (`sdpo encode`): pairs-000000.tar ...,
                                        empty_prompt.safetensors, reference_errors.npy, manifest.json (last)
    ROOT/cache/toy-base/<key>/          toy base models, keyed by what determines them
    ROOT/models/base/                   base.json (which base, its digest) and model/ for a built base
    ROOT/models/<arm>/                  model/, checkpoints/step-N/, metrics.jsonl, heldout.jsonl,
                                        training_summary.json, train_curve.json, heldout_curve.json
    ROOT/rewards/<name>/                a reward model the pipeline trains (the embedded `preference` scorer):
                                        model.safetensors, config.json (written last)
    ROOT/evals/<arm>/                   images/, scores.jsonl, manifest.json, grid.png, summary.json,
                                        sets/<prompt set>/ (the same files for each further prompt set),
                                        metrics.json (written last)
    ROOT/evals-over-steps/<arm>/step-N/ the same for a kept training checkpoint (rewards only; `sdpo experiment
                                        --checkpoint-rewards`)
    ROOT/reports/                       compare-<arm>.json, registry.json, promotion.json,
                                        promotion_summary.json, summary.json
    ROOT/experiments/<name>/            `sdpo experiment`: seed-<s>/ (a whole run layout per seed), results.csv,
                                        results.md, curves.csv, plots/*.png, experiment.json
    ROOT/.../.<name>.lock               the writer lock of the folder <name> beside it (sdpo.locks)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sdpo.fs import is_remote, join

SPLITS = ("train", "heldout")
BASE_ARM = "base"
EVAL_SETS = "sets"  # evals/<arm>/sets/<name>/: each further prompt set, a whole evaluation folder
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _name(kind: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"{kind} {value!r}: use letters, digits, '-' or '_' (it becomes a folder name)")
    return value


@dataclass(frozen=True)
class RunLayout:
    """The run layout under ``root`` (a local folder or ``s3://bucket/prefix``)."""

    root: str

    @classmethod
    def resolve(cls, root: str, project_dir: str | Path | None = None) -> RunLayout:
        """A layout for a configured root: URIs as they are, relative local paths against ``project_dir``."""
        if is_remote(root):
            return cls(root.rstrip("/"))
        path = Path(root)
        if not path.is_absolute():
            path = Path(project_dir or Path.cwd()) / path
        return cls(str(path.resolve()))

    @property
    def remote(self) -> bool:
        return is_remote(self.root)

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    # --- data ---------------------------------------------------------------------------------------------

    def raw(self, split: str) -> str:
        return self.path("raw", f"{_name('split', split)}.parquet")

    def ingest_part(self, split: str, part: int) -> str:
        return self.path("staging", "ingest", f"{_name('split', split)}-{part:04d}")

    def shards(self, split: str) -> str:
        return self.path("shards", _name("split", split))

    def manifest(self, split: str) -> str:
        return join(self.shards(split), "manifest.json")

    def cache(self, split: str) -> str:
        """The latent cache of ``shards(split)``: VAE posteriors, text embeddings, optional reference errors."""
        return self.path("cache", "encoded", _name("split", split))

    # --- models -------------------------------------------------------------------------------------------

    def toy_base_cache(self) -> str:
        return self.path("cache", "toy-base")

    def base_dir(self) -> str:
        return self.path("models", BASE_ARM)

    def base_record(self) -> str:
        return join(self.base_dir(), "base.json")

    def train_dir(self, arm: str) -> str:
        return self.path("models", _name("arm", arm))

    def model(self, arm: str) -> str:
        return join(self.train_dir(arm), "model")

    def checkpoints(self, arm: str) -> str:
        return join(self.train_dir(arm), "checkpoints")

    def training_file(self, arm: str, name: str) -> str:
        """A file beside the model: metrics.jsonl, heldout.jsonl, training_summary.json, *_curve.json."""
        return join(self.train_dir(arm), name)

    # --- evaluation and reports ---------------------------------------------------------------------------

    def reward_model(self, name: str) -> str:
        """A reward model trained by the pipeline (the rewards stage), e.g. the embedded ``preference`` scorer."""
        return self.path("rewards", _name("reward", name))

    def evals(self, arm: str) -> str:
        return self.path("evals", _name("arm", arm))

    def eval_sets(self, arm: str) -> str:
        """The evaluations of the further prompt sets (``eval.prompt_sets``), published inside the arm's one."""
        return join(self.evals(arm), EVAL_SETS)

    def eval_set(self, arm: str, prompt_set: str) -> str:
        return join(self.eval_sets(arm), _name("prompt set", prompt_set))

    def checkpoint_evals(self, arm: str) -> str:
        """The evaluations of the arm's training checkpoints (``sdpo experiment --checkpoint-rewards``)."""
        return self.path("evals-over-steps", _name("arm", arm))

    def checkpoint_eval(self, arm: str, step: int) -> str:
        return join(self.checkpoint_evals(arm), f"step-{int(step):07d}")

    def reports(self) -> str:
        return self.path("reports")

    def report(self, name: str) -> str:
        return join(self.reports(), name)

    def compare_report(self, arm: str) -> str:
        return self.report(f"compare-{_name('arm', arm)}.json")

    # --- experiments (`sdpo experiment`) ------------------------------------------------------------------

    def experiment(self, name: str) -> str:
        """An experiment's folder: its tables and plots, and one run root per seed."""
        return self.path("experiments", _name("experiment", name))

    def experiment_seed(self, name: str, seed: int) -> str:
        """The run root of one seed of an experiment (a whole layout of its own: ``RunLayout(that)``)."""
        return join(self.experiment(name), f"seed-{int(seed)}")

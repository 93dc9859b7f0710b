"""SDPOFlow: ingest -> base -> encode (+ rewards) -> train (one branch per arm) -> evaluate -> compare -> register.

Every step is one call into :mod:`sdpo.stages`, the same functions the ``sdpo`` commands and ``dvc.yaml`` run.
Steps share nothing but the run layout's root (``data.root``: a local folder or ``s3://bucket/prefix``) and small
artifacts (URIs, metrics); each works in its own scratch folder, deleted when it ends. So the same flow runs on a
laptop and with every step on its own machine::

    python flows/sdpo_flow.py run                                    # the embedded default, locally
    python flows/sdpo_flow.py run --set "train.variants.dpo-sdpo.mu=0.5 train.steps=100"
    python flows/sdpo_flow.py --config sdpo_params path/to/params.yaml run
    python flows/sdpo_flow.py --datastore=s3 run --with batch:gpu=1,image=IMAGE --set data.root=s3://BUCKET/sdpo
    python flows/sdpo_flow.py --datastore=s3 run --with kubernetes:gpu=1,image=IMAGE --set data.root=s3://...

Compute decorators are deliberately not written here (``@batch`` in code forces a remote run): add them with
``--with``. A retried train task (``@retry``) resumes from the newest checkpoint under the root.
"""

import json
import sys
import time
from pathlib import Path

from metaflow import Config, FlowSpec, Parameter, card, current, retry, step

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_NAME = "sdpo_params"
DEFAULT_CONFIG = PROJECT_ROOT / "params.yaml"


def _config_file() -> str:
    """The parameter file Metaflow is reading (its parser only receives the text): from ``--config NAME FILE``."""
    argv = sys.argv
    for i, arg in enumerate(argv[:-2]):
        if arg == "--config" and argv[i + 1] == CONFIG_NAME:
            return argv[i + 2]
    return str(DEFAULT_CONFIG)


def parse_params(text: str) -> dict:
    """Metaflow Config parser: validate the parameter file with sdpo's schema (YAML 1.2, errors name the file)."""
    from sdpo.config import config_to_dict, parse_yaml, validate_config

    source = _config_file()
    return config_to_dict(validate_config(parse_yaml(text, source) or {}, source))


class SDPOFlow(FlowSpec):
    """Align a text-to-image diffusion model with Diffusion-SDPO and register it in MLflow."""

    sdpo_params = Config(CONFIG_NAME, default=str(DEFAULT_CONFIG), parser=parse_params,
                         help="parameter file (params.yaml schema)")
    overrides = Parameter("set", default="", help="dotted overrides, space separated: 'train.steps=100 eval.seed=7'")

    def _ctx(self):
        """The stage context of this step: the resolved config, the layout, this run's MLflow parent and retry."""
        from sdpo.config import validate_config
        from sdpo.logs import configure_logging
        from sdpo.stages import StageContext

        configure_logging()  # no loading bars or known-harmless warnings in the step's log (SDPO_LOG_LEVEL=INFO: all)
        cfg = validate_config(self.resolved, "flow parameters")
        return StageContext.from_config(cfg, PROJECT_ROOT, source=self.config_source,
                                        parent_run_id=self.parent_run_id,
                                        tags={"metaflow.run_id": current.run_id}, attempt=current.retry_count)

    @step
    def start(self):
        """Resolve the configuration, open this run's MLflow parent run and plan the ingestion."""
        from sdpo import stages
        from sdpo.config import config_to_dict, resolve_config
        from sdpo.tracking.runs import create_parent_run

        self.config_source = _config_file()
        cfg = resolve_config(json.loads(json.dumps(dict(self.sdpo_params))), self.overrides.split(),
                             self.config_source)
        self.resolved = config_to_dict(cfg)
        self.parent_run_id = None
        ctx = self._ctx()
        self.root = ctx.layout.root
        self.parent_run_id = create_parent_run(cfg.registry.experiment, f"flow-{current.run_id}",
                                               tags={"metaflow.run_id": current.run_id, "data.root": self.root})
        self.items = stages.ingest_plan(ctx)
        self.t_start = time.time()
        self.next(self.ingest, foreach="items")

    @retry(times=1)
    @step
    def ingest(self):
        """Synthetic world or one group of parquet files -> validated WebDataset shards (one branch per item)."""
        from sdpo import stages
        from sdpo.runtime import isolated_scratch

        self.item = self.input
        with isolated_scratch():
            ctx = self._ctx()
            if self.item["synthetic"]:
                stages.synth(ctx, self.item["split"])
            self.part_uri = stages.ingest_part(ctx, self.item)
        self.next(self.join_ingest)

    @step
    def join_ingest(self, inputs):
        """One dataset per split (parts merged when real data was ingested in parallel), recorded in MLflow."""
        from sdpo import stages
        from sdpo.runtime import isolated_scratch

        self.merge_artifacts(inputs, include=["resolved", "root", "t_start", "parent_run_id", "config_source"])
        parts: dict[str, list[str]] = {}
        for branch in sorted(inputs, key=lambda b: (b.item["split"], b.item["part"])):
            parts.setdefault(branch.item["split"], []).append(branch.part_uri)
        with isolated_scratch():
            ctx = self._ctx()
            self.datasets = {split: stages.publish_split(ctx, split, uris) for split, uris in parts.items()}
        self.next(self.base)

    @retry(times=1)
    @step
    def base(self):
        """The configured base model, or the toy base trained on the train shards (cached by content)."""
        from sdpo import stages
        from sdpo.layout import BASE_ARM
        from sdpo.runtime import isolated_scratch

        with isolated_scratch():
            ctx = self._ctx()
            self.base_record = stages.base(ctx)
        self.base_model = self.base_record["uri"]
        self.arms = [*ctx.cfg.train.variants, BASE_ARM]
        self.next(self.encode)

    @retry(times=1)
    @step
    def encode(self):
        """What every arm shares before training: with ``train.cache`` the VAE latents and text embeddings of each
        split; the reward models the evaluation trains itself (the embedded preference reward)."""
        from sdpo import stages
        from sdpo.runtime import isolated_scratch

        self.caches = {}
        with isolated_scratch():
            ctx = self._ctx()
            self.trained_rewards = stages.rewards(ctx)
            if ctx.cfg.train.cache:
                self.caches = {split: stages.encode(ctx, split, base=self.base_model)
                               for split in stages.cached_splits(ctx)}
        self.next(self.train, foreach="arms")

    @retry(times=1)
    @step
    def train(self):
        """One variant (the base arm passes through untouched, as the baseline); a retry resumes its checkpoint."""
        from sdpo import stages
        from sdpo.layout import BASE_ARM
        from sdpo.runtime import isolated_scratch, share_cpu

        self.arm = self.input
        self.summary = {}
        if self.arm != BASE_ARM:
            share_cpu(len(self.arms) - 1)  # the variants train side by side on a local CPU
            retried = current.retry_count > 0
            with isolated_scratch():
                self.summary = stages.train(self._ctx(), self.arm, base=self.base_model, resume=retried,
                                            overwrite=not retried)
        self.next(self.evaluate)

    @retry(times=1)
    @step
    def evaluate(self):
        """Fixed-seed generation, rewards with bootstrap intervals, held-out winner/loser deltas vs the base."""
        from sdpo import stages
        from sdpo.runtime import isolated_scratch, share_cpu

        share_cpu(len(self.arms))
        with isolated_scratch():
            self.metrics = stages.evaluate(self._ctx(), self.arm, base=self.base_model)
        self.next(self.compare)

    @step
    def compare(self, inputs):
        """Paired win rates of every variant against the base."""
        from sdpo import stages
        from sdpo.layout import BASE_ARM
        from sdpo.report import comparison_summary
        from sdpo.runtime import isolated_scratch

        self.merge_artifacts(inputs, include=["resolved", "root", "t_start", "parent_run_id", "config_source",
                                              "base_model", "datasets", "arms"])
        self.arm_metrics = {b.arm: b.metrics for b in inputs}
        self.train_summaries = {b.arm: b.summary for b in inputs if b.summary}
        with isolated_scratch():
            ctx = self._ctx()
            self.comparison = {arm: comparison_summary(stages.compare(ctx, arm))
                               for arm in self.arms if arm != BASE_ARM}
        self.next(self.register)

    @card(type="blank", id="report")
    @step
    def register(self):
        """Register the candidate variant in MLflow, promote it only if it beats the champion (or the base)."""
        from sdpo import stages
        from sdpo.report import card_components
        from sdpo.runtime import isolated_scratch

        with isolated_scratch():
            ctx = self._ctx()
            self.registration = {**stages.register(ctx), **stages.promote(ctx)}
            for component in card_components(ctx.layout, self.arms, self.arm_metrics, self.comparison,
                                             self.registration):
                current.card["report"].append(component)
        self.next(self.end)

    @step
    def end(self):
        """Print where everything is and what was decided; close the MLflow parent run."""
        from sdpo.report import summary_text
        from sdpo.tracking.runs import finish_run, tracking_uri

        ctx = self._ctx()
        candidate = ctx.cfg.registry.candidate
        heldout = self.arm_metrics.get(candidate, {}).get("heldout", {})
        finish_run(self.parent_run_id, {f"{candidate}.heldout_{k}": v for k, v in heldout.items()})
        print(summary_text(ctx.layout, self.arms, self.arm_metrics, self.comparison, self.registration,
                           tracking_uri(), run_id=current.run_id, elapsed=time.time() - self.t_start))


if __name__ == "__main__":
    SDPOFlow()

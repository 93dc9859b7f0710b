"""SDPOFlow: ingest -> base -> train (one branch per variant) -> evaluate -> compare -> register.

Thin steps over the ``sdpo`` library; every step's work is one call into :mod:`sdpo.pipeline`.

    python flows/sdpo_flow.py run                                    # the embedded default, locally
    python flows/sdpo_flow.py run --set train.mu=0.5                 # dotted overrides of params.yaml
    python flows/sdpo_flow.py --config sdpo_params path/to/params.yaml run
    python flows/sdpo_flow.py run --with batch:gpu=1,image=IMAGE     # train/evaluate on AWS Batch GPUs
    python flows/sdpo_flow.py run --with kubernetes:gpu=1,image=IMAGE

Compute decorators are deliberately not written here (``@batch`` in code forces a remote run): add them with
``--with``. Large files go to ``data.root``; artifacts hold only paths and metrics.
"""

import json
import time
from pathlib import Path

from metaflow import Config, FlowSpec, Parameter, card, current, retry, step

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def parse_params(text: str) -> dict:
    """Metaflow Config parser: validate params.yaml with sdpo's schema (YAML 1.2 floats, clear errors)."""
    from sdpo.config import config_to_dict, parse_yaml, validate_config

    return config_to_dict(validate_config(parse_yaml(text) or {}, "params.yaml"))


class SDPOFlow(FlowSpec):
    """Align a text-to-image diffusion model with Diffusion-SDPO and register it in MLflow."""

    sdpo_params = Config("sdpo_params", default=str(PROJECT_ROOT / "params.yaml"), parser=parse_params,
                    help="parameter file (params.yaml schema)")
    overrides = Parameter("set", default="", help="dotted overrides, space separated: 'train.mu=0.5 train.steps=100'")
    run_dir = Parameter("run_dir", default="", help="where this run's data and models go (default: DATA_ROOT/runs/ID)")

    # --- helpers ----------------------------------------------------------------------------------------------

    def _cfg(self):
        from sdpo.config import validate_config

        return validate_config(self.resolved, "flow parameters")

    # --- steps ------------------------------------------------------------------------------------------------

    @step
    def start(self):
        """Resolve the configuration and the run folder; plan the ingestion."""
        from sdpo.config import apply_overrides, config_to_dict, validate_config
        from sdpo.pipeline import ingest_plan, init_tracking, resolve_root

        raw = apply_overrides(json.loads(json.dumps(dict(self.sdpo_params))), self.overrides.split())
        cfg = validate_config(raw, "params.yaml with --set overrides")
        self.resolved = config_to_dict(cfg)
        default_root = resolve_root(cfg.data.root, PROJECT_ROOT) / "runs" / current.run_id
        root = Path(self.run_dir) if self.run_dir else default_root
        self.root = str(root.resolve())
        Path(self.root).mkdir(parents=True, exist_ok=True)
        # the resolved parameters, for provenance and for `accelerate launch` of multi-GPU training
        self.params_file = str(Path(self.root) / "params.resolved.json")
        Path(self.params_file).write_text(json.dumps(self.resolved, indent=2, sort_keys=True))
        self.items = ingest_plan(cfg)
        init_tracking(cfg)  # create the MLflow store once, before parallel steps write to it
        self.t_start = time.time()
        self.next(self.ingest, foreach="items")

    @retry(times=1)
    @step
    def ingest(self):
        """Synthetic world or one group of parquet files -> validated WebDataset shards (one branch per item)."""
        from sdpo.pipeline import ingest_item

        self.item = self.input
        work = Path(self.root) / "ingest"
        work.mkdir(parents=True, exist_ok=True)
        self.part_dir = ingest_item(self._cfg(), self.item, work)
        self.next(self.join_ingest)

    @step
    def join_ingest(self, inputs):
        """One dataset per split (parts merged when real data was ingested in parallel)."""
        from sdpo.pipeline import publish_split, record_datasets

        self.merge_artifacts(inputs, include=["resolved", "root", "t_start", "params_file"])
        cfg = self._cfg()
        parts: dict[str, list[str]] = {}
        for branch in sorted(inputs, key=lambda b: (b.item["split"], b.item["part"])):
            parts.setdefault(branch.item["split"], []).append(branch.part_dir)
        self.shards = {}
        self.data_manifests = {}
        for split, dirs in parts.items():
            out = Path(self.root) / "shards" / split
            manifest = publish_split(cfg, dirs, out)
            self.shards[split] = str(out)
            self.data_manifests[split] = {k: manifest[k] for k in ("rows_read", "pairs_written", "skipped")}
        # one ingest run records the dataset; parallel train steps then reuse its row instead of racing to create it
        record_datasets(cfg, self.shards, run_name=f"ingest-{current.run_id}")
        self.next(self.base)

    @step
    def base(self):
        """The configured base model, or the toy base trained on the synthetic shards (cached by config hash)."""
        from sdpo.pipeline import BASE_ARM, resolve_base

        cfg = self._cfg()
        self.base_model = resolve_base(cfg, Path(self.shards["train"]), PROJECT_ROOT)
        self.arms = [*cfg.train.variants, BASE_ARM]
        self.next(self.train, foreach="arms")

    @retry(times=1)
    @step
    def train(self):
        """One variant of the experiment (the base arm passes through untouched, as the comparison baseline)."""
        from sdpo.pipeline import BASE_ARM, train_arm
        from sdpo.runtime import share_cpu

        self.arm = self.input
        share_cpu(len(self.arms) - 1)  # the variants train side by side on a local CPU
        self.summary = {}
        if self.arm == BASE_ARM:
            self.model_dir = self.base_model
        else:
            out = Path(self.root) / "models" / self.arm
            heldout = Path(self.shards["heldout"]) if "heldout" in self.shards else None
            self.summary = train_arm(self._cfg(), self.arm, shards=Path(self.shards["train"]), heldout=heldout,
                                     base=self.base_model, out_dir=out, config_path=Path(self.params_file),
                                     experiment_tags={"metaflow.run_id": current.run_id, "variant": self.arm})
            self.model_dir = str(out / "model")
        self.next(self.evaluate)

    @retry(times=1)
    @step
    def evaluate(self):
        """Fixed-seed generation, rewards with bootstrap intervals, held-out winner/loser deltas vs the base."""
        from sdpo.pipeline import evaluate_arm
        from sdpo.runtime import share_cpu

        share_cpu(len(self.arms))
        self.eval_dir = str(Path(self.root) / "evals" / self.arm)
        heldout = Path(self.shards["heldout"]) if "heldout" in self.shards else None
        self.metrics = evaluate_arm(self._cfg(), self.model_dir, Path(self.eval_dir), base=self.base_model,
                                    heldout=heldout)
        self.next(self.compare)

    @step
    def compare(self, inputs):
        """Paired win rates of every variant against the base."""
        from sdpo.pipeline import compare_arms

        self.merge_artifacts(inputs, include=["resolved", "root", "shards", "base_model", "data_manifests",
                                              "t_start", "params_file"])
        cfg = self._cfg()
        self.eval_dirs = {b.arm: b.eval_dir for b in inputs}
        self.model_dirs = {b.arm: b.model_dir for b in inputs}
        self.arm_metrics = {b.arm: b.metrics for b in inputs}
        self.train_summaries = {b.arm: b.summary for b in inputs if b.summary}
        self.comparison = {arm: {r: {k: v for k, v in res.items() if k != "per_prompt"}
                                 for r, res in c["rewards"].items()}
                           for arm, c in compare_arms(cfg, self.eval_dirs).items()}
        self.next(self.register)

    @card(type="blank", id="report")
    @step
    def register(self):
        """Register the candidate variant in MLflow, promote it only if it beats the champion (or the base)."""
        from sdpo.pipeline import BASE_ARM, register_and_promote
        from sdpo.report import card_components

        cfg = self._cfg()
        candidate = cfg.registry.candidate
        if candidate not in self.model_dirs:
            raise ValueError(f"registry.candidate={candidate!r} is not a trained variant: {sorted(self.model_dirs)}")
        self.registration = register_and_promote(
            cfg, model_dir=self.model_dirs[candidate], eval_dir=self.eval_dirs[candidate],
            base_eval_dir=self.eval_dirs[BASE_ARM], data_manifest=Path(self.shards["train"]) / "manifest.json",
            tags={"metaflow.run_id": current.run_id, "variant": candidate})
        for component in card_components(self.root, self.model_dirs, self.eval_dirs, self.arm_metrics,
                                         self.comparison, self.registration):
            current.card["report"].append(component)
        self.next(self.end)

    @step
    def end(self):
        """Print where everything is and what was decided."""
        from sdpo.report import summary_text
        from sdpo.tracking.runs import tracking_uri

        print(summary_text(self.root, self.model_dirs, self.arm_metrics, self.comparison, self.registration,
                           tracking_uri(), elapsed=time.time() - self.t_start))


if __name__ == "__main__":
    SDPOFlow()

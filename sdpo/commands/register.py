"""``sdpo register``: log a diffusers pipeline folder to MLflow and register it as a new model version."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sdpo.cli import add_config_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "register",
        help="register a trained pipeline as an MLflow model version",
        description="Log a diffusers pipeline folder as an MLflow pyfunc model (with its evaluation and data "
        "lineage) and register it as a new version of the model named in params.yaml (registry.model_name). "
        "Tracking store: MLFLOW_TRACKING_URI, else ./mlflow.db.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="diffusers pipeline folder to register")
    parser.add_argument(
        "--eval", dest="eval_dir", metavar="DIR", help="evaluation dir of this model (metrics.json, scores.jsonl...)"
    )
    parser.add_argument("--data-manifest", metavar="FILE", help="manifest.json of the training shards (lineage)")
    parser.add_argument("--name", help="registered model name (default: registry.model_name from the config)")
    parser.add_argument("--run-id", help="log into this existing MLflow run instead of starting a new one")
    parser.add_argument(
        "--tag", dest="tags", action="append", default=[], metavar="KEY=VALUE", help="extra version tag (repeatable)"
    )
    parser.add_argument("--output", metavar="FILE", help="also write {name, version, run_id, source} here as JSON")
    add_config_args(parser)
    parser.set_defaults(func=run)


def _parse_tags(items: list[str]) -> dict[str, str]:
    from sdpo.config import ConfigError

    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--tag {item!r}: expected KEY=VALUE")
        tags[key] = value
    return tags


def run(args: argparse.Namespace) -> int:
    from sdpo.config import load_config
    from sdpo.tracking.registry import register

    cfg = load_config(args.config, args.overrides)
    name = args.name or cfg.registry.model_name
    version = register(
        args.model,
        name=name,
        run_id=args.run_id,
        eval_dir=args.eval_dir,
        data_manifest=args.data_manifest,
        tags=_parse_tags(args.tags),
        experiment=cfg.registry.experiment,
        config=cfg,
    )
    print(f"registered {name} version {version.version} (run {version.run_id})")
    if args.output:
        record = {"name": name, "version": version.version, "run_id": version.run_id, "source": version.source}
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    return 0

"""``sdpo register``: log an arm's trained pipeline to MLflow as a new model version (stage ``register``)."""

from __future__ import annotations

import argparse

from sdpo.cli import add_config_args, load_context


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "register",
        help="register an arm's trained pipeline as an MLflow model version",
        description="Log ROOT/models/ARM/model as an MLflow pyfunc model, with its evaluation (ROOT/evals/ARM) "
        "and data lineage (the train shards' manifest, dvc.lock), and register it as a new version of "
        "registry.model_name. Writes ROOT/reports/registry.json for `sdpo promote`. Tracking store: "
        "MLFLOW_TRACKING_URI, else ./mlflow.db.",
    )
    parser.add_argument("--arm", help="the arm to register (default: registry.candidate)")
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdpo import stages

    record = stages.register(load_context(args), args.arm)
    print(f"registered {record['name']} version {record['version']} (run {record['run_id']}, arm {record['arm']})")
    return 0

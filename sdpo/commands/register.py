"""``sdpo register``: register an arm's trained pipeline as an MLflow model version (stage ``register``)."""

from __future__ import annotations

import argparse

from sdpo.cli import add_config_args, load_context


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "register",
        help="register an arm's trained pipeline as an MLflow model version (or reuse the one holding it)",
        description="Register ROOT/models/ARM/model as a version of registry.model_name, linked to its MLflow "
        "evaluation run (the newest `evaluate` run of the same model digest, or --eval-run). Before anything is "
        "created the promotion gate is run against the champion (or the base): with no evaluation of this model, "
        "or nothing comparable, it fails and no version exists. One version per model: registering the same model "
        "again reuses its version. A new version's decision is 'pending' until `sdpo promote`. Writes "
        "ROOT/reports/registry.json. Tracking store: MLFLOW_TRACKING_URI, else ./mlflow.db.",
    )
    parser.add_argument("--arm", help="the arm to register (default: registry.candidate)")
    parser.add_argument("--eval-run", metavar="RUN_ID",
                        help="the evaluation run to link (must have evaluated this very model)")
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdpo import stages

    record = stages.register(load_context(args), args.arm, eval_run=args.eval_run)
    decision = record["decision"]
    where = f"{record['name']} version {record['version']}"
    if record["reused"]:
        aliases = ", ".join(record["aliases"]) or "no alias"
        print(f"{where} already holds this model ({record['digest']}, arm {record['arm']}): reused it, nothing "
              f"registered; recorded decision: {decision['details'].get('recorded')} ({aliases}): "
              f"{decision['reason']}")
    else:
        print(f"registered {where} (run {record['run_id']}, arm {record['arm']}, evaluation run "
              f"{record['eval_run_id']}); decision pending: run `sdpo promote`")
    return 0

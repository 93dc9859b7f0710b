"""``sdpo rewards``: train the reward models the evaluation needs and nobody supplied (stage ``rewards``)."""

from __future__ import annotations

import argparse

from sdpo.cli import add_config_args, load_context

DESCRIPTION = """\
Train every reward of eval.rewards that the pipeline trains itself: today the embedded 'preference' reward (the
toy counterpart of PickScore), a small image-text scorer fitted Bradley-Terry to the winners of ROOT/shards/train,
never to the judge that labelled them, when eval.reward_paths.preference is not set and data.input is empty.
Published at ROOT/rewards/<name>/ (config.json, with the digest of the pairs it saw, written last) and logged as
the MLflow run reward-<name>. Nothing to do when eval.rewards has no such reward."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("rewards", help="train the embedded preference reward on the train pairs",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdpo import stages

    trained = stages.rewards(load_context(args))
    if not trained:
        print("rewards: none to train (every reward in eval.rewards is built in or has eval.reward_paths)")
    for name, result in trained.items():
        print(f"reward {name}: trained on {result['pairs']} pairs (train accuracy {result['train_accuracy']:.3f}) "
              f"at {result['uri']}")
    return 0

"""``sdpo encode``: the latent cache of the ingested shards (stage ``encode``, when ``train.cache`` is on)."""

from __future__ import annotations

import argparse

from sdpo.cli import add_config_args, load_context

DESCRIPTION = """\
Run the base model's VAE and text encoders once over ROOT/shards/<split> and write the latent cache to
ROOT/cache/encoded/<split>: shards with each pair's VAE posterior (mean and std, both flips with train.random_flip)
and the family's text-encoder outputs, the empty prompt's embedding (prompt dropout) and a manifest naming the model
folder, its component digests, the dtype (train.cache_dtype) and the resolution, written last. With
train.precompute_reference the train split also gets the reference's errors of every (pair, epoch) draw of the run
(DPO, DMPO, SFT arms then train without a reference model). Training with train.cache=true reads the cache, never
loads the VAE or the text encoders, and refuses a cache made by another model or at another resolution."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("encode", help="cache VAE latents and text embeddings (and reference errors)",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=["train", "heldout"], action="append",
                        help="split to encode (repeatable; default: train, and heldout when its shards exist and "
                        "train.heldout_every > 0)")
    parser.add_argument("--base", metavar="URI", help="encode with this model instead of the recorded base")
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdpo import stages

    ctx = load_context(args)
    splits = args.split or stages.cached_splits(ctx)
    for split in splits:
        result = stages.encode(ctx, split, base=args.base)
        extra = f", reference errors for {result['reference_epochs']} epoch(s)" if result["reference_epochs"] else ""
        print(f"{split}: cached {result['pairs']} pairs ({result['dtype']}, flips {result['flips']}) at "
              f"{result['uri']}{extra}")
    return 0

"""Evaluation: reward models behind one interface, image generation on fixed seeds, paired win rates.

- :mod:`sdpo.eval.rewards` -- ``load_reward(name, path, sha256)`` returns a :class:`~sdpo.eval.rewards.RewardModel`.
- :mod:`sdpo.eval.generate` -- ``evaluate(model_dir, prompts, out_dir, cfg)`` writes images, scores and metrics.
- :mod:`sdpo.eval.winrate` -- ``compare_eval_dirs(candidate, baseline)`` and the bootstrap math behind it.

Submodules import torch and friends; this package itself stays light so the CLI starts fast.
"""

"""Experiments: every arm over several seeds of the whole pipeline, summarised with intervals across seeds.

``sdpo experiment --name NAME --seeds 0 1 2`` runs, for each seed, a complete run (synth -> ingest -> base ->
[encode] -> [rewards] -> train(arm) -> evaluate(arm) -> compare(arm), the stage functions of :mod:`sdpo.stages`)
under its own run root ``ROOT/experiments/NAME/seed-<s>/``, then writes beside those folders:

* ``results.csv`` (long format, one row per table x metric x arm [x baseline]), ``results.md`` (Markdown tables),
  ``curves.csv`` (per seed, arm and step: the held-out deltas and the safeguard's lambda statistics),
  ``plots/*.png`` and ``experiment.json`` (what was run, the effective seeds of every seed run).

**What a seed is.** Seed ``s`` adds ``s`` to each of :data:`SEED_KEYS`: the synthetic world
(``data.synthetic.seed``), the toy base (``model.toy.seed``) and training (``train.seed``). With the defaults (all 0)
seed ``s`` sets all three to ``s``, and seed 0 is the default run. The evaluation (``eval.seed``: prompts' sampling
seeds, bootstrap) is the same in every seed run, so that a seed's arms are compared on the same units. With real data
(``data.input``) or a configured base (``model.base``) the first two keys do nothing and only training varies.

**Intervals.** Per-seed values (the mean reward over the seed's images, the held-out deltas of its evaluation, lambda
statistics averaged over its training steps) get a two-sided 95% Student-t interval across seeds (mean +- t(0.975,
n-1) * s / sqrt(n), :func:`t_interval`), which describes seed-to-seed variation with few seeds. Paired win rates
pool the (seed, prompt, sampling-seed) images of all seeds (within a seed, both arms sampled the same prompt with the
same seed) and get a percentile-bootstrap 95% interval resampling images (:func:`sdpo.eval.winrate.paired_win_rate`);
it treats images as independent and so does not include the variation between seeds that the t-intervals show.

**Resuming.** A stage whose output marker exists in a seed run is not run again, unless a stage it depends on ran in
this invocation; an interrupted training resumes from its newest checkpoint. Each seed run records the settings it
was made with (``seed-<s>/experiment-seed.json``); rerunning the same name with other settings is refused.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from sdpo import fs
from sdpo.config import Config, ConfigError, config_to_dict, flatten, validate_config
from sdpo.errors import DataError
from sdpo.layout import BASE_ARM, EVAL_SETS, SPLITS, RunLayout

SEED_KEYS = ("data.synthetic.seed", "model.toy.seed", "train.seed")
DEFAULT_SEEDS = (0, 1, 2)
CONFIDENCE = 0.95
SEED_RECORD = "experiment-seed.json"
HELDOUT_METRICS = ("heldout_winner_delta", "heldout_loser_delta")
LAMBDA_METRICS = ("lambda_mean", "lambda_frac_clipped", "lambda_frac_nonpositive")
# what a seed run's record leaves out when a rerun is checked against it (the arms are checked one by one)
_UNCHECKED = ("data.root", "registry.", "train.variants")
T_INTERVAL = "t95 over seeds"
BOOTSTRAP_INTERVAL = "bootstrap95 over pooled images"
_FORMATS = {"reward": "{:.4f}", "heldout": "{:+.5f}", "lambda": "{:.3f}", "winrate": "{:.3f}"}
_TITLES = {"reward": "reward", "heldout": "held-out error delta vs the base (below 0 = better)",
           "lambda": "safeguard lambda over training", "winrate": "paired win rate"}


@dataclass
class ResultRow:
    """One row of ``results.csv``: a metric of an arm (and, for win rates, the baseline it is compared with)."""

    table: str  # reward | heldout | lambda | winrate
    metric: str
    arm: str
    baseline: str
    mean: float
    ci_low: float
    ci_high: float
    interval: str
    n: int  # seeds, or pooled images for win rates
    values: list[float] = field(default_factory=list)  # per seed, in the order of the experiment's seeds
    wins: int | None = None
    ties: int | None = None
    losses: int | None = None

    def csv_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["values"] = ";".join(repr(float(v)) for v in self.values)  # full precision
        return {k: "" if v is None else v for k, v in row.items()}


# --- statistics ---------------------------------------------------------------------------------------------


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided Student-t interval of the mean of ``values`` (scipy.stats.t).

    Needs two values or more; identical values give a zero-width interval.
    """
    from scipy import stats

    data = np.asarray(values, dtype=np.float64)
    if data.size < 2:
        raise ValueError(f"a t-interval needs at least two values, got {data.size}")
    mean = float(data.mean())
    half = float(stats.t.ppf(0.5 + confidence / 2, data.size - 1) * stats.sem(data))
    return mean, mean - half, mean + half


def lambda_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The safeguard's lambda statistics over a training run from its ``metrics.jsonl`` rows.

    Each row averages the steps since the previous row, so rows are weighted by the steps they cover. Returns the
    :data:`LAMBDA_METRICS` the rows carry (none for an arm without the safeguard, whose lambda is 1 by definition).
    """
    out: dict[str, float] = {}
    previous = 0
    weights = []
    for row in rows:
        weights.append(max(int(row["step"]) - previous, 1))
        previous = int(row["step"])
    for key in LAMBDA_METRICS:
        pairs = [(row[key], w) for row, w in zip(rows, weights, strict=True) if key in row]
        if pairs:
            values, w = zip(*pairs, strict=True)
            out[key] = float(np.average(values, weights=w))
    return out


# --- configuration -----------------------------------------------------------------------------------------


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """The seeds, refused when fewer than two (no interval), repeated or negative."""
    seeds = [int(s) for s in seeds]
    if len(seeds) < 2:
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: an experiment needs at least two seeds (three or "
                          "more recommended) for an interval across seeds")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: a seed is repeated")
    if min(seeds) < 0:
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: seeds must be >= 0")
    return seeds


def check_arms(cfg: Config, arms: Sequence[str] | None) -> list[str]:
    """The arms to train (default: every ``train.variants`` entry); an unknown one is refused in one line."""
    variants = list(cfg.train.variants)
    if not arms:
        if not variants:
            raise ConfigError("train.variants is empty: there is no arm to run")
        return variants
    unknown = [a for a in arms if a not in variants]
    if unknown:
        extra = f" ({BASE_ARM!r} is always run as the baseline)" if BASE_ARM in unknown else ""
        raise ConfigError(f"--arm {' '.join(unknown)}: not in train.variants {variants}{extra}")
    if len(set(arms)) != len(arms):
        raise ConfigError(f"--arm {' '.join(arms)}: an arm is repeated")
    return list(arms)


def _get(raw: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        raw = raw[part]
    return raw


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        raw = raw[part]
    raw[last] = value


def seed_config(cfg: Config, seed: int, root: str) -> Config:
    """The configuration of one seed run: :data:`SEED_KEYS` shifted by ``seed``, ``data.root`` at ``root``."""
    raw = config_to_dict(cfg)
    for key in SEED_KEYS:
        _set(raw, key, _get(raw, key) + seed)
    raw["data"]["root"] = root
    return validate_config(raw, f"seed {seed}")


def seed_record(cfg: Config, seed: int, arms: Sequence[str]) -> dict[str, Any]:
    """What a seed run was made with: its settings (less root, registry and variants) and each arm's variant."""
    flat = flatten(config_to_dict(cfg))
    settings = {k: v for k, v in flat.items() if not k.startswith(_UNCHECKED)}
    variants = {arm: cfg.train.variants[arm].model_dump(mode="json") for arm in arms}
    return {"seed": seed, "settings": settings, "arms": variants}


def _check_record(uri: str, new: dict[str, Any]) -> dict[str, Any]:
    """The record to write: the saved one with new arms added; :class:`ConfigError` when settings differ."""
    if not fs.exists(uri):
        return new
    old = fs.read_json(uri)
    changed = sorted(k for k in set(old["settings"]) | set(new["settings"])
                     if old["settings"].get(k) != new["settings"].get(k))
    changed += [f"train.variants.{arm}" for arm in new["arms"]
                if arm in old["arms"] and old["arms"][arm] != new["arms"][arm]]
    if changed:
        shown = ", ".join(f"{k} ({old['settings'].get(k, '?')} -> {new['settings'].get(k, '?')})"
                          if not k.startswith("train.variants") else k for k in changed[:6])
        raise ConfigError(f"{uri}: this seed run was made with other settings: {shown}"
                          + (" ..." if len(changed) > 6 else "")
                          + "; use another --name, or remove the experiment folder to start over")
    return {**old, "arms": {**old["arms"], **new["arms"]}}


# --- running ------------------------------------------------------------------------------------------------


def _marker(uri: str, name: str) -> bool:
    return fs.exists(fs.join(uri, name))


def check_checkpoint_rewards(cfg: Config, arms: Sequence[str]) -> None:
    """Scoring every checkpoint needs checkpoints written during training and none deleted."""
    for arm in arms:
        t = cfg.train.for_variant(arm)
        if not t.checkpoint_every or t.checkpoint_every >= t.steps or t.keep_checkpoints:
            raise ConfigError(
                f"--checkpoint-rewards scores every training checkpoint, but arm {arm!r} writes "
                + (f"a checkpoint every {t.checkpoint_every} of {t.steps} steps" if t.checkpoint_every
                   else "checkpoints only at the end")
                + f" and keeps the newest {t.keep_checkpoints}: set train.checkpoint_every below train.steps "
                "(e.g. a tenth of it) and train.keep_checkpoints=0 (keep every one)")


def checkpoint_steps(layout: RunLayout, arm: str, steps: int) -> list[int]:
    """The steps of the arm's kept checkpoints before its final step (whose model the arm's evaluation scores)."""
    from sdpo.train import checkpoint as ck

    return [s for s in (ck.step_of(n) for n in ck.complete_checkpoints(layout.checkpoints(arm))) if s and s < steps]


def run_seed(ctx: Any, arms: Sequence[str], *, checkpoint_rewards: bool = False,
             log: Callable[[str], None] = print) -> list[str]:
    """One complete run of ``arms`` (and the base) under ``ctx.layout``, skipping stages already done.

    A stage runs when its output marker is missing or a stage it depends on ran now (then training starts over;
    otherwise a missing model resumes from the newest checkpoint). ``checkpoint_rewards``: every kept checkpoint
    of each arm is evaluated too (:func:`sdpo.stages.evaluate_checkpoint`). Returns the stages run, e.g.
    ``["train:dpo", "evaluate:dpo@50"]``.
    """
    from sdpo import stages

    layout, cfg = ctx.layout, ctx.cfg
    ran: list[str] = []

    def step(name: str, fn: Callable[[], Any]) -> None:
        tic = time.perf_counter()
        fn()
        ran.append(name)
        log(f"  {name}: done in {time.perf_counter() - tic:.0f}s")

    splits = [s for s in SPLITS if stages.split_inputs(ctx, s) is not None]
    upstream = False
    for split in splits:
        if cfg.data.input is None and not fs.exists(layout.raw(split)):
            step(f"synth:{split}", lambda split=split: stages.synth(ctx, split))
            upstream = True
        if upstream or not fs.exists(layout.manifest(split)):
            step(f"ingest:{split}", lambda split=split: stages.ingest(ctx, split))
            upstream = True
    if upstream or not fs.exists(layout.base_record()):
        step("base", lambda: stages.base(ctx))
        upstream = True
    if cfg.train.cache:
        for split in splits:
            if upstream or not _marker(layout.cache(split), stages.MANIFEST):
                step(f"encode:{split}", lambda split=split: stages.encode(ctx, split))
                upstream = True
    trained_rewards = stages.trained_rewards(ctx)
    rescore = bool(trained_rewards) and (upstream or not all(
        _marker(layout.reward_model(name), stages.PREFERENCE_MARKER) for name in trained_rewards))
    if rescore:  # a new reward model: every evaluation is scored again, no arm is trained again
        step("rewards", lambda: stages.rewards(ctx))
    base_eval = upstream or rescore or not _marker(layout.evals(BASE_ARM), stages.EVAL_MARKER)
    if base_eval:
        step(f"evaluate:{BASE_ARM}", lambda: stages.evaluate(ctx, BASE_ARM))
    for arm in arms:
        trained = upstream or not _marker(layout.model(arm), stages.MODEL_MARKER)
        if trained:
            step(f"train:{arm}", lambda arm=arm: stages.train(ctx, arm, resume=not upstream, overwrite=upstream))
        evaluated = trained or rescore or not _marker(layout.evals(arm), stages.EVAL_MARKER)
        if evaluated:
            step(f"evaluate:{arm}", lambda arm=arm: stages.evaluate(ctx, arm))
        for at in checkpoint_steps(layout, arm, cfg.train.for_variant(arm).steps) if checkpoint_rewards else []:
            if trained or rescore or not _marker(layout.checkpoint_eval(arm, at), stages.EVAL_MARKER):
                step(f"evaluate:{arm}@{at}", lambda arm=arm, at=at: stages.evaluate_checkpoint(ctx, arm, at))
        if evaluated or base_eval or not fs.exists(layout.compare_report(arm)):
            step(f"compare:{arm}", lambda arm=arm: stages.compare(ctx, arm))
    return ran


def run_experiment(cfg: Config, name: str, *, seeds: Sequence[int] = DEFAULT_SEEDS,
                   arms: Sequence[str] | None = None, project_dir: str | Path | None = None,
                   source: str = "params.yaml", checkpoint_rewards: bool = False,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) experiment ``name``: ``arms`` x ``seeds`` complete runs, then the tables and plots.

    ``checkpoint_rewards``: every kept training checkpoint is scored as well, for reward curves over the steps
    (:func:`check_checkpoint_rewards` says what that needs). Holds the experiment folder's writer lock throughout.
    Returns ``experiment.json``'s content: ``uri``, ``seeds``, ``arms``, ``seed_values``, ``ran`` (per seed, the
    stages run now; empty for a complete seed) and ``outputs``.
    """
    from sdpo.locks import writer_lock
    from sdpo.stages import StageContext

    seeds, arms = check_seeds(seeds), check_arms(cfg, arms)
    if checkpoint_rewards:
        check_checkpoint_rewards(cfg, arms)
    project_dir = Path(project_dir or Path.cwd())
    top = RunLayout.resolve(cfg.data.root, project_dir)
    uri = top.experiment(name)
    contexts = {}
    for seed in seeds:
        root = top.experiment_seed(name, seed)
        seed_cfg = seed_config(cfg, seed, root)
        contexts[seed] = StageContext.from_config(seed_cfg, project_dir, source=f"{source} (seed {seed})",
                                                  tags={"sdpo.experiment": name, "sdpo.experiment.seed": str(seed)})
    ran: dict[int, list[str]] = {}
    tic = time.perf_counter()
    with writer_lock(uri, "experiment"):
        records = {}
        for seed, ctx in contexts.items():  # every seed checked before any work
            record_uri = fs.join(ctx.layout.root, SEED_RECORD)
            records[seed] = (record_uri, _check_record(record_uri, seed_record(ctx.cfg, seed, arms)))
        for seed, ctx in contexts.items():
            log(f"experiment {name}: seed {seed} ({ctx.layout.root})")
            fs.write_json(*records[seed])
            ran[seed] = run_seed(ctx, arms, checkpoint_rewards=checkpoint_rewards, log=log)
            if not ran[seed]:
                log("  complete: nothing to run")
        rows, curves = collect({s: c.layout for s, c in contexts.items()}, arms, cfg)
        summary = {
            "name": name, "uri": uri, "source": source, "seeds": seeds, "arms": arms, "seed_keys": list(SEED_KEYS),
            "seed_values": {str(s): {k: _get(config_to_dict(c.cfg), k) for k in SEED_KEYS}
                            for s, c in contexts.items()},
            "ran": {str(s): r for s, r in ran.items()}, "checkpoint_rewards": checkpoint_rewards,
            "wall_s": round(time.perf_counter() - tic, 1),
        }
        summary["outputs"] = write_results(uri, rows, curves, summary)
        fs.write_json(fs.join(uri, "experiment.json"), summary)
    return summary


# --- collecting ---------------------------------------------------------------------------------------------


def _eval_dirs(uri: str, prompt_sets: Sequence[str], stack: Any) -> dict[str, tuple[dict, dict, dict]]:
    """The evaluation at ``uri``, read: the headline prompt set (key ``""``) and each further set."""
    from sdpo.eval.winrate import read_eval_dir
    from sdpo.stages import EVAL_MARKER

    root = stack.enter_context(fs.local_copy(uri, marker=EVAL_MARKER))
    return {label: read_eval_dir(root / EVAL_SETS / label if label else root) for label in ["", *prompt_sets]}


def _seed_rows(table: str, per_seed: dict[tuple[str, str], list[float]], n_seeds: int) -> list[ResultRow]:
    rows = []
    for (metric, arm), values in per_seed.items():
        if len(values) != n_seeds:  # a metric some seed lacks is not summarised
            continue
        mean, low, high = t_interval(values)
        rows.append(ResultRow(table, metric, arm, "", mean, low, high, T_INTERVAL, len(values), list(values)))
    return rows


def _pool_win_outcomes(evals: dict[str, tuple[dict, dict, dict]], arms: Sequence[str], where: str, suffix: str,
                       pooled: dict[tuple[str, str, str], tuple[list, list, list]]) -> None:
    """Add one seed's paired scores of every (arm vs base) and (arm vs arm) pair to ``pooled``."""
    from sdpo.eval.winrate import check_comparable, win_outcomes

    pairs = [(arm, BASE_ARM) for arm in arms] + [(b, a) for i, a in enumerate(arms) for b in arms[i + 1:]]
    for cand, base in pairs:
        (c_manifest, c_rows, _), (b_manifest, b_rows, _) = evals[cand], evals[base]
        check_comparable(c_manifest, b_manifest, (f"{where} {cand}", f"{where} {base}"))
        if set(c_rows) != set(b_rows):
            raise DataError(f"{where}: the score rows of {cand} and {base} are not the same images")
        units = sorted(c_rows)
        for reward in [r for r in c_manifest.get("rewards", []) if r in b_manifest.get("rewards", [])]:
            c = np.array([c_rows[u]["scores"][reward] for u in units], dtype=np.float64)
            b = np.array([b_rows[u]["scores"][reward] for u in units], dtype=np.float64)
            entry = pooled.setdefault((reward + suffix, cand, base), ([], [], []))
            entry[0].append(c)
            entry[1].append(b)
            entry[2].append(float(win_outcomes(c, b).mean()))


def _reward_curves(seed: int, layout: RunLayout, arms: Sequence[str], cfg: Config,
                   by_arm: dict[str, dict[str, tuple[dict, dict, dict]]]) -> list[dict[str, Any]]:
    """Curve rows of every reward over the steps, for the arms whose checkpoints were scored: the base at step 0,
    each scored checkpoint, the arm's own evaluation at its last step."""
    import contextlib

    from sdpo.stages import EVAL_MARKER
    from sdpo.train.checkpoint import step_of

    rows: list[dict[str, Any]] = []
    for arm in arms:
        steps = sorted(s for s in map(step_of, fs.list_dirs(layout.checkpoint_evals(arm)))
                       if s and _marker(layout.checkpoint_eval(arm, s), EVAL_MARKER))
        if not steps:
            continue
        points = {0: by_arm[BASE_ARM], cfg.train.for_variant(arm).steps: by_arm[arm]}
        for at in steps:
            with contextlib.ExitStack() as stack:
                points[at] = _eval_dirs(layout.checkpoint_eval(arm, at), list(cfg.eval.prompt_sets), stack)
        for at, dirs in sorted(points.items()):
            for label, (_, _, metrics) in dirs.items():
                suffix = f"@{label}" if label else ""
                rows += [{"seed": seed, "arm": arm, "step": at, "metric": reward + suffix, "value": stats["mean"]}
                         for reward, stats in metrics.get("rewards", {}).items()]
    return rows


def collect(layouts: dict[int, RunLayout], arms: Sequence[str], cfg: Config) -> tuple[list[ResultRow], list[dict]]:
    """The result rows (every table) and the per-step curve rows of the seed runs in ``layouts``."""
    import contextlib

    from sdpo.eval.winrate import paired_win_rate

    all_arms = [BASE_ARM, *arms]
    rewards: dict[tuple[str, str], list[float]] = {}
    heldout: dict[tuple[str, str], list[float]] = {}
    lambdas: dict[tuple[str, str], list[float]] = {}
    pooled: dict[tuple[str, str, str], tuple[list[np.ndarray], list[np.ndarray], list[float]]] = {}
    curves: list[dict[str, Any]] = []
    for seed, layout in layouts.items():
        with contextlib.ExitStack() as stack:
            by_arm = {arm: _eval_dirs(layout.evals(arm), list(cfg.eval.prompt_sets), stack) for arm in all_arms}
            for label in ["", *cfg.eval.prompt_sets]:  # a further set's metrics are named <reward>@<set>
                evals, suffix = {arm: dirs[label] for arm, dirs in by_arm.items()}, f"@{label}" if label else ""
                for arm, (_, _, metrics) in evals.items():
                    for reward, stats in metrics.get("rewards", {}).items():
                        rewards.setdefault((reward + suffix, arm), []).append(float(stats["mean"]))
                    if arm != BASE_ARM and not label:
                        for key in HELDOUT_METRICS:
                            value = (metrics.get("heldout") or {}).get(key.removeprefix("heldout_"))
                            if value is not None:
                                heldout.setdefault((key, arm), []).append(float(value))
                _pool_win_outcomes(evals, arms, f"seed {seed}{' ' + label if label else ''}", suffix, pooled)
            curves += _reward_curves(seed, layout, arms, cfg, by_arm)
        for arm in arms:
            train_rows = fs.read_jsonl(layout.training_file(arm, "metrics.jsonl"))
            for key, value in lambda_summary(train_rows).items():
                lambdas.setdefault((key, arm), []).append(value)
            for row in fs.read_jsonl(layout.training_file(arm, "heldout.jsonl")):
                curves += [{"seed": seed, "arm": arm, "step": row["step"], "metric": k, "value": row[k]}
                           for k in HELDOUT_METRICS if k in row]
            curves += [{"seed": seed, "arm": arm, "step": row["step"], "metric": k, "value": row[k]}
                       for row in train_rows for k in LAMBDA_METRICS if k in row]
    n = len(layouts)
    rows = _seed_rows("reward", rewards, n) + _seed_rows("heldout", heldout, n) + _seed_rows("lambda", lambdas, n)
    for (reward, cand, base), (c, b, per_seed) in pooled.items():
        result = paired_win_rate(np.concatenate(c), np.concatenate(b), bootstrap_samples=cfg.eval.bootstrap_samples,
                                 seed=cfg.eval.seed)
        rows.append(ResultRow("winrate", reward, cand, base, result["win_rate"], result["ci_low"], result["ci_high"],
                              BOOTSTRAP_INTERVAL, result["wins"] + result["ties"] + result["losses"], per_seed,
                              result["wins"], result["ties"], result["losses"]))
    return rows, curves


# --- writing ------------------------------------------------------------------------------------------------


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _groups(rows: list[ResultRow]) -> dict[tuple[str, str], list[ResultRow]]:
    groups: dict[tuple[str, str], list[ResultRow]] = {}
    for row in rows:
        groups.setdefault((row.table, row.metric), []).append(row)
    return groups


def render_markdown(rows: list[ResultRow], summary: dict[str, Any], plots: list[str],
                    curves: list[dict[str, Any]] | None = None) -> str:
    """``results.md``: one Markdown table per metric (rewards with their win rates, held-out deltas, lambda), and
    the rewards over training when checkpoints were scored."""
    from tabulate import tabulate

    seeds = summary["seeds"]
    values = summary["seed_values"]
    out = [f"# Experiment `{summary['name']}`", "",
           f"Arms: {', '.join(summary['arms'])} (and `{BASE_ARM}`). Seeds: {', '.join(map(str, seeds))}; seed s adds "
           f"s to {', '.join(f'`{k}`' for k in SEED_KEYS)} (here: "
           + "; ".join(f"seed {s}: {'/'.join(str(v) for v in values[str(s)].values())}" for s in seeds) + "). "
           f"Parameters: `{summary['source']}`.", "",
           "Intervals: per-seed values get a 95% Student-t interval across seeds; win rates pool the images of all "
           "seeds (paired within a seed: same prompt, same sampling seed) and get a 95% percentile-bootstrap "
           "interval over images, which leaves out the variation between seeds.", ""]
    groups = _groups(rows)
    for table, metric in groups:  # rewards in eval.rewards order, then held-out deltas, then lambda
        if table == "winrate":
            continue
        fmt = _FORMATS[table].format
        reward, _, prompt_set = metric.partition("@")
        where = f", prompt set `{prompt_set}`" if prompt_set else ""
        out += [f"## {reward} ({_TITLES[table]}{where})", ""]
        body = [[r.arm, fmt(r.mean), f"[{fmt(r.ci_low)}, {fmt(r.ci_high)}]", " ".join(fmt(v) for v in r.values)]
                for r in groups[(table, metric)]]
        out += [tabulate(body, headers=["arm", "mean", "95% t-interval", f"per seed ({' '.join(map(str, seeds))})"],
                         tablefmt="github", disable_numparse=True), ""]
        if table == "lambda":
            missing = [a for a in summary["arms"] if a not in {r.arm for r in groups[(table, metric)]}]
            if missing:
                out += [f"Not logged for {', '.join(missing)} (no safeguard: lambda is 1).", ""]
        if table == "reward" and ("winrate", metric) in groups:
            fmt = _FORMATS["winrate"].format
            out += [f"### {reward}{where}: paired win rates (pooled over seeds)", ""]
            body = [[r.arm, r.baseline, fmt(r.mean), f"[{fmt(r.ci_low)}, {fmt(r.ci_high)}]",
                     f"{r.wins}/{r.ties}/{r.losses}", str(r.n), " ".join(fmt(v) for v in r.values)]
                    for r in groups[("winrate", metric)]]
            out += [tabulate(body, headers=["arm", "vs", "win rate", "95% bootstrap", "wins/ties/losses", "images",
                                            "per seed"], tablefmt="github", disable_numparse=True), ""]
    out += _reward_curve_tables(curves or [])
    if plots:
        out += ["## Plots", "", *[f"![{Path(p).stem}]({p})" for p in plots], ""]
    return "\n".join(out)


def _reward_curve_tables(curves: list[dict[str, Any]]) -> list[str]:
    """Markdown: per prompt set, every reward's mean over seeds at each scored step, per arm (step 0: the base)."""
    from tabulate import tabulate

    out = []
    for label, metrics in _reward_curve_metrics(curves).items():
        values: dict[tuple[str, int], dict[str, list[float]]] = {}
        for c in curves:
            if c["metric"] in metrics:
                values.setdefault((c["arm"], c["step"]), {}).setdefault(c["metric"], []).append(float(c["value"]))
        body = [[arm, str(step), *(f"{np.mean(v[m]):.4f}" if m in v else "" for m in metrics), str(len(v[metrics[0]]))]
                for (arm, step), v in values.items()]
        where = f", prompt set `{label}`" if label else ""
        out += [f"## Rewards over training{where} (mean over seeds; step 0 is the base)", "",
                tabulate(body, headers=["arm", "step", *(m.partition("@")[0] for m in metrics), "seeds"],
                         tablefmt="github", disable_numparse=True), ""]
    return out


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def bar_plot(rows: list[ResultRow], title: str) -> bytes:
    """Bars of the mean per arm with the interval as error bars, the per-seed values as dots."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.2 * len(rows) + 1), 3.2), layout="constrained")
    ax = fig.subplots()
    labels = [r.arm if not r.baseline else f"{r.arm}\nvs {r.baseline}" for r in rows]
    x = np.arange(len(rows))
    means = np.array([r.mean for r in rows])
    err = np.array([[r.mean - r.ci_low for r in rows], [r.ci_high - r.mean for r in rows]])
    ax.bar(x, means, yerr=err, capsize=4, color="#8fb3d9", edgecolor="#2c5d8a")
    for i, r in enumerate(rows):
        ax.plot([i] * len(r.values), r.values, "o", color="#222222", markersize=3)
    ax.set_xticks(x, labels, fontsize=8)
    ax.axhline(0.5 if rows and rows[0].table == "winrate" else 0.0, color="grey", linewidth=0.8)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def curve_plot(curves: list[dict[str, Any]], metrics: Sequence[str], title: str,
               arms: Sequence[str]) -> bytes | None:
    """One panel per metric: per arm the mean over seeds by step, the band from the lowest to the highest seed.

    An arm keeps its colour (its place in ``arms``) in every panel and plot.
    """
    from matplotlib.figure import Figure

    present = [m for m in metrics if any(c["metric"] == m for c in curves)]
    if not present:
        return None
    fig = Figure(figsize=(4.2 * len(present), 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(present)))
    for ax, metric in zip(axes, present, strict=True):
        for arm in dict.fromkeys(c["arm"] for c in curves if c["metric"] == metric):
            by_seed: dict[int, dict[int, float]] = {}
            for c in curves:
                if c["metric"] == metric and c["arm"] == arm:
                    by_seed.setdefault(c["seed"], {})[c["step"]] = c["value"]
            steps = sorted(set.intersection(*(set(v) for v in by_seed.values())))
            values = np.array([[series[s] for s in steps] for series in by_seed.values()])
            colour = f"C{list(arms).index(arm) % 10}"
            ax.plot(steps, values.mean(axis=0), label=arm, color=colour)
            ax.fill_between(steps, values.min(axis=0), values.max(axis=0), alpha=0.2, color=colour)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel("step")
        ax.set_title(metric, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title} (line: mean over seeds; band: lowest to highest seed)", fontsize=9)
    return _png(fig)


def _change_from_base(curves: list[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """The curve rows of ``metrics``, each minus its seed's step-0 value (the base): seeds are different worlds
    and bases, so their levels differ more than training moves them."""
    start = {(c["seed"], c["metric"]): c["value"] for c in curves if c["metric"] in metrics and c["step"] == 0}
    return [{**c, "value": c["value"] - start[(c["seed"], c["metric"])]} for c in curves if c["metric"] in metrics]


def _reward_curve_metrics(curves: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The reward curves' metrics by prompt set (``""``: the headline set), in the order they appear."""
    by_set: dict[str, list[str]] = {}
    for metric in dict.fromkeys(c["metric"] for c in curves):
        if metric not in (*HELDOUT_METRICS, *LAMBDA_METRICS):
            by_set.setdefault(metric.partition("@")[2], []).append(metric)
    return by_set


def write_results(uri: str, rows: list[ResultRow], curves: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    """results.csv, curves.csv, plots/*.png and results.md under ``uri``; returns what was written (relative)."""
    written = ["results.csv", "curves.csv"]
    fs.write_bytes(fs.join(uri, "results.csv"), _csv([r.csv_dict() for r in rows], [f.name for f in fields(ResultRow)]))
    fs.write_bytes(fs.join(uri, "curves.csv"), _csv(curves, ["seed", "arm", "step", "metric", "value"]))
    plots = []
    for (table, metric), group in _groups(rows).items():
        plots.append((f"plots/{table}-{metric}.png", bar_plot(group, f"{metric}: {_TITLES[table]}, 95% interval")))
    for stem, metrics, title in (("curves-heldout", HELDOUT_METRICS, "held-out deltas over training"),
                                 ("curves-lambda", LAMBDA_METRICS, "safeguard lambda over training")):
        png = curve_plot(curves, metrics, title, summary["arms"])
        if png is not None:
            plots.append((f"plots/{stem}.png", png))
    for label, metrics in _reward_curve_metrics(curves).items():
        where = f", prompt set {label}" if label else ""
        png = curve_plot(_change_from_base(curves, metrics), metrics,
                         f"reward minus the base's (step 0), per seed, over training{where}", summary["arms"])
        if png is not None:
            plots.append((f"plots/curves-rewards{'-' + label if label else ''}.png", png))
    for name, png in plots:
        fs.write_bytes(fs.join(uri, name), png)
    names = [name for name, _ in plots]
    fs.write_bytes(fs.join(uri, "results.md"), render_markdown(rows, summary, names, curves).encode())
    return [*written, *names, "results.md"]

"""Seed-aware intervals for paired comparisons of benchmark runs, computed at report time from per-example outputs.

A benchmark difference ("method A minus method B") has two sources of noise: which examples the test set holds,
and which seed trained the models (adapter init, data order; in the knowledge benchmark also the generated world).
Two intervals are reported for each difference:

- **primary: a t-interval over the per-seed paired differences** (`seed_t_interval`). Each seed gives one paired
  difference (A and B trained with the same seed, scored on the same examples); their spread holds both sources of
  noise, since each seed's difference is itself measured on a finite test set. With 3 seeds it has 2 degrees of
  freedom (t = 4.30), so it is wide, but it is honest: it is exact for normally distributed per-seed differences,
  while a bootstrap over 3 seeds has only 10 distinct resamples and understates the spread by a factor sqrt(2/3).
- **beside it: the example-level paired bootstrap** (`example_bootstrap`), which resamples the test examples with
  the trained models held fixed. It answers "would these very models differ on other test examples?", not "would
  the methods differ after another training?", and is the only interval a single seed allows.

Where the seeds share one test set (GLUE's dev set) the seed-to-seed spread leaves out that set's own sampling noise,
which all seeds share, so the t-interval can be the narrower of the two; where every seed has its own test set (the
knowledge benchmark generates a world per seed) it holds both. Hence the rule the reports follow: a difference is
called established only when every interval it has excludes 0 (`Comparison.established`).

One AUC (`auc`, scikit-learn's) for every runner. Everything here is plain numpy / scipy / scikit-learn, with no
dependency on the runners, so a report can be rebuilt from stored JSONs alone (`python -m benchmarks.harness.claims`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
METRICS = ("accuracy", "f1", "mcc")  # class-prediction metrics, in percent, that `metric_values` computes


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval and a short name of how the interval was formed."""

    estimate: float
    low: float
    high: float
    kind: str

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, scale: float = 1.0, digits: int = 2, minus: str = "-") -> str:
        """E.g. "+1.26 [-0.89, +3.41]"; `minus="−"` for prose (the minus sign of print)."""
        def signed(value: float) -> str:
            return f"{scale * value:+.{digits}f}".replace("-", minus)
        return f"{signed(self.estimate)} [{signed(self.low)}, {signed(self.high)}]"


@dataclass(frozen=True)
class Comparison:
    """A paired difference measured in one or more seeds: the per-seed differences, the t-interval over them (None
    for one seed) and the example-level bootstrap interval of their mean."""

    per_seed: tuple[float, ...]
    seeds: Interval | None
    examples: Interval

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_seed))

    def established(self) -> bool:
        """Every interval excludes 0: the seeds' (training noise) and the examples' (the test set's noise)."""
        return self.examples.excludes_zero() and (self.seeds is None or self.seeds.excludes_zero())

    def primary(self) -> Interval:
        """The interval to quote: over seeds where there are several, over examples for a single seed."""
        return self.seeds if self.seeds is not None else self.examples

    def text(self, scale: float = 1.0, digits: int = 2, minus: str = "-") -> str:
        """E.g. "+1.26 [-0.89, +3.41] (t over 3 seeds; examples only [+0.23, +2.29])"."""
        shown = self.primary()
        text = f"{shown.text(scale, digits, minus)} ({shown.kind}"
        if self.seeds is not None:
            text += f"; examples only {self.examples.text(scale, digits, minus).split(' ', 1)[1]}"
        return text + ")"


def seed_t_interval(per_seed: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Student-t interval of the mean of per-seed values (n - 1 degrees of freedom)."""
    values = np.asarray(per_seed, dtype=float)
    if values.size < 2:
        raise ValueError(f"a t-interval over seeds needs at least 2 seeds, got {values.size}: run more seeds, or "
                         "quote the example-level interval and say it covers one seed")
    mean = float(values.mean())
    sem = float(scipy_stats.sem(values))
    if sem == 0.0:  # identical differences in every seed: no spread to scale
        return Interval(mean, mean, mean, f"t over {values.size} seeds")
    low, high = scipy_stats.t.interval(confidence, df=values.size - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), f"t over {values.size} seeds")


def metric_values(outputs: np.ndarray, labels: np.ndarray, metric: str, axis: int = -1) -> np.ndarray:
    """`metric` (accuracy; for binary 0/1 labels also F1 of class 1 and Matthews correlation) in percent along
    `axis`, vectorised over the other axes; 0 where a denominator is 0, as scikit-learn defines them."""
    if metric == "accuracy":
        return 100 * np.mean(outputs == labels, axis=axis)
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    tp = np.sum((outputs == 1) & (labels == 1), axis=axis, dtype=float)
    fp = np.sum((outputs == 1) & (labels == 0), axis=axis, dtype=float)
    fn = np.sum((outputs == 0) & (labels == 1), axis=axis, dtype=float)
    tn = np.sum((outputs == 0) & (labels == 0), axis=axis, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "f1":
            return np.nan_to_num(100 * 2 * tp / (2 * tp + fp + fn))
        return np.nan_to_num(100 * (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))


def score(outputs: np.ndarray, labels: np.ndarray, metrics: Sequence[str] = ("accuracy",), axis: int = -1):
    """The mean of `metrics` (GLUE's task score, e.g. MRPC: F1 and accuracy)."""
    return np.mean([metric_values(outputs, labels, m, axis) for m in metrics], axis=0)


def example_bootstrap(seeds: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                      metrics: Sequence[str] = ("accuracy",), same_examples: bool = False,
                      resamples: int = 10_000, seed: int = 0, confidence: float = CONFIDENCE) -> Interval:
    """Percentile bootstrap interval of the mean over seeds of score(first) - score(second), resampling test
    examples with the trained models fixed (scipy.stats.bootstrap).

    `seeds` holds, per seed, (first method's outputs, second method's outputs, labels) on the same examples.
    `same_examples`: every seed scored the same test set (GLUE's dev set), so one resample of example indices is
    applied to all seeds; otherwise (a generated test set per seed) each seed's examples are resampled on their
    own. The resampling seed is fixed, so a report is reproducible."""
    seeds = [tuple(np.asarray(x) for x in triple) for triple in seeds]
    if not seeds:
        raise ValueError("no seeds to compare")
    sizes = {len(labels) for _, _, labels in seeds}
    if same_examples and len(sizes) != 1:
        raise ValueError(f"same_examples=True but the seeds hold {sorted(sizes)} examples")

    def difference(*index_arrays, axis=-1):
        indices = index_arrays * len(seeds) if same_examples else index_arrays
        return np.mean([score(a[idx], y[idx], metrics, axis) - score(b[idx], y[idx], metrics, axis)
                        for (a, b, y), idx in zip(seeds, indices)], axis=0)

    data = (np.arange(sizes.pop()),) if same_examples else tuple(np.arange(len(y)) for _, _, y in seeds)
    estimate = float(difference(*data))
    result = scipy_stats.bootstrap(data, difference, n_resamples=resamples, paired=False, vectorized=True,
                                   method="percentile", confidence_level=confidence, batch=500,
                                   rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return Interval(estimate, float(low), float(high), f"bootstrap over examples, {resamples} resamples")


def paired_comparison(seeds: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                      metrics: Sequence[str] = ("accuracy",), same_examples: bool = False,
                      resamples: int = 10_000, seed: int = 0) -> Comparison:
    """First minus second method, per seed and over the seeds, with both intervals (see the module docstring)."""
    per_seed = tuple(float(score(np.asarray(a), np.asarray(y), metrics) - score(np.asarray(b), np.asarray(y), metrics))
                     for a, b, y in seeds)
    return Comparison(per_seed, seed_t_interval(per_seed) if len(per_seed) > 1 else None,
                      example_bootstrap(seeds, metrics, same_examples, resamples, seed))


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """ROC AUC of `scores` for the boolean `labels` (scikit-learn; ties count half), None without both classes.

    Accuracy mostly measures a small model's answer bias; the AUC asks whether its preference moves the right way
    example by example (0.5: no signal), whatever the bias."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, np.asarray(scores, dtype=float)))

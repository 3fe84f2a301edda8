"""benchmarks.harness.stats against small cases worked out by hand."""

import numpy as np
import pytest

from benchmarks.harness import stats

T_975_DF2 = 4.302652729749464  # Student t, 97.5 % quantile, 2 degrees of freedom (printed tables: 4.303)


def test_seed_t_interval_matches_the_hand_computation():
    # per-seed differences 1, 2, 3: mean 2, sample sd 1, standard error 1/sqrt(3)
    interval = stats.seed_t_interval([1.0, 2.0, 3.0])
    half_width = T_975_DF2 / np.sqrt(3)
    assert interval.estimate == pytest.approx(2.0)
    assert (interval.low, interval.high) == pytest.approx((2 - half_width, 2 + half_width))  # [-0.484, +4.484]
    assert interval.kind == "t over 3 seeds"
    assert not interval.excludes_zero()
    assert interval.text() == "+2.00 [-0.48, +4.48]"
    assert interval.text(scale=100, digits=0, minus="−") == "+200 [−48, +448]"


def test_seed_t_interval_needs_two_seeds_and_handles_equal_differences():
    with pytest.raises(ValueError, match="at least 2 seeds"):
        stats.seed_t_interval([1.5])
    same = stats.seed_t_interval([0.5, 0.5, 0.5])
    assert (same.low, same.high) == (0.5, 0.5) and same.excludes_zero()


def test_metrics_from_a_hand_counted_confusion_matrix():
    outputs, labels = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])  # tp 2, fp 1, fn 1, tn 1
    assert stats.metric_values(outputs, labels, "accuracy") == pytest.approx(60.0)
    assert stats.metric_values(outputs, labels, "f1") == pytest.approx(100 * 4 / 6)
    assert stats.metric_values(outputs, labels, "mcc") == pytest.approx(100 * (2 - 1) / np.sqrt(3 * 3 * 2 * 2))
    assert stats.score(outputs, labels, ("f1", "accuracy")) == pytest.approx((400 / 6 + 60) / 2)  # MRPC's score
    assert stats.metric_values(np.ones(4), np.array([1, 1, 0, 0]), "mcc") == 0.0  # undefined: 0, as scikit-learn
    with pytest.raises(ValueError, match="unknown metric"):
        stats.metric_values(outputs, labels, "auc")


def test_example_bootstrap_of_a_constant_difference_is_that_constant():
    labels = np.array(["yes", "no", "yes", "no"])
    always_right, always_wrong = labels.copy(), np.where(labels == "yes", "no", "yes")
    interval = stats.example_bootstrap([(always_right, always_wrong, labels)], resamples=200)
    assert (interval.estimate, interval.low, interval.high) == (100.0, 100.0, 100.0)


def test_shared_resamples_cancel_opposite_seeds_and_independent_ones_do_not():
    # seed A: the first method is right on example 0 only where the second is not; seed B the other way round.
    # Resampled together (one dev set) the two seeds' differences cancel in every resample; resampled on their own
    # (a test set per seed) they do not.
    labels = np.array([1, 0, 0, 0, 0, 0])
    right, wrong = labels.copy(), np.where(np.arange(6) == 0, 0, labels)
    seeds = [(right, wrong, labels), (wrong, right, labels)]
    shared = stats.example_bootstrap(seeds, same_examples=True, resamples=500)
    assert (shared.low, shared.high) == (0.0, 0.0)
    independent = stats.example_bootstrap(seeds, same_examples=False, resamples=500)
    assert independent.low < 0 < independent.high
    assert independent.estimate == 0.0


def test_paired_comparison_reports_per_seed_differences_and_both_intervals():
    labels = np.array([1, 1, 0, 0])
    first = [np.array([1, 1, 0, 0]), np.array([1, 1, 0, 1]), np.array([1, 0, 0, 1])]  # 100, 75, 50 % right
    second = np.array([1, 0, 1, 0])  # 50 % right in every seed
    comparison = stats.paired_comparison([(f, second, labels) for f in first], same_examples=True, resamples=300)
    assert comparison.per_seed == pytest.approx((50.0, 25.0, 0.0))
    assert comparison.mean == pytest.approx(25.0)
    half_width = T_975_DF2 * 25 / np.sqrt(3)  # sample sd of 50, 25, 0 is 25
    assert (comparison.seeds.low, comparison.seeds.high) == pytest.approx((25 - half_width, 25 + half_width))
    assert comparison.primary() is comparison.seeds
    assert not comparison.established()  # the t-interval spans 0
    assert comparison.text().startswith("+25.00 [-37.10, +87.10] (t over 3 seeds; examples only [")
    one_seed = stats.paired_comparison([(first[0], second, labels)], resamples=300)
    assert one_seed.seeds is None and one_seed.primary() is one_seed.examples
    assert not one_seed.established()  # 4 examples: a resample may hold only the 2 where both methods agree
    always_right = stats.paired_comparison([(labels, 1 - labels, labels)] * 2, same_examples=True, resamples=300)
    assert always_right.established() and always_right.seeds.text() == "+100.00 [+100.00, +100.00]"


def test_auc_counts_ordered_pairs_and_ties_half():
    # positives 0.35, 0.8 against negatives 0.1, 0.4: 3 of 4 pairs ordered right
    assert stats.auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert stats.auc([0.5, 0.5], [False, True]) == pytest.approx(0.5)
    assert stats.auc([0.1, 0.2], [True, True]) is None


def test_claims_recompute_the_quoted_glue_intervals_from_the_stored_runs(capsys):
    """The report script reads the stored SST-2 and MRPC runs (checking each score against its dev predictions) and
    prints the intervals RESULTS.md quotes: SST-2's +1.26 spans 0 over seeds, MRPC's -3.70 excludes it both ways."""
    from benchmarks.harness import claims

    claims.glue_study("SST-2", "ablation-sst2-20k")
    claims.glue_study("MRPC", "ablation-mrpc")
    out = capsys.readouterr().out
    assert "ssmlora − lora-sparse per seed +0.34, +1.38, +2.06  +1.26 [−0.89, +3.41] (t over 3 seeds;" in out
    assert "−3.70 [−5.36, −2.04] (t over 3 seeds; examples only [−6.09, −1.14])  ESTABLISHED" in out

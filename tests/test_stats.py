"""Paired statistics: hand-computed small examples, scipy's paired t statistic, and the verdict rule."""

import math

import pytest

from lostlm.bench.report import _leader
from lostlm.bench.stats import format_paired, leader, paired, paired_table, subject_table, verdict


def test_hand_computed_example():
    # d = (4.1-4.0, 4.3-4.0, 4.2-4.1) = (0.1, 0.3, 0.1): mean 0.5/3, std sqrt(((0.1-m)^2*2 + (0.3-m)^2)/2)
    out = paired({0: 4.1, 1: 4.3, 2: 4.2}, {0: 4.0, 1: 4.0, 2: 4.1})
    m = 0.5 / 3
    s = math.sqrt((2 * (0.1 - m) ** 2 + (0.3 - m) ** 2) / 2)
    assert out["n"] == 3 and out["seeds"] == [0, 1, 2]
    assert out["diffs"] == pytest.approx([0.1, 0.3, 0.1])
    assert out["mean"] == pytest.approx(m) and out["std"] == pytest.approx(s) and out["se"] == pytest.approx(s / math.sqrt(3))
    # m = 0.1667, SE = 0.0667: m - 2 SE = 0.033 > 0 -> worse (higher loss than the reference)
    assert out["verdict"] == "worse"


def test_only_shared_finite_seeds_are_paired():
    out = paired({0: 1.0, 1: 2.0, 3: float("inf")}, {0: 1.5, 2: 9.0, 3: 1.0})
    assert out["seeds"] == [0] and out["n"] == 1 and out["verdict"] == "one seed" and out["mean"] == pytest.approx(-0.5)
    assert paired({5: 1.0}, {0: 1.0})["verdict"] == "no shared seed"


def test_matches_scipy_paired_t():
    scipy_stats = pytest.importorskip("scipy.stats")
    a = {0: 5.02, 1: 5.11, 2: 4.97, 3: 5.05}
    b = {0: 5.10, 1: 5.13, 2: 5.06, 3: 5.09}
    out = paired(a, b)
    ref = scipy_stats.ttest_rel([a[s] for s in range(4)], [b[s] for s in range(4)])
    assert out["t"] == pytest.approx(ref.statistic)
    assert out["verdict"] == ("better" if ref.statistic < -2 else "worse" if ref.statistic > 2 else "within noise")


@pytest.mark.parametrize("mean, se, expected", [(-0.3, 0.1, "better"), (0.3, 0.1, "worse"), (-0.15, 0.1, "within noise"),
                                                (0.2, 0.1, "within noise"), (0.0, 0.0, "within noise")])
def test_verdict_is_two_standard_errors(mean, se, expected):
    assert verdict(mean, se) == expected


def _variant(name, losses):
    """A variant as the report's collect() gives it: name, and runs with seed and summary.val_loss."""
    return {"name": name, "runs": [{"seed": s, "summary": {"val_loss": l}} for s, l in losses.items()]}


def test_paired_table_skips_the_reference_and_unfinished_variants():
    rows = paired_table([_variant("full", {0: 5.0, 1: 5.2}), _variant("lost", {0: 4.9, 1: 5.0}), _variant("cola", {})], "full")
    assert [r["variant"] for r in rows] == ["lost"] and rows[0]["diffs"] == pytest.approx([-0.1, -0.2])
    assert paired_table([_variant("lost", {0: 1.0})], "full") == []


def test_subject_table_pairs_the_subject_against_every_other_finished_variant():
    variants = [_variant("full", {0: 5.0, 1: 5.2, 2: 5.1}), _variant("lost", {0: 4.9, 1: 5.0, 2: 4.8}),
                _variant("cola", {0: 4.8, 2: 4.7}), _variant("sltrain", {})]
    rows = subject_table(variants, "lost")
    assert [(r["variant"], r["reference"]) for r in rows] == [("lost", "full"), ("lost", "cola")]
    assert rows[0]["diffs"] == pytest.approx([-0.1, -0.2, -0.3]) and rows[1]["seeds"] == [0, 2]
    assert rows[1]["diffs"] == pytest.approx([0.1, 0.1])   # d = loss(subject) - loss(other): LOST is worse here
    text = "\n".join(format_paired(rows, subject="lost"))
    assert "of `lost` against each other variant" in text and "| cola | 0,2 | +0.1000, +0.1000 |" in text
    assert subject_table(variants, "sltrain") == []


def test_the_leader_is_the_lowest_mean_among_the_variants_with_the_most_seeds():
    variants = [_variant("full", {0: 5.0, 1: 5.2, 2: 5.1}), _variant("lost", {0: 4.9, 1: 5.0, 2: 4.8}),
                _variant("sltrain", {0: 4.8, 1: 4.95, 2: 4.85}),   # mean 4.8667 < LOST's 4.9000
                _variant("cola", {0: 3.0}),                        # lowest, but one seed: could be luck
                _variant("lowrank", {0: 1.0, 1: math.nan, 2: 1.0}),  # a diverged seed: two finished
                _variant("galore", {})]
    assert leader(variants) == "sltrain"
    assert leader([_variant("galore", {})]) is None
    # the report pairs the leader against every other variant unless it is the subject or reference
    rows = _leader(variants, "lost", "full")
    assert rows["leader"] == "sltrain" and [r["reference"] for r in rows["leader_paired"]] == ["full", "lost", "cola", "lowrank"]
    assert rows["leader_paired"][1]["diffs"] == pytest.approx([-0.1, -0.05, 0.05])
    assert _leader(variants, "sltrain", "full") == {"leader": "sltrain", "leader_paired": []}
    assert _leader(variants, "lost", "sltrain") == {"leader": "sltrain", "leader_paired": []}

"""The study's statistics (against scipy's paired t-test) and its whole flow on a tiny budget."""
import json
import math

import numpy as np
import pytest
from scipy import stats

from train import study


def test_paired_difference_is_the_paired_t_interval():
    rng = np.random.default_rng(7)
    a, b = rng.normal(1.0, 0.3, 5), rng.normal(0.7, 0.3, 5)
    mean, low, high = study.paired_difference(a, b)
    difference = a - b
    assert mean == pytest.approx(difference.mean(), rel=1e-12)
    expected = stats.t.interval(0.95, len(a) - 1, loc=difference.mean(),
                                scale=stats.sem(difference))
    assert (low, high) == pytest.approx(expected, rel=1e-12)
    # The interval resolves a difference exactly when the paired t-test rejects at 5%.
    resolved = study._verdict(low, high, True).startswith("resolved")
    assert resolved == (stats.ttest_rel(a, b).pvalue < 0.05)


def test_one_seed_gives_no_interval():
    mean, low, high = study.paired_difference(np.array([0.3]), np.array([0.1]))
    assert mean == pytest.approx(0.2) and math.isnan(low) and math.isnan(high)
    assert study._verdict(low, high, True) == "one seed: no interval"


@pytest.mark.parametrize("low, high, higher_is_better, verdict", [
    (0.1, 0.3, True, "resolved: better"), (0.1, 0.3, False, "resolved: worse"),
    (-0.3, -0.1, True, "resolved: worse"), (-0.3, -0.1, False, "resolved: better"),
    (-0.1, 0.3, True, "not resolved (interval spans 0)"),
    (0.0, 0.0, True, "no difference in any seed")])
def test_verdicts(low, high, higher_is_better, verdict):
    assert study._verdict(low, high, higher_is_better) == verdict


@pytest.mark.slow
def test_tiny_study_trains_evaluates_and_reports(tmp_path):
    arms = tuple(arm for arm in study.ARMS if arm.name in ("softmax", "calib400"))
    budget = study.BUDGETS["tiny"]
    records = study.run_study(budget, tmp_path, arms)
    assert set(records) == {"softmax", "calib400"}
    for arm in arms:
        for seed in budget.seeds:
            metrics = json.loads((tmp_path / "eval" / f"{arm.name}-seed{seed}" /
                                  "metrics.json").read_text())
            assert {"aligned", "jittered"} <= set(metrics["datasets"])
    report = study.report_markdown(budget, records, arms)
    # The reported paired difference is the one computed from the per-seed metrics.
    pei = {arm.name: study._values(records, arm.name, "jittered", "pei", budget.seeds)
           for arm in arms}
    mean, _, _ = study.paired_difference(pei["calib400"], pei["softmax"])
    assert f"| calibrated tau, 400 templates | PEI | {mean:+.4g} [" in report
    # PEI beside its nulls: per arm both, in the paired differences the mismatched masks'.
    null = {arm.name: study._values(records, arm.name, "jittered", "pei_null_mismatched", budget.seeds)
            for arm in arms}
    mean, _, _ = study.paired_difference(null["calib400"], null["softmax"])
    assert f"| calibrated tau, 400 templates | PEI, null: mismatched masks | {mean:+.4g} [" in report
    cone = study.summarise(study._values(records, "softmax", "aligned", "pei_null_best_cone",
                                         budget.seeds))[0]
    assert f", best fixed cone {cone:.4g}) |" in report
    assert all(record["seconds"] > 0 for arm in arms for record in records[arm.name].values())
    figures = study.figures_markdown(records, arms, tmp_path / "report", budget.seeds[0],
                                     budget.eval_data[0])
    links = [part.split(")")[0] for line in figures for part in line.split("](")[1:]]
    assert "figures/top_activation_side_by_side.png" in links and len(links) >= 5
    assert all((tmp_path / "report" / link).is_file() for link in links)
    # A second call finds every evaluation and trains nothing.
    again = study.run_study(budget, tmp_path, arms)
    assert again["calib400"][0]["metrics"] == records["calib400"][0]["metrics"]

"""The study's statistics (against scipy and hand-computed Holm), its rules, its figures'
helpers, and its whole flow on a tiny budget: runs, Q5's branches, the 28x28 cosine,
the report of a finished and of a partial study."""
import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats

from train import study

# ---------------------------------------------------------------- statistics


def test_paired_test_is_scipys_paired_t_test_and_interval():
    rng = np.random.default_rng(7)
    for seeds in (2, 5, 10):
        a, b = rng.normal(1.0, 0.3, seeds), rng.normal(0.8, 0.3, seeds)
        mean, low, high, p = study.paired_test(a, b)
        difference = a - b
        assert mean == pytest.approx(difference.mean(), rel=1e-12)
        expected = stats.t.interval(0.95, seeds - 1, loc=difference.mean(), scale=stats.sem(difference))
        assert (low, high) == pytest.approx(expected, rel=1e-10)
        assert p == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-10)
        # The interval excludes 0 exactly when the test rejects at 5%.
        assert (low > 0 or high < 0) == (p < 0.05)


def test_paired_test_with_one_seed_or_equal_differences():
    mean, low, high, p = study.paired_test([0.3], [0.1])
    assert mean == pytest.approx(0.2) and math.isnan(low) and math.isnan(high) and math.isnan(p)
    assert study.paired_test([3, 4, 5], [3, 4, 5]) == (0.0, 0.0, 0.0, 1.0)
    assert study.paired_test([4, 5, 6], [3, 4, 5]) == (1.0, 1.0, 1.0, 0.0)


def test_holm_by_hand():
    # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06
    # (never below the one before it).
    adjusted = study.holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    np.testing.assert_allclose(study.holm([0.2, 0.6]), [0.4, 0.6], rtol=1e-12)
    np.testing.assert_allclose(study.holm([0.7, 0.6]), [1.0, 1.0])  # capped at 1
    # A test not made yet counts in m: the others are adjusted by 3, 2.
    adjusted = study.holm([0.01, math.nan, 0.02])
    np.testing.assert_allclose(adjusted[[0, 2]], [0.03, 0.04], rtol=1e-12)
    assert math.isnan(adjusted[1])
    with pytest.raises(ValueError, match=r"p-values must lie in \[0, 1\]"):
        study.holm([0.5, 1.5])


def test_q1_answer_follows_the_plans_rule():
    from train.study_report import q1_answer

    class Result:
        def __init__(self, mean):
            self.mean = mean

    cases = [((+1, +1), (0.01, 0.20), "yes"), ((+1, -1), (0.01, 0.20), "yes"),
             ((+1, -1), (0.01, 0.04), "no, worse"), ((-1, +1), (0.01, 0.50), "no, worse"),
             ((+1, +1), (0.05, 0.06), "not shown"), ((-1, -1), (math.nan, math.nan), "not shown")]
    for means, adjusted, answer in cases:
        assert q1_answer([Result(m) for m in means], adjusted) == answer, (means, adjusted)


def test_second_half_cosines_are_the_measurements_of_steps_121_to_240():
    budget = study.BUDGETS["study"]
    assert study.steps_per_epoch(budget) == 30 and study.branch_epoch(budget) == 4
    record = {"subset_cosine": [(step, step / 1000) for step in range(10, 241, 10)]}
    values = study.second_half_cosines(budget, record)
    assert values == [step / 1000 for step in range(130, 241, 10)]
    records = {"ecloss-s3": {0: record, 1: {"subset_cosine": [(240, 0.1), (120, 5.0)]}}}
    median, count, seeds = study.median_cosine(budget, records, "ecloss-s3")
    assert (count, seeds) == (13, 2) and median == pytest.approx(np.median(values + [0.1]))
    assert study.branches_due(budget, records)
    assert not study.branches_due(budget, {"ecloss-s3": {0: {"subset_cosine": [(130, 0.95)]}}})
    assert math.isnan(study.median_cosine(budget, {}, "ecloss-s3")[0])


def test_the_study_budget_and_its_branch_step_match_the_plan():
    budget = study.BUDGETS["study"]
    arm = next(a for a in study.ARMS if a.name == study.BRANCH_SOURCE)
    config = study.arm_config(budget, arm, 3, study.Path("/r"), study.Path("/d.rec"))
    # Every epoch's checkpoint is kept, the one after epoch 4 (step 120) among them.
    assert config.train.checkpoint_every == study.steps_per_epoch(budget) == 30
    assert config.train.keep_checkpoints == budget.epochs == 8
    branch = study.branch_config(budget, study.BRANCHES[0], 3, study.Path("/r"), study.Path("/d.rec"))
    reordered = study.branch_config(budget, study.BRANCHES[1], 3, study.Path("/r"), study.Path("/d.rec"))
    assert branch.train.branch_from == reordered.train.branch_from == "/r/ecloss-s3-seed3:120"
    assert (branch.ecloss.templates, branch.train.data_order_seed) == (400, None)
    assert (reordered.ecloss.templates, reordered.train.data_order_seed) == ("full", 103)
    # Everything else is the source arm's config.
    for section in ("model", "head", "beta", "data", "optim"):
        assert getattr(branch, section) == getattr(config, section)
    assert branch.ecloss.tau == "auto" and branch.ecloss.score_spread == 3.0


# ---------------------------------------------------------------- figures


def test_maximum_parts_reads_the_part_under_each_maximum():
    from train.study_figures import landing_fractions, maximum_parts

    masks = torch.zeros(2, 2, 8, 8, dtype=torch.bool)
    masks[:, 0, :4, :4] = True  # part 0: top left
    masks[:, 1, 4:, 4:] = True  # part 1: bottom right
    maps = torch.zeros(2, 4, 4, 4)
    maps[0, 0, 0, 0] = 1.0  # top left -> part 0
    maps[0, 1, 3, 3] = 2.0  # bottom right -> part 1
    maps[0, 2, 0, 3] = 1.0  # top right: no part -> background (2)
    maps[1, 0, 3, 3] = 1.0
    maps[1, 1, 0, 0] = 0.5
    maps[1, 2, 3, 0] = 1.0  # bottom left: background
    maps[:, 3] = -1.0  # never positive: dead (3)
    landed = maximum_parts(maps, masks)
    assert landed.tolist() == [[0, 1, 2, 3], [1, 0, 2, 3]]
    np.testing.assert_allclose(landing_fractions(landed, 2),
                               [[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])


# ---------------------------------------------------------------- the flow, tiny


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """Softmax and ecloss-s3 over seeds 0 and 1, 2 epochs; Q5's branches for seed 0 (its
    rule forced: the tiny ECLoss cosine is above the threshold)."""
    out = tmp_path_factory.mktemp("study")
    budget = replace(study.BUDGETS["tiny"], epochs=2, secondary_seeds=(0,), device="cpu")
    arms = study.ARMS[:2]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(study, "branches_due", lambda budget, records: True)
            records = study.run_study(budget, out, arms)
    finally:
        torch.set_num_threads(threads)
    return budget, arms, out, records


@pytest.mark.slow
def test_tiny_study_runs_the_arms_and_the_branches(tiny_study):
    budget, arms, out, records = tiny_study
    assert set(records) == {"softmax", "ecloss-s3", "ecloss-s3-branch400", "ecloss-s3-reordered"}
    assert all(set(records[arm.name]) == {0, 1} for arm in arms)
    step = study.branch_epoch(budget) * study.steps_per_epoch(budget)
    source = json.loads((out / "eval" / "ecloss-s3-seed0" / "metrics.json").read_text())
    for branch in study.BRANCHES:
        record = records[branch.name][0]
        log = (out / "runs" / f"{branch.name}-seed0" / "train.log").read_text()
        assert f"ecloss-s3-seed0/checkpoints/step_{step:09d}.pt at step {step}" in log
        # Its own evaluation, on the faces of its seed (the run's).
        metrics = json.loads((out / "eval" / f"{branch.name}-seed0" / "metrics.json").read_text())
        assert metrics["settings"]["faces_seed"] == source["settings"]["faces_seed"] == 1000
        assert record["calibrated_tau"] == records["ecloss-s3"][0]["calibrated_tau"]
        assert metrics["run"]["ecloss"]["templates"] == branch.templates
    assert all(record["seconds"] > 0 for runs in records.values() for record in runs.values())
    # A second call finds every evaluation and trains nothing.
    again = study.collect_records(budget, out, arms)
    assert again["ecloss-s3"][0]["metrics"] == records["ecloss-s3"][0]["metrics"]
    assert set(again) == set(records)


def _from_files(out, arm, seed, metric):
    value = json.loads((out / "eval" / f"{arm}-seed{seed}" / "metrics.json").read_text())[
        "datasets"]["jittered"][metric]
    return value["mean"] if isinstance(value, dict) else float(value)


@pytest.mark.slow
def test_tiny_report_answers_from_the_evaluations(tiny_study):
    from train.study_report import write_report

    budget, arms, out, records = tiny_study
    path = write_report(budget, out, records, arms, command="tiny")
    report = path.read_text()
    assert "**6 of the 6 planned runs are evaluated**." in report
    # Q1's rows: the paired t-test and Holm computed here from the metrics.json files.
    p_values, rows = [], []
    for key, label in study.PRIMARY[2]:
        a = np.array([_from_files(out, "ecloss-s3", s, key) for s in (0, 1)])
        b = np.array([_from_files(out, "softmax", s, key) for s in (0, 1)])
        difference = a - b
        p = stats.ttest_rel(a, b).pvalue if difference.std() > 0 else (1.0 if difference.mean() == 0 else 0.0)
        p_values.append(p)
        rows.append((label, difference.mean(), p))
    sorted_p = sorted(p_values)
    holm = {sorted_p[0]: min(1, 2 * sorted_p[0])}
    holm[sorted_p[1]] = max(holm[sorted_p[0]], min(1, sorted_p[1]))
    for label, mean, p in rows:
        assert f"| {label} |" in report
        line = next(line for line in report.splitlines() if line.startswith(f"| {label} |"))
        assert f"| 2 | {mean:+.3g}" in line and f"| {p:.3g} | {holm[p]:.3g} |" in line, line
    assert "**Answer: " in report
    # The secondary family holds Q2-Q4 (no arms: not tested yet) and Q5's A - B, with A - A' beside.
    assert "Holm over all 5 tests of the family" in report
    assert "| Q5: the full set instead of the 400 (A - B) | `ecloss-s3` minus `ecloss-s3-branch400` | 1 |" in report
    assert "Q5's noise floor, beside its test (no test): A minus A'" in report
    # Per arm, PEI beside its nulls; the positive control; the cosine rule; diagnostics.
    cone = np.mean([_from_files(out, "softmax", s, "pei_null_best_cone") for s in (0, 1)])
    assert f"best fixed cone {cone:.4g}" in report
    assert "| `softmax` | 2 | " in report and "## Positive control" in report
    median, count, _ = study.median_cosine(budget, records, "ecloss-s3")
    assert f"| `ecloss-s3` | 2 | {count} | {median:.4f} |" in report
    assert "Not measured yet: `python -m train.study" in report
    assert "| `ecloss-s3` | " in report.split("## Diagnostics")[1]
    links = [part.split(")")[0] for line in report.splitlines() for part in line.split("](")[1:]]
    assert {"figures/maximum_landing.png", "figures/part_channels.png"} <= set(links)
    assert all((out / link).is_file() for link in links)
    saved = json.loads((out / "records.json").read_text())
    assert set(saved) == set(records)


@pytest.mark.slow
def test_a_partial_study_reports_what_it_has(tiny_study, tmp_path):
    from train.study import main

    budget, arms, out, records = tiny_study
    partial = tmp_path / "partial"
    shutil.copytree(out / "eval", partial / "eval")
    shutil.rmtree(partial / "eval" / "softmax-seed1")
    for name in ("ecloss-s3-branch400", "ecloss-s3-reordered"):
        shutil.rmtree(partial / "eval" / f"{name}-seed0")
    path = main(["--out", str(partial), "--budget", "tiny", "--arms", "ecloss-s3", "--report-only",
                 "--device", "cpu"])
    report = path.read_text()
    assert not (partial / "runs").exists() and not (partial / "data").exists(), \
        "--report-only trains nothing"
    assert "**3 of the 4 planned runs are evaluated** (not yet: softmax seed 1)" in report
    # Q1 on the one seed both arms have: a mean, no interval.
    mean = _from_files(out, "ecloss-s3", 0, "mean_normalized_gain") - _from_files(out, "softmax", 0, "mean_normalized_gain")
    assert f"| 1 | {mean:+.3g} (one seed: no interval) | – | – | not resolved |" in report
    assert "**Answer: not shown.**" in report and "Not scored yet" in report
    # Runs found beside their evaluations, wherever metrics.json says they were.
    shutil.copytree(out / "runs" / "softmax-seed0", partial / "runs" / "softmax-seed0")
    moved = study.collect_records(budget, partial, arms)
    assert moved["softmax"][0]["run_dir"] == str(partial / "runs" / "softmax-seed0")
    assert moved["ecloss-s3"][0]["run_dir"] == str(out / "runs" / "ecloss-s3-seed0")


@pytest.mark.slow
def test_first_draw_is_the_evaluations_faces(tiny_study):
    """The figures' maps are those the evaluation scored: its tracking gains come back."""
    from ecloss_fast import metrics
    from train.checkpoint import load_for_eval
    from train.evaluate import first_draw

    budget, _, out, records = tiny_study
    record = records["ecloss-s3"][1]
    model, config = load_for_eval(record["run_dir"])
    drawn = first_draw(model, config, study.eval_settings(budget, 1))
    tracking = metrics.channel_tracking(drawn["maps"], drawn["part_masks"], drawn["label"],
                                        permutations=budget.permutations, seed=1)
    saved = record["metrics"]["jittered"]["tracking"]["channels"]
    np.testing.assert_allclose(tracking.gain.numpy(), np.array(saved["normalized_gain"], dtype=float),
                               rtol=1e-6, atol=1e-9)
    assert tracking.confident.tolist() == saved["confident"]


@pytest.mark.slow
def test_cosine_28_against_float64_numpy(tiny_study, tmp_path):
    """The measurement at 10x10 (the tiny maps are 8x8; 5,051 templates, cheap), against
    docs/design.md's loss in float64 NumPy: tau from the scores' population std over the
    templates, the cosine of the full set's and the 400 subset's gradients."""
    from _numpy_ecloss import _templates, loss_and_grad
    import torch.nn.functional as F

    from train.checkpoint import load_for_eval
    from train.evaluate import first_draw
    from train.study_cosine import measure_cosine28, measured_seeds

    budget, _, out, records = tiny_study
    assert measured_seeds(tmp_path) is None
    result = measure_cosine28(budget, out, images=2, size=10, spreads=(1.0, 10.0))
    assert result["seeds"] == measured_seeds(out) == [0]
    assert json.loads((out / "cosine28.json").read_text()) == result
    run = result["runs"]["0"]
    model, config = load_for_eval(out / "runs" / "ecloss-s3-seed0")
    drawn = first_draw(model, config, study.eval_settings(budget, 0))
    chosen = [int(np.flatnonzero(drawn["indices"] == face)[0]) for face in run["faces"]]
    assert len(set(drawn["label"][chosen].tolist())) == 2, "faces of distinct identities"
    x = F.interpolate(drawn["maps"][chosen], size=(10, 10), mode="bilinear", align_corners=False).double().numpy()
    full = _templates(10, 10)
    subset = full[np.round(np.linspace(0, len(full) - 1, 400)).astype(int)]
    rows = x.reshape(-1, 100)
    spread_of_scores = (rows @ full.T).std(-1)  # population std over the templates
    for spread in (1.0, 10.0):
        measured = run["by_spread"][f"{spread:g}"]
        tau = spread / spread_of_scores.mean()
        assert measured["tau"] == pytest.approx(tau, rel=1e-5)
        _, grad_full = loss_and_grad(x, tau=tau)
        _, grad_subset = loss_and_grad(x, tau=tau, templates=subset)
        cosine = (grad_full * grad_subset).sum() / np.linalg.norm(grad_full) / np.linalg.norm(grad_subset)
        assert measured["cosine"] == pytest.approx(cosine, rel=1e-4)
    # The report reads it.
    from train.study_report import write_report

    report = write_report(budget, out, records, study.ARMS[:2], figures=False).read_text()
    assert f"| 10 | {run['by_spread']['10']['cosine']:.4f} |" in report

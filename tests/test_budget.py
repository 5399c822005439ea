"""One budget for search, final stage and predictions: the planning arithmetic with hand-picked speeds."""
import math
import threading
from pathlib import Path

import pytest
from ray import cloudpickle

from tuneprod.spec import UserError, spec_from_dict
from tuneprod.tuning.budget import (AUTO_MEMBERS_MOST, FIXED_OVERHEAD_S, BudgetStopper, MemberPlan, Speed, Workload,
                                    final_estimate, makespan, members_that_fit, minimum_seconds,
                                    restored_stopper, shard_sizes)
from tuneprod.tuning.endings import TrialEndings
from tuneprod.tuning.tuner import plan_budget

WORK = Workload(train_images=800, val_images=200, labelled_images=1000, test_images=200, views=10, members=2, seeds=1,
                member_epochs="best", max_epochs=10, slots=1, final=True)
SPEED = Speed(train_images_per_s=50, eval_images_per_s=400)


@pytest.mark.parametrize("durations, slots, expected", [([30, 20, 10], 2, 30), ([10] * 4, 2, 20), ([5, 7], 8, 7),
                                                        ([], 2, 0)])
def test_makespan_runs_the_longest_first_on_the_freest_slot(durations, slots, expected):
    assert makespan(durations, slots) == expected


def test_final_stage_estimate():
    members = [MemberPlan(5), MemberPlan(3)]
    one_slot = final_estimate(WORK, SPEED, members)  # 1000 images at 50/s: 20 s an epoch
    assert one_slot.members_s == 160
    assert final_estimate(Workload(**{**WORK.__dict__, "slots": 2}), SPEED, members).members_s == 100
    assert one_slot.predict_s == pytest.approx(200 * (10 * 2 / 400 + 0.004))
    assert one_slot.total_s == pytest.approx(160 + one_slot.predict_s + FIXED_OVERHEAD_S)
    assert final_estimate(Workload(**{**WORK.__dict__, "final": False}), SPEED, members).total_s == 0


def test_predictions_are_scored_in_shards_side_by_side_one_per_slot():
    """2500 test images: four shards of 625 on two slots take as long as 1250 images on one."""
    members = [MemberPlan(1)]
    one = final_estimate(Workload(**{**WORK.__dict__, "test_images": 2500}), SPEED, members).predict_s
    two = final_estimate(Workload(**{**WORK.__dict__, "test_images": 2500, "slots": 2}), SPEED, members).predict_s
    assert one == pytest.approx(2500 * (10 / 400 + 0.004)) and two == pytest.approx(1250 * (10 / 400 + 0.004))
    assert final_estimate(Workload(**{**WORK.__dict__, "test_images": 0}), SPEED, members).predict_s == 0


@pytest.mark.parametrize("images, slots, expected", [(1597, 2, [799, 798]), (2500, 1, [834, 833, 833]),
                                                     (2500, 2, [625] * 4), (3, 4, [1, 1, 1]), (0, 2, []),
                                                     (1000, 1, [1000])])
def test_shards_are_at_most_shard_images_and_even_over_the_slots(images, slots, expected):
    assert shard_sizes(images, slots) == expected


def test_faster_predictions_shorten_their_estimate_by_their_speedup():
    """A member run in onnxruntime at twice torch's speed: the forward passes take half as long; decoding does not
    change."""
    members = [MemberPlan(1)]
    twice = final_estimate(WORK, Speed(50, 400, predict_speedup=2.0), members).predict_s
    assert twice == pytest.approx(200 * (10 / 800 + 0.004))
    stopper = BudgetStopper(1000, WORK, Speed(50, 400, predict_speedup=2.0), "val_acc", "max", lambda _: None)
    stopper("a", {"epoch": 2, "val_acc": 0.5, "images_per_s": 40, "eval_images_per_s": 300})
    assert stopper.speed() == Speed(40, 300, 2.0)  # the trials' speeds, the probe's speedup


def test_a_first_epoch_speed_does_not_plan_the_final_stage():
    """A trial's first epoch pays one-time costs (on an H200: 122 img/s against the 828 measured before the
    search): the estimate keeps the speed measured before the search until a trial reports a later epoch."""
    stopper = BudgetStopper(1000, WORK, SPEED, "val_acc", "max", lambda _: None)
    stopper("a", {"epoch": 1, "val_acc": 0.5, "images_per_s": 5, "eval_images_per_s": 20})
    assert stopper.speed() == SPEED and stopper.estimate() == final_estimate(WORK, SPEED, [MemberPlan(1)])
    stopper("a", {"epoch": 2, "val_acc": 0.6, "images_per_s": 45, "eval_images_per_s": 380})
    assert stopper.speed() == Speed(45, 380)
    unmeasured = BudgetStopper(1000, WORK, Speed(math.inf, math.inf), "val_acc", "max", lambda _: None)
    unmeasured("a", {"epoch": 1, "val_acc": 0.5, "images_per_s": 5, "eval_images_per_s": 20})
    assert unmeasured.speed() == Speed(5, 20)  # the probe failed: a first epoch is better than no speed at all


def test_trials_packed_on_a_gpu_plan_members_at_the_speed_they_get_alone():
    """Trials report their packed speed; members train with a GPU each: the estimate scales each report by its
    configuration's speed-up alone (here 2x for batch 32, none for batch 128)."""
    def alone(config: dict) -> float:
        return 2.0 if config.get("batch_size") == 32 else 1.0

    stopper = BudgetStopper(1000, WORK, SPEED, "val_acc", "max", lambda _: None, alone_speedup=alone)
    stopper("a", {"epoch": 2, "val_acc": 0.5, "images_per_s": 40, "eval_images_per_s": 300,
                  "config": {"batch_size": 32}})
    assert stopper.speed() == Speed(80, 600)
    stopper("b", {"epoch": 2, "val_acc": 0.5, "images_per_s": 100, "eval_images_per_s": 800,
                  "config": {"batch_size": 128}})
    assert stopper.speed() == Speed(90, 700)  # the medians of 80 and 100, and of 600 and 800


def test_a_gallery_member_costs_one_more_pass_over_the_labelled_images():
    """A member that predicts by its gallery embeds every labelled image once (1000 at 400/s: 2.5 s)."""
    plain = final_estimate(WORK, SPEED, [MemberPlan(5), MemberPlan(3)])
    gallery = final_estimate(WORK, SPEED, [MemberPlan(5, gallery=True), MemberPlan(3)])
    assert gallery.members_s - plain.members_s == pytest.approx(2.5)
    stopper = BudgetStopper(1000, WORK, SPEED, "val_acc", "max", lambda _: None)
    stopper("a", {"epoch": 3, "val_acc": 0.5, "config": {"head": "arcface", "predict_by": "knn"}})
    stopper("b", {"epoch": 2, "val_acc": 0.6, "config": {"head": "arcface", "predict_by": "head"}})
    assert stopper.members() == [MemberPlan(2, gallery=False), MemberPlan(3, gallery=True)]


def test_the_budgets_cut_is_written_in_the_record():
    endings = TrialEndings(None, 10)
    stopper = BudgetStopper(100, WORK, SPEED, "val_acc", "max", lambda _: None)
    stopper.endings = endings
    stopper("a", {"epoch": 2, "val_acc": 0.5})
    assert not stopper.stop_all() and not endings.budget_cut
    stopper.started -= 500
    assert stopper.stop_all() and endings.budget_cut
    assert endings.conclude("a", {"epoch": 2}).words(10) == "cut by the time budget after epoch 2"


def test_minimum_is_one_trial_to_its_first_rung_then_members_of_as_many_epochs():
    total, trial, final = minimum_seconds(WORK, SPEED, grace_period=2)
    assert trial == 2 * (800 / 50 + 200 / 400)
    assert final.members_s == 2 * 2 * 20  # two members of 2 epochs, one after the other
    assert total == pytest.approx(trial + final.total_s)
    fixed = Workload(**{**WORK.__dict__, "member_epochs": 6})
    assert minimum_seconds(fixed, SPEED, grace_period=2)[2].members_s == 2 * 6 * 20
    # With final.epochs auto, a trial stopped at its first rung was still improving there: its member trains the
    # whole horizon.
    auto = Workload(**{**WORK.__dict__, "member_epochs": "auto"})
    assert minimum_seconds(auto, SPEED, grace_period=2)[2].members_s == 2 * 10 * 20


def test_with_auto_epochs_a_trial_still_improving_is_planned_for_the_whole_horizon():
    """max_epochs 10: a trial whose best is its latest epoch so far (still improving, or running) is planned at 10;
    one that peaked earlier, at its best epoch."""
    stopper = BudgetStopper(1000, Workload(**{**WORK.__dict__, "member_epochs": "auto"}), SPEED, "val_acc", "max",
                            lambda _: None)
    for epoch, value in enumerate([0.2, 0.5, 0.7], 1):
        stopper("rising", {"epoch": epoch, "val_acc": value})
    for epoch, value in enumerate([0.3, 0.6, 0.5, 0.55], 1):
        stopper("peaked", {"epoch": epoch, "val_acc": value})
    assert stopper.members() == [MemberPlan(10), MemberPlan(2)]
    stopper("rising", {"epoch": 4, "val_acc": 0.65})  # now it peaked at epoch 3
    assert stopper.members() == [MemberPlan(3), MemberPlan(2)]


def spec_with_budget(seconds):
    return spec_from_dict({"data": {"train": "x"}, "search": {"time_budget_s": seconds, "metric": "val_acc"},
                           "final": {"members": 2}}, Path("s.yaml"))


def test_a_budget_too_small_for_one_trial_and_the_final_stage_is_one_line_naming_the_field():
    total = minimum_seconds(WORK, SPEED, 2)[0]
    with pytest.raises(UserError) as caught:
        plan_budget(spec_with_budget(total - 1), WORK, SPEED, 2, progress=lambda _: None)
    message = str(caught.value)
    assert message.startswith(f"s.yaml: search.time_budget_s: the value is {total - 1:g}, but must be >= "
                              f"{total:.0f}") and "\n" not in message
    said = []
    stopper = plan_budget(spec_with_budget(total + 1), WORK, SPEED, 2, progress=said.append)
    assert isinstance(stopper, BudgetStopper) and "budget" in said[0] and "final stage" in said[0]


def test_the_stopper_ends_the_trials_when_the_time_left_is_what_the_final_stage_needs():
    said = []
    stopper = BudgetStopper(1000, WORK, SPEED, "val_acc", "max", said.append)
    stopper("a", {"epoch": 3, "val_acc": 0.5, "images_per_s": 40, "eval_images_per_s": 400})
    stopper("a", {"epoch": 4, "val_acc": 0.4, "images_per_s": 60, "eval_images_per_s": 400})
    stopper("b", {"epoch": 6, "val_acc": 0.7, "images_per_s": 50, "eval_images_per_s": 400})
    stopper("c", {"epoch": 1, "val_acc": 0.1, "images_per_s": 50, "eval_images_per_s": 400})
    assert stopper.speed() == Speed(50, 400)
    assert stopper.members() == [MemberPlan(6), MemberPlan(3)]  # the two best trials, each at its best epoch
    reserve = stopper.estimate().total_s  # (6 + 3) x 20 s + predictions + setup
    assert stopper.estimate().members_s == 180
    stopper.started -= 1000 - reserve - 5
    assert not stopper.stop_all()
    stopper.started -= 10
    assert stopper.stop_all() and stopper.stop_all()
    assert len(said) == 1 and "ending the trials" in said[0]


def test_without_a_final_stage_the_budget_is_the_trials_alone():
    work = Workload(**{**WORK.__dict__, "final": False, "members": 1, "seeds": 2})
    stopper = BudgetStopper(100, work, SPEED, "val_loss", "min", lambda _: None)
    stopper("a", {"epoch": 2, "val_loss": 0.3})
    stopper("b", {"epoch": 5, "val_loss": 0.2})
    assert stopper.members() == [MemberPlan(5), MemberPlan(5)]  # val_loss: lower is better; the best trial with 2 seeds
    stopper.started -= 99
    assert not stopper.stop_all()
    stopper.started -= 2
    assert stopper.stop_all()


def test_the_stopper_travels_with_the_experiment_and_its_budget_restarts_on_resume(tmp_path):
    console = threading.Lock()  # a console that cannot be pickled (the CLI's print, once Ray has replaced it)
    stopper = BudgetStopper(100, WORK, SPEED, "val_acc", "max", lambda line: console and None)
    stopper.endings = TrialEndings.open(tmp_path, 10)
    stopper("a", {"epoch": 2, "val_acc": 0.5})
    stopper.started -= 500
    assert stopper.stop_all()
    assert restored_stopper(tmp_path) is None
    restored = cloudpickle.loads(cloudpickle.dumps(stopper))
    assert restored.best == stopper.best and restored.progress is print
    assert not restored.stopped and restored.used_s() < 5
    assert restored_stopper(tmp_path) is restored  # where the resumed search asks how many members fit


def test_auto_members_are_as_many_as_fit_in_the_time_left_taking_the_best_plans_in_turn():
    """1000 labelled images at 50/s: 20 s an epoch; predictions take 200 test images x (10 views a member at 400/s
    + 0.004 s to decode) in two shards side by side, so 2.5 s a member + 0.4 s; setup 30 s."""
    two_slots = Workload(**{**WORK.__dict__, "slots": 2})
    best = [MemberPlan(3), MemberPlan(2)]  # 60 s and 40 s
    assert members_that_fit(two_slots, SPEED, best, 0) == 2  # never fewer than one round of slots
    # 3 members [60, 40, 60] on 2 slots: makespan 100, + 7.9 s of predictions + 30 s = 137.9
    assert members_that_fit(two_slots, SPEED, best, 137.8) == 2
    assert members_that_fit(two_slots, SPEED, best, 138.0) == 3
    assert members_that_fit(two_slots, SPEED, best, 140.5) == 4  # [60, 40, 60, 40]: still 100, + 10.4 + 30
    assert members_that_fit(two_slots, SPEED, best, 10_000) == AUTO_MEMBERS_MOST
    assert members_that_fit(Workload(**{**WORK.__dict__, "slots": 12}), SPEED, best, 10_000) == 12


def test_time_share_ends_the_trials_earlier_and_the_time_left_buys_more_members():
    auto = Workload(**{**WORK.__dict__, "members": 1, "slots": 1})  # members auto on one slot
    plain = BudgetStopper(1000, auto, SPEED, "val_acc", "max", lambda _: None)
    said = []
    shared = BudgetStopper(1000, Workload(**{**auto.__dict__, "time_share": 0.5}), SPEED, "val_acc", "max",
                           said.append)
    for stopper in (plain, shared):
        stopper("a", {"epoch": 2, "val_acc": 0.5})  # n members of 2 epochs: 40 s + 5 s to predict each, + 30.8 s
        stopper.started -= 500  # 500 s used, 500 left
    # Half the budget would be 500 s, but the most members auto trains, 8, need 8 x 45 + 30.8 = 390.8 s: the trials
    # go on until then (and without time_share until 75.8 s are left).
    assert not plain.stop_all() and not shared.stop_all()
    shared.started -= 110  # 390 s left
    assert not plain.stop_all() and shared.stop_all()
    assert "final.time_share keeps 391 s for it" in said[0]
    # Cut with 390.8 s kept for them: 8 members, though the clock moved on while the trials stopped.
    assert shared.final_members() == 8
    plain.started -= 100  # 400 s left: 8 x 45 + 30.8 fits
    assert plain.final_members() == 8
    plain.started -= 250  # 150 s left: 2 x 45 + 30.8 fits, 3 x 45 + 30.8 does not
    assert plain.final_members() == 2


def test_time_share_keeps_its_share_when_the_most_members_need_more():
    """Members of 20 epochs: 400 s + 5 s to predict each; 8 of them would need far more than half of 1000 s."""
    auto = Workload(**{**WORK.__dict__, "members": 1, "slots": 1, "time_share": 0.5})
    stopper = BudgetStopper(1000, auto, SPEED, "val_acc", "max", lambda _: None)
    stopper("a", {"epoch": 20, "val_acc": 0.5})
    assert stopper.reserve_s(stopper.estimate()) == 500
    assert stopper.reserve_s(stopper.estimate()) > stopper.estimate().total_s  # one member: 435.8 s

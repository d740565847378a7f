"""A rollout's judge and tallies (app.repository.rollout), and the comparison budget."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

from app.repository.requests import RolloutRequest
from app.repository.rollout import Judge, Mode, Plan, Role, Status, Tally
from app.repository.route import Budget, compute_seconds


def plan(**changes: object) -> Plan:
    asked = RolloutRequest.model_validate(
        {"candidate": "2", "mode": "canary", "percent": 20, "min_requests": 10} | changes
    )
    return asked.plan("abc", "digits", "1", "2", 0.05)


def test_tallies_add_up_and_travel_between_processes() -> None:
    one, two = Tally(), Tally()
    one.answered(Role.BASELINE, 0.010, failed=False)
    one.compare(images=3, agreeing=2, difference=0.3)
    two.answered(Role.CANDIDATE, 0.020, failed=True)
    two.dropped = 4
    one.add(pickle.loads(pickle.dumps(two)))  # as a worker sends it to its supervisor
    assert one.requests == {Role.BASELINE: 1, Role.CANDIDATE: 1}
    assert one.errors == {Role.BASELINE: 0, Role.CANDIDATE: 1}
    assert (one.compared, one.compared_images, one.agreeing, one.dropped) == (1, 3, 2, 4)
    assert one.agreement == pytest.approx(2 / 3)
    assert not Tally()


def test_the_judge_waits_for_min_requests_then_rolls_back_on_agreement() -> None:
    judge = Judge(plan(min_agreement=0.9))
    for _ in range(9):
        one = Tally()
        one.compare(images=1, agreeing=0, difference=1.0)
        assert judge.add(one) is None  # 9 < min_requests: no verdict yet
    last = Tally()
    last.compare(images=1, agreeing=0, difference=1.0)
    verdict = judge.add(last)
    assert verdict is not None
    assert "agreement 0.000 < min_agreement 0.9 over 10 compared" in verdict
    judge.end(Status.ROLLED_BACK, verdict)
    judge.end(Status.PROMOTED)  # an ended rollout stays as it ended
    state = judge.state()
    assert (state["status"], state["reason"]) == ("rolled_back", verdict)
    assert state["mean_probability_difference"] == 1.0


def test_the_judge_rolls_back_a_candidate_that_fails_even_when_nothing_compares() -> None:
    judge = Judge(plan(max_error_rate=0.1))
    failing = Tally()
    for _ in range(10):
        failing.answered(Role.CANDIDATE, 0.01, failed=True)
    verdict = judge.add(failing)
    assert verdict is not None
    assert "error rate 1.000 > max_error_rate 0.1" in verdict


def test_a_good_candidate_is_never_judged_wrong() -> None:
    judge = Judge(plan())
    good = Tally()
    for _ in range(100):
        good.answered(Role.CANDIDATE, 0.01, failed=False)
        good.compare(images=2, agreeing=2, difference=0.0)
    assert judge.add(good) is None
    state = judge.state()
    assert state["agreement"] == 1.0
    assert state["versions"]["candidate"] == {
        "version": "2",
        "requests": 100,
        "errors": 0,
        "p50_ms": 10.0,
        "p99_ms": 10.0,
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"candidate": "2", "mode": "canary"}, "needs percent"),
        ({"candidate": "2", "mode": "shadow", "percent": 10}, "takes no percent"),
        ({"candidate": "2", "mode": "canary", "percent": 101}, "less than or equal to 100"),
        ({"candidate": "2", "mode": "other"}, "'canary' or 'shadow'"),
        ({"candidate": "2", "mode": "shadow", "min_requests": 0}, "greater than or equal to 1"),
        ({"candidate": "2", "mode": "shadow", "extra": 1}, "Extra inputs"),
    ],
)
def test_a_rollout_request_is_checked(body: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RolloutRequest.model_validate(body)


def test_a_shadow_copies_every_request() -> None:
    shadow = RolloutRequest.model_validate({"candidate": "2", "mode": "shadow"})
    assert shadow.plan("x", "m", "1", "2", 0.05).mode is Mode.SHADOW
    assert shadow.plan("x", "m", "1", "2", 0.05).percent == 100


def test_the_budget_allows_its_share_of_each_second(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("app.repository.route.time.monotonic", lambda: now[0])
    budget = Budget(0.1)  # 100 ms of every second
    assert budget.take(0.08)
    assert budget.take(0.08)  # some was left: it runs, and the budget goes into debt
    assert not budget.take(0.01)
    now[0] += 0.5  # 50 ms earned back: still in debt (-60 + 50)
    assert not budget.take(0.01)
    now[0] += 1.0  # capped at one second's worth, 100 ms
    assert budget.take(0.05)
    assert budget.take(0.05)
    assert not budget.take(0.05)


def test_a_comparison_costs_the_versions_timed_batch_that_holds_it() -> None:
    timed = SimpleNamespace(batch_seconds={1: 0.004, 2: 0.006, 8: 0.016}, estimate=None)
    assert compute_seconds(timed, 1) == 0.004  # type: ignore[arg-type]
    assert compute_seconds(timed, 3) == 0.016  # type: ignore[arg-type]
    assert compute_seconds(timed, 16) == 0.032  # type: ignore[arg-type]

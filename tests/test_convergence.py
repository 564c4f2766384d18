"""The convergence schedule (vdsmlite.virt.convergence) against the engine's own
migration policies and VDSM's rules for the legacy schedule.

`data/engine-requests/migration_policies.json` holds the policies ovirt-engine
ships (its MigrationPolicies config value); `tests.vm_requests.engine_schedule`
turns one into the ``convergenceSchedule`` the engine sends.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from tests.vm_requests import MIGRATION_POLICIES, engine_schedule, migration_policy
from vdsmlite import errors
from vdsmlite.virt import convergence
from vdsmlite.virt.convergence import ABORT, POSTCOPY, SET_DOWNTIME, Action, Step


@pytest.mark.parametrize("policy", MIGRATION_POLICIES, ids=lambda p: p["name"])
def test_every_engine_policy_is_taken(policy: dict[str, Any]) -> None:
    schedule = convergence.parse(engine_schedule(policy))
    config = policy["config"]
    assert len(schedule.init) == len(config["initialItems"])
    assert len(schedule.stalling) == len(config["convergenceItems"]) + len(config["lastItems"])
    # Every policy ends by giving up.
    assert schedule.stalling[-1] == Step(-1, Action(ABORT))


def test_minimal_downtime_runs_as_vdsm_runs_it() -> None:
    """One stalling action per new pass at most, once more passes than its limit went
    by since the first look; nothing without a new pass."""
    schedule = convergence.parse(engine_schedule(migration_policy("Minimal downtime")))
    assert schedule.init == (Action(SET_DOWNTIME, 100),)
    monitor = convergence.Monitor(schedule)
    looks = [7, 7, 8, 9, 9, 10, 11, 12, 13, 14, 15, 16, 17, 17]
    acted = [(passes, monitor.look(passes)) for passes in looks]
    assert [(p, a.describe()) for p, a in acted if a is not None] == [
        (9, "setDowntime 150"),   # 2 passes > limit 1
        (10, "setDowntime 200"),  # 3 > 2
        (11, "setDowntime 300"),  # 4 > 3
        (12, "setDowntime 400"),  # 5 > 4
        (14, "setDowntime 500"),  # 7 > 6 (at 13: 6, not more than 6)
        (15, "abort"),            # 8 > -1
    ]
    assert monitor.look(30) is None  # nothing left


def test_post_copy_policy_goes_on_to_abort() -> None:
    """vdsmlite does no post-copy: the action is handed out (the migration logs it
    and does nothing, as VDSM when the switch fails) and abort follows."""
    monitor = convergence.Monitor(convergence.parse(engine_schedule(
        migration_policy("Post-copy migration"))))
    names = [a.name for a in map(monitor.look, range(1, 10)) if a is not None]
    assert names == [SET_DOWNTIME, SET_DOWNTIME, POSTCOPY, ABORT]


# VDSM's own checks of its downtime progression (tests/virt/vmmigration_test.py):
# its grid of downtimes and steps, and the properties it asks of every sequence.
GRID = list(itertools.product((100, 500, 10000), (2, 5, 1000)))


@pytest.mark.parametrize(("downtime", "steps"), GRID)
def test_legacy_downtimes_keep_vdsms_properties(downtime: int, steps: int) -> None:
    exp = convergence.exponential_downtimes(downtime, steps)
    delta = max(1, (downtime / steps) / 10.0)
    linear = [max(1, downtime * (i + 1) / steps) for i in range(steps)]  # its reference
    assert len(exp) >= 2
    assert all(a <= b for a, b in itertools.pairwise(exp))
    assert all(d > 0 for d in exp)
    assert abs(exp[0] - linear[0]) <= delta
    assert all(a <= b for a, b in zip(exp[1:], linear[1:], strict=True))
    assert abs(exp[-1] - downtime) <= delta


def test_the_legacy_schedule() -> None:
    """No schedule given: VDSM's 500 ms in 5 steps, held for 42 passes, then abort."""
    schedule = convergence.legacy(None)
    assert schedule.init == (Action(SET_DOWNTIME, 101),)
    assert [(s.limit, s.action.describe()) for s in schedule.stalling] == [
        (1, "setDowntime 104"), (2, "setDowntime 120"), (3, "setDowntime 189"),
        (4, "setDowntime 500"), (42, "setDowntime 500"), (-1, "abort")]
    assert convergence.legacy(2000).stalling[-2].action.downtime == 2000


@pytest.mark.parametrize("bad", [
    [], "fast", {"init": {}}, {"stalling": [{"limit": 1}]},
    {"init": [{"name": "setSpeed", "params": []}]},
    {"init": [{"name": "setDowntime", "params": []}]},
    {"init": [{"name": "setDowntime", "params": ["soon"]}]},
    {"init": [{"name": "setDowntime", "params": ["-5"]}]},
    {"init": [{"name": "abort", "params": "none"}]},
    {"stalling": [{"limit": "x", "action": {"name": "abort", "params": []}}]},
    {"stalling": [{"limit": -2, "action": {"name": "abort", "params": []}}]},
    {"stalling": [{"limit": True, "action": {"name": "abort", "params": []}}]},
    {"stalling": ["abort"]},
])
def test_a_malformed_schedule_is_refused(bad: Any) -> None:
    with pytest.raises(errors.InvalidParameter):
        convergence.parse(bad)


def test_limits_and_downtimes_as_strings_are_taken() -> None:
    """The engine sends downtimes as strings; a limit may come as one too."""
    schedule = convergence.parse({"stalling": [
        {"limit": "3", "action": {"name": "setDowntime", "params": ["250"]}}]})
    assert schedule.stalling == (Step(3, Action(SET_DOWNTIME, 250)),)

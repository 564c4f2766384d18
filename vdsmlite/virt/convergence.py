"""A live migration's convergence schedule (VDSM's ``convergenceSchedule``).

The engine's migration policy says how a migration that does not converge is
helped or given up: ``init`` actions run before the migration starts, and each
``stalling`` item's action runs once the migration has gone through more than
``limit`` passes over the guest's memory (qemu's ``dirty-sync-count``) since the
monitor first saw it, one item at a time, in order. Actions:

* ``setDowntime`` [ms]: how long qemu may stop the guest for the last pass;
* ``abort``: cancel the migration (the VM stays on the source; its status reads
  VDSM's 47 "Migration canceled");
* ``postcopy``: switch to post-copy. vdsmlite does not do post-copy, so this runs as
  VDSM's does when the switch fails: nothing, and the next item comes in turn
  (policies put ``abort`` after it).

The monitor looks every ``[virt] migration_monitor_interval`` seconds (VDSM's
``migration_monitor_interval``, 10) and runs at most one stalling action per look,
as VDSM's monitor thread does. A migration without a schedule (an engine before
4.3, or a client of its own) gets VDSM's legacy one: the downtime raised in
``migration_downtime_steps`` exponential steps up to ``migrationDowntime`` (VDSM's
``migration_downtime``, 500 ms, by default), then abort after 42 more passes.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from vdsmlite import errors

SET_DOWNTIME, ABORT, POSTCOPY = "setDowntime", "abort", "postcopy"
DEFAULT_DOWNTIME = 500  # ms: VDSM's [vars] migration_downtime
DOWNTIME_STEPS = 5  # VDSM's [vars] migration_downtime_steps
LEGACY_LAST_LIMIT = 42  # passes before a legacy schedule gives up (VDSM's)


@dataclass(frozen=True)
class Action:
    name: str  # SET_DOWNTIME, ABORT or POSTCOPY
    downtime: int | None = None  # ms, for SET_DOWNTIME

    def describe(self) -> str:
        return f"{self.name} {self.downtime}" if self.downtime is not None else self.name


@dataclass(frozen=True)
class Step:
    limit: int  # the action runs once more than this many passes went by
    action: Action


@dataclass(frozen=True)
class Schedule:
    init: tuple[Action, ...] = ()
    stalling: tuple[Step, ...] = ()


def parse(value: Any) -> Schedule:
    """VM.migrate's ``convergenceSchedule``; InvalidParameter when it is malformed."""
    if not isinstance(value, dict):
        raise errors.InvalidParameter(f"convergenceSchedule: expected an object, got "
                                      f"{value!r}")
    init, stalling = value.get("init", []), value.get("stalling", [])
    if not isinstance(init, list) or not isinstance(stalling, list):
        raise errors.InvalidParameter("convergenceSchedule: init and stalling are lists")
    steps = []
    for item in stalling:
        if not isinstance(item, dict) or "action" not in item:
            raise errors.InvalidParameter(f"convergenceSchedule.stalling: expected "
                                          f"{{limit, action}}, got {item!r}")
        limit = item.get("limit")
        if isinstance(limit, str) and limit.lstrip("-").isdigit():
            limit = int(limit)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < -1:
            raise errors.InvalidParameter(f"convergenceSchedule.stalling: limit must be an "
                                          f"integer >= -1, got {item.get('limit')!r}")
        steps.append(Step(limit, _action(item["action"])))
    return Schedule(tuple(_action(a) for a in init), tuple(steps))


def _action(value: Any) -> Action:
    if not isinstance(value, dict) or value.get("name") not in (SET_DOWNTIME, ABORT,
                                                                  POSTCOPY):
        raise errors.InvalidParameter(f"convergenceSchedule: expected an action named "
                                      f"setDowntime, abort or postcopy, got {value!r}")
    params = value.get("params", [])
    if not isinstance(params, list):
        raise errors.InvalidParameter(f"convergenceSchedule: params must be a list: "
                                      f"{value!r}")
    if value["name"] != SET_DOWNTIME:
        return Action(value["name"])
    try:
        downtime = int(params[0])
    except (IndexError, TypeError, ValueError):
        raise errors.InvalidParameter(f"convergenceSchedule: setDowntime takes one "
                                      f"number of milliseconds: {value!r}") from None
    if not 0 <= downtime <= 2_000_000:  # qemu's downtime-limit range
        raise errors.InvalidParameter(f"convergenceSchedule: downtime {downtime} ms is "
                                      "outside 0..2000000")
    return Action(SET_DOWNTIME, downtime)


def legacy(max_downtime: int | None) -> Schedule:
    """VDSM's schedule for a migration that brings none: the downtime raised in
    exponential steps up to `max_downtime`, one step per pass, then abort."""
    downtimes = exponential_downtimes(max_downtime or DEFAULT_DOWNTIME, DOWNTIME_STEPS)
    steps = [Step(limit, Action(SET_DOWNTIME, d))
             for limit, d in enumerate(downtimes[1:], start=1)]
    steps.append(Step(LEGACY_LAST_LIMIT, Action(SET_DOWNTIME, downtimes[-1])))
    steps.append(Step(-1, Action(ABORT)))
    return Schedule((Action(SET_DOWNTIME, downtimes[0]),), tuple(steps))


def exponential_downtimes(downtime: int, steps: int) -> list[int]:
    """`steps` downtimes growing exponentially from about downtime/steps to
    `downtime` (VDSM's progression)."""
    if steps <= 1:
        return [downtime]
    offset = downtime / steps
    base = (downtime - offset) ** (1 / (steps - 1))
    return [int(offset + base ** i) for i in range(steps)]


@dataclass
class Monitor:
    """Runs a schedule's stalling items against the passes qemu reports."""

    schedule: Schedule
    _pending: collections.deque[Step] = field(init=False)
    _first: int | None = field(default=None, init=False)
    _last: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._pending = collections.deque(self.schedule.stalling)

    def look(self, passes: int) -> Action | None:
        """One look at the migration, which has made `passes` (qemu's dirty-sync-count)
        so far; the action to run now, if any."""
        if self._first is None:
            # Counted from here: qemu's count may include earlier, cancelled migrations.
            self._first = self._last = passes
            return None
        if passes <= self._last:
            return None
        self._last = passes
        if self._pending and self._pending[0].limit < passes - self._first:
            return self._pending.popleft().action
        return None

"""Every job state change, written down once. Both queues (the Lua scripts of
:mod:`service.jobs.redis_scripts` and :mod:`service.jobs.local_queue`) implement this table, and
``tests/service/test_job_transitions.py`` drives each row through both of them.

A row reads: operation ``op`` on a job in state ``before`` (under ``condition``) answers ``outcome`` and leaves
the job in ``after`` (``None``: unchanged). Terminal states never change again, so a result is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from service.jobs.model import TERMINAL_STATES, JobState

Op = Literal["start", "finish", "cancel", "release", "dead_letter", "fail_queued"]
# What else holds when the operation runs: the delivery's entry is no longer the job's (it was handed back and
# re-added), the worker handing back no longer owns the job, cancellation was requested, the deadline passed.
Condition = Literal["", "stale_entry", "not_owner", "cancel_requested", "deadline_passed"]

# Where a job handed back by a draining worker goes: behind every job already waiting for its variant.
REQUEUE_END: Literal["tail"] = "tail"


@dataclass(frozen=True)
class Transition:
    op: Op
    before: JobState
    outcome: str
    after: JobState | None
    condition: Condition = ""


Q, R = JobState.QUEUED, JobState.RUNNING
_T = sorted(TERMINAL_STATES, key=lambda s: s.value)

TRANSITIONS: tuple[Transition, ...] = (
    # a worker starts its delivery
    Transition("start", Q, "started", R),
    Transition("start", R, "started", R),  # redelivered after its worker died: attempt n + 1
    Transition("start", Q, "stale", None, "stale_entry"),
    Transition("start", Q, "expired", JobState.EXPIRED, "deadline_passed"),
    Transition("start", R, "canceled", JobState.CANCELED, "cancel_requested"),
    *(Transition("start", t, "terminal", None) for t in _T),
    # a worker writes the result (succeeded here; failed, canceled and expired take the same path)
    Transition("finish", Q, "written", JobState.SUCCEEDED),
    Transition("finish", R, "written", JobState.SUCCEEDED),
    *(Transition("finish", t, "unchanged", None) for t in _T),
    # a client cancels
    Transition("cancel", Q, "canceled", JobState.CANCELED),
    Transition("cancel", R, "cancel_requested", None),
    *(Transition("cancel", t, "terminal", None) for t in _T),
    # a draining worker hands its delivery back (to the REQUEUE_END of the variant's queue)
    Transition("release", R, "requeued", Q),
    Transition("release", Q, "requeued", Q),  # read but not started yet
    Transition("release", R, "not_owner", None, "not_owner"),  # another worker reclaimed it meanwhile
    Transition("release", R, "stale", None, "stale_entry"),
    *(Transition("release", t, "terminal", None) for t in _T),
    # a job whose workers kept dying
    Transition("dead_letter", Q, "written", JobState.FAILED),
    Transition("dead_letter", R, "written", JobState.FAILED),
    *(Transition("dead_letter", t, "unchanged", None) for t in _T),
    # nobody serves the variant: only waiting jobs fail
    Transition("fail_queued", Q, "written", JobState.FAILED),
    Transition("fail_queued", R, "unchanged", None),
    *(Transition("fail_queued", t, "unchanged", None) for t in _T),
)

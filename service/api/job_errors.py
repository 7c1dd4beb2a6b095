"""What can go wrong with a job request, in the API's own terms: the job service raises these, and only the
HTTP layer (:mod:`service.api.job_error_http`) turns them into status codes and error envelopes.

The queue's and registry's own errors (:class:`~service.jobs.queue.QueueUnavailableError`,
:class:`~service.jobs.queue.IdempotencyConflictError`, :class:`~service.registry.UnknownModelError`) pass
through unchanged.
"""

from __future__ import annotations


class JobRequestError(Exception):
    """Base class: the request cannot be served as it is."""


class InvalidField(JobRequestError):
    """One field breaks a rule that depends on the settings or the model (a limit, a size rule)."""

    def __init__(self, field: str, message: str, kind: str = "value_error") -> None:
        self.field, self.message, self.kind = field, message, kind
        super().__init__(f"{field}: {message}")


class JobNotFound(JobRequestError):
    """No such job: never submitted, or its result expired."""

    def __init__(self, job_id: str, message: str) -> None:
        self.job_id = job_id
        super().__init__(message)


class QueueBusy(JobRequestError):
    """The queue (or the variant's share of it) is full; try again in about ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class BadEventId(JobRequestError):
    """A ``Last-Event-ID`` that is not an event id of this queue."""

    def __init__(self, value: str) -> None:
        self.value = value
        super().__init__(
            f"Last-Event-ID {value[:80]!r} is not an event id of this job (use the id of an event this stream sent)"
        )

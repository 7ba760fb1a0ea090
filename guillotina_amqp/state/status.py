class TaskStatus:
    """The statuses a task goes through (docs/design.md#state-in-redis)."""

    SCHEDULED = "scheduled"
    CANCELED = "canceled"
    RUNNING = "running"
    FINISHED = "finished"
    ERRORED = "errored"


#: Statuses `TaskState.join()` stops at.
FINAL_STATUSES = frozenset({TaskStatus.FINISHED, TaskStatus.ERRORED, TaskStatus.CANCELED})

#: Statuses after which a delivery of the same task is acked and skipped.
DONE_STATUSES = frozenset({TaskStatus.FINISHED, TaskStatus.CANCELED})

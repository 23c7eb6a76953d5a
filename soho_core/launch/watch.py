"""Create a PyTorchJob, follow it to the end, and never let a failure look like success.

    from soho_core.launch.watch import run_job
    run_job(api, body, timeout_s=86400)      # api: kubernetes.client.CustomObjectsApi()

:func:`run_job` creates the job (adopting one of the same name left by an earlier try of
the same pipeline step), then polls its status and prints every change of state (the
step's log in the Kubeflow UI). It returns when the job's ``Succeeded`` condition is
true and raises :class:`JobFailed` on ``Failed``, :class:`JobTimeout` past the deadline,
:class:`JobVanished` when the job is deleted under it, and :class:`JobCancelled` when the
step is cancelled (SIGTERM, as Kubeflow sends on cancel, or Ctrl-C). On timeout and
cancel the job is deleted, so no GPU keeps training for a run nobody waits for.

Only four ``CustomObjectsApi`` methods are used (create, get, delete of a namespaced
custom object), which is also the surface the tests fake.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from soho_core.launch.pytorchjob import GROUP, PLURAL, VERSION


class JobError(RuntimeError):
    """The job did not succeed; the message names the job and why."""


class JobFailed(JobError):
    pass


class JobTimeout(JobError):
    pass


class JobVanished(JobError):
    pass


class JobCancelled(JobError):
    pass


@dataclass(frozen=True)
class JobState:
    """The job's state as the operator reports it: the latest true condition (``Created``,
    ``Running``, ``Restarting``, ``Succeeded``, ``Failed``, ``Suspended``) and its message."""

    phase: str
    reason: str = ""
    message: str = ""
    replicas: str = ""  # e.g. "Master: 1 active; Worker: 1 active, 1 failed"

    @property
    def done(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


def job_state(obj: dict[str, Any]) -> JobState:
    """Read the state from a PyTorchJob object. A terminal condition wins over any later one
    (the operator may append e.g. ``Running=False`` after ``Succeeded``)."""
    status = obj.get("status") or {}
    true = [c for c in status.get("conditions") or [] if str(c.get("status")) == "True"]
    terminal = [c for c in true if c.get("type") in ("Succeeded", "Failed")]
    cond = (terminal or true or [{}])[-1]
    parts = []
    for role, counts in sorted((status.get("replicaStatuses") or {}).items()):
        bits = [f"{counts[k]} {k}" for k in ("active", "succeeded", "failed") if counts.get(k)]
        parts.append(f"{role}: {', '.join(bits) or 'pending'}")
    return JobState(phase=cond.get("type", "Pending"), reason=cond.get("reason", ""),
                    message=cond.get("message", ""), replicas="; ".join(parts))


def _status_code(err: Exception) -> int | None:
    return getattr(err, "status", None)


def create_or_adopt(api, body: dict[str, Any], log: Callable[[str], None] = print) -> None:
    """Create the job; if one of the same name exists (409), adopt it: the step was retried and
    the training resumes from its own checkpoints, so starting a second copy would only compete."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
        log(f"created PyTorchJob {ns}/{name}")
    except Exception as err:  # kubernetes.client.ApiException carries .status
        if _status_code(err) != 409:
            raise
        log(f"PyTorchJob {ns}/{name} already exists: following it (a retried step)")


def delete_job(api, namespace: str, name: str, log: Callable[[str], None] = print) -> None:
    """Delete the job and its pods (foreground propagation); an already missing job is fine."""
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                            body={"propagationPolicy": "Foreground"})
        log(f"deleted PyTorchJob {namespace}/{name}")
    except Exception as err:
        if _status_code(err) != 404:
            raise


def watch_job(api, namespace: str, name: str, timeout_s: float, poll_s: float = 10.0,
              log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep) -> JobState:
    """Poll until the job ends; log each change of state. Returns the ``Succeeded`` state,
    raises :class:`JobFailed`, :class:`JobTimeout` or :class:`JobVanished` (the job is left
    as it is: :func:`run_job` decides what to delete)."""
    deadline = clock() + timeout_s
    last: JobState | None = None
    while True:
        try:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except Exception as err:
            if _status_code(err) == 404:
                raise JobVanished(f"PyTorchJob {namespace}/{name} disappeared while running "
                                  f"(last state: {last.phase if last else 'never seen'}); it was deleted "
                                  f"outside this step") from err
            raise
        state = job_state(obj)
        if state != last:
            detail = "  ".join(x for x in (state.replicas, state.reason, state.message) if x)
            log(f"PyTorchJob {namespace}/{name}: {state.phase}" + (f"  ({detail})" if detail else ""))
            last = state
        if state.phase == "Succeeded":
            return state
        if state.phase == "Failed":
            raise JobFailed(f"PyTorchJob {namespace}/{name} failed: {state.reason or '-'}: "
                            f"{state.message or 'no message'} ({state.replicas or 'no replica status'})")
        if clock() >= deadline:
            raise JobTimeout(f"PyTorchJob {namespace}/{name} did not finish within {timeout_s:.0f} s "
                             f"(last state: {state.phase})")
        sleep(min(poll_s, max(0.0, deadline - clock())))


@contextlib.contextmanager
def _sigterm_as_cancel():
    """Turn SIGTERM (Kubeflow's cancel, a pod's termination) into :class:`JobCancelled` in the
    main thread, so the cleanup below runs; a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise JobCancelled(f"received signal {signum}: the step was cancelled")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_job(api, body: dict[str, Any], timeout_s: float, poll_s: float = 10.0,
            log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep) -> JobState:
    """Create (or adopt) the job and follow it to ``Succeeded``; see the module docstring.

    A failed job is kept for its logs (the operator's TTL removes it); a timed-out or
    cancelled one is deleted. Every non-success raises a :class:`JobError`.
    """
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    with _sigterm_as_cancel():
        create_or_adopt(api, body, log)
        try:
            return watch_job(api, ns, name, timeout_s, poll_s, log, clock, sleep)
        except (JobTimeout, JobCancelled, KeyboardInterrupt):
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not stop the cleanup
            delete_job(api, ns, name, log)
            raise

"""Create a training job (a PyTorchJob or a Trainer v2 TrainJob), follow it to the end, and
never let a failure look like success.

    from soho_core.launch.watch import run_job
    run_job(api, body, timeout_s=86400)      # api: kubernetes.client.CustomObjectsApi()

:func:`run_job` creates the job (adopting one of the same name left by an earlier try of
the same pipeline step), then polls its status and prints every change of state (the
step's log in the Kubeflow UI). It returns when the job's ``Succeeded`` condition (a TrainJob's
``Complete``) is true and raises :class:`JobFailed` on ``Failed``, :class:`JobTimeout` past the deadline,
:class:`JobVanished` when the job is deleted under it, and :class:`JobCancelled` when the
step is cancelled (SIGTERM, as Kubeflow sends on cancel, or Ctrl-C). On timeout and
cancel the job is deleted, so no GPU keeps training for a run nobody waits for;
:func:`delete_if_running` does the same for the pipeline's exit handler when the step died
before it could.

Only three ``CustomObjectsApi`` methods are used (create, get, delete of a namespaced
custom object), and with a ``CoreV1Api`` one or two more, ``read_namespaced_pod_log`` (and for
a TrainJob, whose pod names the JobSet controller makes up, ``list_namespaced_pod``): the first
node's new log lines are copied into the step's log at every poll (:class:`PodLogFollower`).
That is also the surface the tests fake.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from soho_core.launch import pytorchjob, trainjob

# kind -> (group, version, plural) of every job kind the launcher creates
RESOURCES = {pytorchjob.KIND: (pytorchjob.GROUP, pytorchjob.VERSION, pytorchjob.PLURAL),
             trainjob.KIND: (trainjob.GROUP, trainjob.VERSION, trainjob.PLURAL)}


LAUNCHER_ROLE = "soho-pytorchjob-launcher"  # manifests/base/rbac.yaml: what the launcher needs, nothing more


def resource(kind: str) -> tuple[str, str, str]:
    """(group, version, plural) of a job kind; an unknown kind is a ValueError naming the valid ones."""
    if kind not in RESOURCES:
        raise ValueError(f"cannot launch a {kind!r}: valid kinds are {', '.join(RESOURCES)}")
    return RESOURCES[kind]


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
    ``Running``, ``Restarting``, ``Succeeded``, ``Failed``, ``Suspended``) and its message. A
    TrainJob's ``Complete`` reads as ``Succeeded``, and it is ``Running`` while a child job is
    active (Trainer v2 has no Running condition)."""

    phase: str
    reason: str = ""
    message: str = ""
    replicas: str = ""  # e.g. "Master: 1 active; Worker: 1 active, 1 failed"

    @property
    def done(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


def job_state(obj: dict[str, Any]) -> JobState:
    """Read the state from a PyTorchJob or TrainJob object. A terminal condition wins over any
    later one (the operator may append e.g. ``Running=False`` after ``Succeeded``)."""
    status = obj.get("status") or {}
    rename = {"Complete": "Succeeded"} if obj.get("kind") == trainjob.KIND else {}
    true = [dict(c, type=rename.get(c.get("type"), c.get("type")))
            for c in status.get("conditions") or [] if str(c.get("status")) == "True"]
    terminal = [c for c in true if c.get("type") in ("Succeeded", "Failed")]
    cond = (terminal or true or [{}])[-1]
    parts = []
    for role, counts in sorted((status.get("replicaStatuses") or {}).items()):
        bits = [f"{counts[k]} {k}" for k in ("active", "succeeded", "failed") if counts.get(k)]
        parts.append(f"{role}: {', '.join(bits) or 'pending'}")
    jobs = status.get("jobsStatus") or []
    for counts in jobs:
        bits = [f"{counts[k]} {k}" for k in ("active", "ready", "succeeded", "failed", "suspended")
                if counts.get(k)]
        parts.append(f"{counts.get('name', '?')}: {', '.join(bits) or 'pending'}")
    phase = cond.get("type", "Pending")
    if not terminal and phase in ("Pending", "Created") and any(j.get("active") for j in jobs):
        phase = "Running"
    return JobState(phase=phase, reason=cond.get("reason", ""), message=cond.get("message", ""),
                    replicas="; ".join(parts))


def _status_code(err: Exception) -> int | None:
    return getattr(err, "status", None)


def create_or_adopt(api, body: dict[str, Any], log: Callable[[str], None] = print,
                    sleep: Callable[[float], None] = time.sleep, gone_timeout_s: float = 300.0) -> None:
    """Create the job; if one of the same name exists (409), adopt it: the step was retried and
    the training resumes from its own checkpoints, so starting a second copy would only compete.
    A job that already failed is not adopted (following it would fail the retry at once): it is
    deleted, and the job created again resumes from the latest checkpoint under the same --out."""
    ns, name, kind = body["metadata"]["namespace"], body["metadata"]["name"], body["kind"]
    group, version, plural = resource(kind)
    for attempt in range(2):
        try:
            api.create_namespaced_custom_object(group, version, ns, plural, body)
            log(f"created {kind} {ns}/{name}")
            return
        except Exception as err:  # kubernetes.client.ApiException carries .status
            if _status_code(err) == 403:
                raise JobError(
                    f"not allowed to create {kind} {ns}/{name} ({plural}.{group}): bind the Role {LAUNCHER_ROLE} "
                    f"(manifests/base/rbac.yaml) in namespace {ns} to the service account this step runs as, e.g. "
                    f"kubectl -n {ns} create rolebinding soho-kfp-runner --role={LAUNCHER_ROLE} "
                    f"--serviceaccount=NAMESPACE:ACCOUNT") from err
            if _status_code(err) != 409:
                raise
        existing = _get(api, group, version, ns, plural, name)
        if attempt == 0 and existing is not None and job_state(existing).phase == "Failed":
            log(f"{kind} {ns}/{name} exists and has failed: deleting it to start again from its latest checkpoint")
            delete_job(api, ns, name, log, kind=kind)
            _wait_gone(api, group, version, ns, plural, name, gone_timeout_s, sleep)
            continue
        log(f"{kind} {ns}/{name} already exists: following it (a retried step)")
        return


def _get(api, group: str, version: str, ns: str, plural: str, name: str) -> dict | None:
    try:
        return api.get_namespaced_custom_object(group, version, ns, plural, name)
    except Exception as err:
        if _status_code(err) == 404:
            return None
        raise


def _wait_gone(api, group: str, version: str, ns: str, plural: str, name: str, timeout_s: float,
               sleep: Callable[[float], None], poll_s: float = 1.0) -> None:
    """Wait until a deleted job is gone (foreground deletion removes its pods first)."""
    for _ in range(max(1, int(timeout_s / poll_s))):
        if _get(api, group, version, ns, plural, name) is None:
            return
        sleep(poll_s)
    raise JobError(f"{plural}.{group} {ns}/{name} was deleted but is still there after {timeout_s:.0f} s")


def delete_job(api, namespace: str, name: str, log: Callable[[str], None] = print,
               kind: str = pytorchjob.KIND) -> None:
    """Delete the job and its pods (foreground propagation); an already missing job is fine."""
    group, version, plural = resource(kind)
    try:
        api.delete_namespaced_custom_object(group, version, namespace, plural, name,
                                            body={"propagationPolicy": "Foreground"})
        log(f"deleted {kind} {namespace}/{name}")
    except Exception as err:
        if _status_code(err) != 404:
            raise


def delete_if_running(api, namespace: str, name: str, log: Callable[[str], None] = print,
                      kind: str = pytorchjob.KIND) -> bool:
    """Delete the job unless it is gone or has ended (a failed job is kept for its logs; the
    operator's TTL removes it). Returns whether it was deleted: the pipeline's exit handler's
    clean-up when the step that watched the job died without deleting it."""
    group, version, plural = resource(kind)
    obj = _get(api, group, version, namespace, plural, name)
    if obj is None:
        return False
    state = job_state(obj)
    if state.done:
        log(f"{kind} {namespace}/{name} has ended ({state.phase}): kept")
        return False
    delete_job(api, namespace, name, log, kind=kind)
    return True


class PodLogFollower:
    """Copies a pod's new log lines into the step's log, one poll at a time.

    Each poll asks for the lines of the last ``window_s`` seconds with their timestamps and
    prints those newer than the last one printed, so a line is printed once even though
    windows overlap. A pod not there yet (or between restarts) is skipped quietly; any other
    error is reported once and log following stops, never the watch."""

    def __init__(self, core_api, namespace: str, pod: str = "", log: Callable[[str], None] = print,
                 selector: str = ""):
        """Follow the pod named ``pod``, or (``selector``) the first pod with those labels, looked
        up again whenever it is gone (a restarted pod gets a new name)."""
        self.api, self.namespace, self.pod, self.log = core_api, namespace, pod, log
        self.selector = selector
        self.last = ""  # RFC 3339 timestamp of the last line printed (they sort as strings)
        self.seen_at_last: set[str] = set()
        self.enabled = True

    def poll(self, window_s: float) -> None:
        if not self.enabled:
            return
        if self.selector and not self.pod:
            try:
                pods = self.api.list_namespaced_pod(self.namespace, label_selector=self.selector).items
            except Exception as err:
                self.log(f"cannot list the pods {self.selector!r} in {self.namespace} ({err}); following the "
                         f"job's state only")
                self.enabled = False
                return
            if not pods:
                return  # not created yet
            self.pod = sorted(p.metadata.name for p in pods)[0]
        try:
            text = self.api.read_namespaced_pod_log(self.pod, self.namespace, timestamps=True,
                                                    since_seconds=max(1, int(window_s) + 1))
        except Exception as err:
            if _status_code(err) in (400, 404):  # not scheduled yet, or the container is starting
                if self.selector and _status_code(err) == 404:
                    self.pod = ""  # gone: look the pod up again next time
                return
            self.log(f"cannot read the logs of pod {self.namespace}/{self.pod} ({err}); following the job's "
                     f"state only")
            self.enabled = False
            return
        for line in (text or "").splitlines():
            stamp, _, message = line.partition(" ")
            if stamp < self.last or (stamp == self.last and message in self.seen_at_last):
                continue
            if stamp > self.last:
                self.last, self.seen_at_last = stamp, set()
            self.seen_at_last.add(message)
            self.log(f"[{self.pod}] {message}")


def master_pod(job_name: str) -> str:
    """The training operator's name for the Master replica's pod."""
    return f"{job_name}-master-0"


def first_node_selector(job_name: str) -> str:
    """Labels of a TrainJob's first node pod (JobSet's labels on the runtime's ``node`` job)."""
    return (f"jobset.sigs.k8s.io/jobset-name={job_name},jobset.sigs.k8s.io/replicatedjob-name={trainjob.NODE},"
            f"jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0")


def watch_job(api, namespace: str, name: str, timeout_s: float, poll_s: float = 10.0,
              log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep, logs: PodLogFollower | None = None,
              kind: str = pytorchjob.KIND) -> JobState:
    """Poll until the job ends; log each change of state (and, with ``logs``, the Master's new
    log lines). Returns the ``Succeeded`` state, raises :class:`JobFailed`, :class:`JobTimeout`
    or :class:`JobVanished` (the job is left as it is: :func:`run_job` decides what to delete)."""
    group, version, plural = resource(kind)
    deadline = clock() + timeout_s
    last: JobState | None = None
    last_poll = clock()
    while True:
        if logs is not None:
            # The window since the previous poll, with slack: a slow poll must not lose lines.
            logs.poll(clock() - last_poll + poll_s)
            last_poll = clock()
        try:
            obj = api.get_namespaced_custom_object(group, version, namespace, plural, name)
        except Exception as err:
            if _status_code(err) == 404:
                raise JobVanished(f"{kind} {namespace}/{name} disappeared while running "
                                  f"(last state: {last.phase if last else 'never seen'}); it was deleted "
                                  f"outside this step") from err
            raise
        state = job_state(obj)
        if state != last:
            detail = "  ".join(x for x in (state.replicas, state.reason, state.message) if x)
            log(f"{kind} {namespace}/{name}: {state.phase}" + (f"  ({detail})" if detail else ""))
            last = state
        if state.done and logs is not None:
            logs.poll(clock() - last_poll + poll_s)  # the last lines before the end
        if state.phase == "Succeeded":
            return state
        if state.phase == "Failed":
            raise JobFailed(f"{kind} {namespace}/{name} failed: {state.reason or '-'}: "
                            f"{state.message or 'no message'} ({state.replicas or 'no replica status'})")
        if clock() >= deadline:
            raise JobTimeout(f"{kind} {namespace}/{name} did not finish within {timeout_s:.0f} s "
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
            sleep: Callable[[float], None] = time.sleep, core_api=None) -> JobState:
    """Create (or adopt) the job and follow it to ``Succeeded``; see the module docstring.
    With ``core_api`` (a ``CoreV1Api``) the Master pod's log is copied into this one.

    A failed job is kept for its logs (the operator's TTL removes it); a timed-out or
    cancelled one is deleted. Every non-success raises a :class:`JobError`.
    """
    ns, name, kind = body["metadata"]["namespace"], body["metadata"]["name"], body["kind"]
    resource(kind)  # an unknown kind fails here, before anything is created
    logs = None
    if core_api is not None:
        logs = (PodLogFollower(core_api, ns, selector=first_node_selector(name), log=log) if kind == trainjob.KIND
                else PodLogFollower(core_api, ns, master_pod(name), log))
    with _sigterm_as_cancel():
        create_or_adopt(api, body, log, sleep=sleep)
        try:
            return watch_job(api, ns, name, timeout_s, poll_s, log, clock, sleep, logs=logs, kind=kind)
        except (JobTimeout, JobCancelled, KeyboardInterrupt):
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not stop the cleanup
            delete_job(api, ns, name, log, kind=kind)
            raise

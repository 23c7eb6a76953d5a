"""The launcher against a Kubernetes API over real HTTP: kmock's in-memory API server on loopback,
the real ``kubernetes`` client, and a stand-in controller that patches the job's status through
the same API, as the training operator (or Trainer) would. No call is faked in-process."""

import asyncio
import os
import signal
import threading
import time

import kmock
import pytest
from kubernetes import client

from soho_core.launch import soho_args
from soho_core.launch.pytorchjob import JobSpec, build_pytorchjob
from soho_core.launch.trainjob import build_trainjob
from soho_core.launch.watch import (LAUNCHER_ROLE, JobCancelled, JobError, JobFailed, JobTimeout, master_pod,
                                    resource, run_job)

NS = "team-a"


class ApiServer:
    """kmock's KubernetesEmulator and its HTTP server, on their own event loop in a thread."""

    def __init__(self):
        self.controllers: list[threading.Thread] = []  # joined before the server stops
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._thread.start()
        assert self._ready.wait(20), "the API server did not start"

    async def _serve(self):
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            self.emulator, self.url = emulator, str(server.url).rstrip("/")
            for kind, (group, version, plural) in (("PyTorchJob", resource("PyTorchJob")),
                                                   ("TrainJob", resource("TrainJob"))):
                emulator.resources[f"{group}/{version}/{plural}"] = kmock.ResourceInfo(kind=kind, namespaced=True)
            self._ready.set()
            await self._stop.wait()

    def close(self):
        for controller in self.controllers:
            controller.join(20)
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def api_server():
    server = ApiServer()
    yield server
    server.close()


def clients(server: ApiServer):
    config = client.Configuration()
    config.host = server.url
    api = client.ApiClient(config)
    return client.CustomObjectsApi(api), client.CoreV1Api(api)


def cond(kind, reason="", message=""):
    return {"type": kind, "status": "True", "reason": reason or kind, "message": message,
            "lastTransitionTime": "2026-11-30T10:00:00Z"}


class Controller(threading.Thread):
    """Plays the operator: once the job exists, patches its status (through the HTTP API) to each
    of ``script`` in turn, ``every`` seconds apart."""

    def __init__(self, server, body, script, every=0.15):
        super().__init__(daemon=True)
        self.custom, _ = clients(server)
        self.body, self.script, self.every = body, script, every
        self.group, self.version, self.plural = resource(body["kind"])
        server.controllers.append(self)

    def run(self):
        name = self.body["metadata"]["name"]
        for _ in range(200):
            try:
                self.custom.get_namespaced_custom_object(self.group, self.version, NS, self.plural, name)
                break
            except client.ApiException:
                time.sleep(0.02)
        for status in self.script:
            time.sleep(self.every)
            try:
                self.custom.patch_namespaced_custom_object_status(self.group, self.version, NS, self.plural, name,
                                                                  {"status": status})
            except client.ApiException:
                return  # deleted under it


def _spec(**kw):
    base = dict(name="soho-pretrain-run1", namespace=NS, image="ghcr.io/soho-kubeflow/soho:0.1.0",
                soho_args=soho_args("pretrain", "tiny", "s3://soho/shards/x", "s3://soho/runs/run1/pretrain"),
                nodes=2)
    base.update(kw)
    return JobSpec(**base)


PYTORCHJOB_SCRIPT = [
    {"conditions": [cond("Created")]},
    {"conditions": [cond("Created"), cond("Running")],
     "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 1}}},
    {"conditions": [cond("Created"), cond("Succeeded", "PyTorchJobSucceeded")],
     "replicaStatuses": {"Master": {"succeeded": 1}, "Worker": {"succeeded": 1}}},
]


def _stored(custom, body) -> dict | None:
    """The job as the API server holds it, or None once it answers 404."""
    group, version, plural = resource(body["kind"])
    try:
        return custom.get_namespaced_custom_object(group, version, NS, plural, body["metadata"]["name"])
    except client.ApiException as err:
        assert err.status == 404
        return None


def test_pytorchjob_created_followed_to_success_with_the_masters_log(api_server):
    custom, core = clients(api_server)
    body = build_pytorchjob(_spec())
    pod = master_pod(body["metadata"]["name"])
    api_server.emulator[f"get /api/v1/namespaces/{NS}/pods/{pod}/log"] << (
        b"2026-11-30T10:00:01.000000000Z step 10  loss 3.2\n2026-11-30T10:00:02.000000000Z step 20  loss 2.9\n")
    Controller(api_server, body, PYTORCHJOB_SCRIPT).start()
    lines = []
    state = run_job(custom, body, timeout_s=30, poll_s=0.05, log=lines.append, core_api=core)
    assert state.phase == "Succeeded"
    assert lines[0] == f"created PyTorchJob {NS}/soho-pretrain-run1"
    phases = [line.split(": ")[1].split()[0] for line in lines if line.startswith("PyTorchJob ")]
    assert [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]][-3:] == ["Created", "Running",
                                                                                      "Succeeded"]
    assert f"[{pod}] step 10  loss 3.2" in lines and f"[{pod}] step 20  loss 2.9" in lines
    assert lines.count(f"[{pod}] step 20  loss 2.9") == 1  # overlapping windows print a line once
    stored = _stored(custom, body)  # a finished job is left to the operator's TTL
    assert stored["spec"] == body["spec"]  # what went over the wire is the launcher's object


def test_a_failed_pytorchjob_fails_the_step_and_is_kept(api_server):
    custom, core = clients(api_server)
    body = build_pytorchjob(_spec())
    Controller(api_server, body, [{"conditions": [cond("Created")]},
                                  {"conditions": [cond("Created"), cond("Failed", "PyTorchJobFailed",
                                                                        "worker-0 exited with code 1")]}]).start()
    with pytest.raises(JobFailed, match="PyTorchJobFailed: worker-0 exited with code 1"):
        run_job(custom, body, timeout_s=30, poll_s=0.05, log=lambda _: None, core_api=core)
    assert _stored(custom, body) is not None


def test_a_retried_step_adopts_the_job_already_there(api_server):
    custom, _ = clients(api_server)
    body = build_pytorchjob(_spec())
    custom.create_namespaced_custom_object(*resource("PyTorchJob")[:2], NS, "pytorchjobs", body)
    Controller(api_server, body, PYTORCHJOB_SCRIPT).start()
    lines = []
    assert run_job(custom, body, timeout_s=30, poll_s=0.05, log=lines.append).phase == "Succeeded"
    assert lines[0] == f"PyTorchJob {NS}/soho-pretrain-run1 already exists: following it (a retried step)"


def test_a_retried_step_replaces_a_job_that_already_failed(api_server):
    """Following a failed job would fail the retry at once: it is deleted and created again (the
    training resumes from its latest checkpoint under the same --out)."""
    custom, _ = clients(api_server)
    body = build_pytorchjob(_spec())
    group, version, plural = resource("PyTorchJob")
    earlier = {**body, "metadata": {**body["metadata"], "labels": {**body["metadata"]["labels"], "try": "1"}}}
    custom.create_namespaced_custom_object(group, version, NS, plural, earlier)
    custom.patch_namespaced_custom_object_status(group, version, NS, plural, body["metadata"]["name"], {
        "status": {"conditions": [cond("Created"), cond("Failed", "PyTorchJobFailed", "backoff limit")]}})
    Controller(api_server, body, PYTORCHJOB_SCRIPT).start()
    lines = []
    assert run_job(custom, body, timeout_s=30, poll_s=0.05, log=lines.append).phase == "Succeeded"
    assert lines[:3] == [
        f"PyTorchJob {NS}/soho-pretrain-run1 exists and has failed: deleting it to start again from its latest "
        "checkpoint", f"deleted PyTorchJob {NS}/soho-pretrain-run1", f"created PyTorchJob {NS}/soho-pretrain-run1"]
    assert "try" not in _stored(custom, body)["metadata"]["labels"], "a new job, not the failed one"


def test_timeout_deletes_the_job(api_server):
    custom, _ = clients(api_server)
    body = build_pytorchjob(_spec())
    Controller(api_server, body, PYTORCHJOB_SCRIPT[:2]).start()
    with pytest.raises(JobTimeout, match="did not finish within 1 s"):
        run_job(custom, body, timeout_s=1, poll_s=0.05, log=lambda _: None)
    assert _stored(custom, body) is None  # 404 now


def test_cancel_by_sigterm_deletes_the_job(api_server):
    custom, _ = clients(api_server)
    body = build_pytorchjob(_spec())
    Controller(api_server, body, PYTORCHJOB_SCRIPT[:2]).start()
    timer = threading.Timer(0.6, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(JobCancelled):
            run_job(custom, body, timeout_s=30, poll_s=0.05, log=lambda _: None)
    finally:
        timer.cancel()
    assert _stored(custom, body) is None


def test_missing_rbac_names_the_role_to_bind(api_server):
    custom, _ = clients(api_server)
    body = build_pytorchjob(_spec())
    api_server.emulator[f"post /apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"] << kmock.KubernetesError(
        status=403, reason="Forbidden", message='pytorchjobs.kubeflow.org is forbidden: User '
                                                '"system:serviceaccount:kubeflow:pipeline-runner" cannot create')
    lines = []
    with pytest.raises(JobError, match=f"bind the Role {LAUNCHER_ROLE}") as err:
        run_job(custom, body, timeout_s=30, poll_s=0.05, log=lines.append)
    assert f"kubectl -n {NS} create rolebinding" in str(err.value) and "pytorchjobs.kubeflow.org" in str(err.value)
    assert not lines  # nothing was followed


def test_trainjob_over_http_complete_and_timeout(api_server):
    custom, _ = clients(api_server)
    body = build_trainjob(_spec())
    Controller(api_server, body, [
        {"conditions": [cond("Created")], "jobsStatus": [{"name": "node", "active": 2, "ready": 2}]},
        {"conditions": [cond("Created"), cond("Complete", "JobsCompleted")],
         "jobsStatus": [{"name": "node", "succeeded": 2}]},
    ]).start()
    lines = []
    assert run_job(custom, body, timeout_s=30, poll_s=0.05, log=lines.append).phase == "Succeeded"
    assert any(line.startswith(f"TrainJob {NS}/soho-pretrain-run1: Running") for line in lines)
    other = build_trainjob(_spec(name="soho-pretrain-run2"))
    with pytest.raises(JobTimeout):
        run_job(custom, other, timeout_s=0.5, poll_s=0.05, log=lambda _: None)
    assert _stored(custom, other) is None

"""The Kubeflow pipeline: it compiles with no credential in the YAML, to the reviewed
pipelines/soho.yaml; its DAG has the promised shape (fan-out, caching, retries, secrets,
resources, typed artifacts pointing into the store, the pipeline root), its arguments are
checked before work, the report reads what training and evaluation write, and the whole DAG
runs on this machine under kfp.local."""

import builtins
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from soho_core import __version__
from soho_core.pipeline import runner, steps
from soho_core.report import write_report
from test_readers import coco, vqa  # noqa: F401  (fixtures: small official-format trees)

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID0123456", "AWS_SECRET_ACCESS_KEY": "fake/secret+Key0123456789",
                    "WANDB_API_KEY": "0123456789abcdef0123456789abcdeffakewandb"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    for k, v in FAKE_CREDENTIALS.items():
        mp.setenv(k, v)
    out = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    from soho_core.cli import main

    assert main(["pipeline", "compile", "--out", str(out)]) == 0
    mp.undo()
    text = out.read_text()
    spec, platform = yaml.safe_load_all(text)
    return text, spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_compiled_yaml_holds_no_credential(compiled):
    text = compiled[0]
    for name, value in FAKE_CREDENTIALS.items():
        assert value not in text, f"the value of {name} leaked into the compiled pipeline"


def _pulled(spec, platform) -> set:
    """(image, pull policy, pull Secrets) of every step, and what the pre-training steps hand their job."""
    found = set()
    for label, executor in spec["deploymentSpec"]["executors"].items():
        k8s = platform.get(label, {})
        found.add((executor["container"]["image"], k8s.get("imagePullPolicy"),
                   tuple(s["secretName"] for s in k8s.get("imagePullSecret", []))))
    tasks = _tasks(spec)
    for task in tasks["pretrain"] + tasks["pretrain-2"]:
        given = {k: v["runtimeValue"]["constant"] for k, v in task["inputs"]["parameters"].items()
                 if k.startswith("image")}
        found.add((given["image"], given["image_pull_policy"], (given["image_pull_secret"],)))
    return found


def test_every_step_runs_the_versioned_image(compiled):
    _, spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    names = {k.removeprefix("exec-") for k in executors}
    assert {"data", "shard", "pretrain", "finetune", "evaluate", "report"} <= names
    image = f"ghcr.io/soho-kubeflow/soho:{__version__}"
    assert _pulled(spec, platform) == {(image, "IfNotPresent", ()), (image, "IfNotPresent", ("",))}


def test_a_digest_is_accepted_as_the_image_with_a_pull_policy_and_secret(tmp_path, capsys):
    """One setting names the image by digest; it, the pull policy and the pull Secret's name reach
    every step and the job the pre-training step creates. A reference without a tag or digest, or
    with a malformed digest, is refused."""
    from soho_core.cli import main

    image = "registry.example.com:5000/ml/soho@sha256:" + "0123456789abcdef" * 4
    out = tmp_path / "pipeline.yaml"
    assert main(["pipeline", "compile", "--out", str(out), "--image", image, "--image-pull-policy", "Always",
                 "--image-pull-secret", "regcred"]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    assert _pulled(spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]) == {
        (image, "Always", ("regcred",))}
    for bad, why in (("ghcr.io/ml/soho", "neither a tag nor a digest"), ("ghcr.io/ml/soho@sha256:0123", "not an image"),
                     ("ghcr.io/ml/soho:1", "not a Secret's name")):
        assert main(["pipeline", "compile", "--out", str(out), "--image", bad, "--image-pull-secret", "Reg_Cred"]) == 2
        assert why in capsys.readouterr().err
    with pytest.raises(ValueError, match="when the pipeline is compiled"):
        runner.submit("https://kfp.example.com", {}, package=str(out), client=FakeKfpClient(),
                      image=runner.PodImage(image))


def _tasks(spec):
    """Every task of the DAG and its sub-DAGs, by task name (``shard`` appears twice)."""
    found = {}
    for comp in [spec["root"], *spec["components"].values()]:
        for name, task in comp.get("dag", {}).get("tasks", {}).items():
            found.setdefault(name, []).append(task)
    return found


def _executors(spec):
    """Each container step's display name -> its executor's name (``exec-...``)."""
    return {task["taskInfo"]["name"]: spec["components"][task["componentRef"]["name"]]["executorLabel"]
            for tasks in _tasks(spec).values() for task in tasks
            if "executorLabel" in spec["components"][task["componentRef"]["name"]]}


def _component(spec, task):
    return spec["components"][task["componentRef"]["name"]]


def test_dag_shape_caching_and_retries(compiled):
    _, spec, _ = compiled
    tasks = _tasks(spec)
    assert set(spec["root"]["dag"]["tasks"]) == {"exit-handler-1", "finish"}
    body = _component(spec, spec["root"]["dag"]["tasks"]["exit-handler-1"])["dag"]["tasks"]
    assert set(body) == {"data", "shard", "backbone", "condition-branches-2"}
    # The CNN warm start reads the data step's world and hands its weights to pre-training.
    cnn = body["backbone"]["inputs"]["parameters"]
    assert cnn["dataset"] == {"taskOutputParameter": {"outputParameterKey": "Output", "producerTask": "data"}}
    assert cnn["steps"]["componentInputParameter"] == "pipelinechannel--backbone_steps"
    # One pre-training step runs: the trainer itself (launcher=torchrun) or the job's watcher; the
    # downstream tasks follow it in its branch, from its Model.
    branches = _component(spec, body["condition-branches-2"])["dag"]["tasks"]
    for branch, name in zip(sorted(branches), ("pretrain", "pretrain-2")):
        inside = _component(spec, branches[branch])["dag"]["tasks"]
        assert set(inside) == {name, "soho-downstream" + name.removeprefix("pretrain")}
        shards = inside[name]["inputs"]["artifacts"]["shards"]
        assert shards == {"componentInputArtifact": "pipelinechannel--shard-shards"}
        cnn = inside[name]["inputs"]["artifacts"]["backbone"]
        assert cnn == {"componentInputArtifact": "pipelinechannel--backbone-cnn"}
        rest = next(t for n, t in inside.items() if n != name)
        assert rest["inputs"]["artifacts"]["pretrain_run"] == {
            "taskOutputArtifact": {"outputArtifactKey": "model", "producerTask": name}}
    data_inputs = body["data"]["inputs"]["parameters"]
    assert data_inputs["source"]["componentInputParameter"] == "pipelinechannel--data_source"
    assert data_inputs["tasks"]["componentInputParameter"] == "pipelinechannel--tasks"  # what "official" downloads
    loop = next(t for ts in tasks.values() for t in ts if "parameterIterator" in t)
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("tasks")
    ev = tasks["evaluate"][0]["inputs"]["artifacts"]
    assert ev["checkpoint"]["taskOutputArtifact"] == {"outputArtifactKey": "model", "producerTask": "finetune"}
    report = tasks["report"][0]["inputs"]["artifacts"]["evaluations"]
    assert report["taskOutputArtifact"]["producerTask"].startswith("for-loop")  # dsl.Collected
    # Data preparation is cached, training, evaluation and the report are not; every step retries
    # (training resumes from its checkpoint), with growing back-off.
    for name in ("data", "shard", "backbone"):
        assert all(t["cachingOptions"].get("enableCache") for t in tasks[name])
    for name in ("pretrain", "pretrain-2", "finetune", "evaluate", "report", "finish"):
        assert not any(t.get("cachingOptions", {}).get("enableCache") for t in tasks[name])
    retries = {"data": 3, "shard": 3, "report": 3, "finish": 3, "backbone": 2, "pretrain": 2, "pretrain-2": 2,
               "finetune": 2, "evaluate": 2}
    for name, times in retries.items():
        for t in tasks[name]:
            assert (t["retryPolicy"]["maxRetryCount"], t["retryPolicy"]["backoffDuration"],
                    t["retryPolicy"]["backoffFactor"]) == (times, "30s", 2.0), name


# What each step takes and gives as a typed artifact (name -> schema title).
ARTIFACTS = {
    "shard": ({}, {"shards": "system.Dataset"}),
    "backbone": ({}, {"cnn": "system.Model"}),
    "pretrain": ({"shards": "system.Dataset", "backbone": "system.Model"}, {"model": "system.Model"}),
    "finetune": ({"shards": "system.Dataset", "init": "system.Model"}, {"model": "system.Model"}),
    "evaluate": ({"checkpoint": "system.Model", "shards": "system.Dataset"}, {"metrics": "system.Metrics"}),
    "report": ({"pretrain": "system.Model", "evaluations": "system.Metrics"},
               {"markdown": "system.Markdown", "html": "system.HTML", "metrics": "system.Metrics"}),
}


def test_artifacts_are_typed_and_kept_under_the_pipeline_root_in_the_store(compiled):
    """Shards, checkpoints and metrics pass as Dataset, Model and Metrics artifacts, the report
    also as Markdown and HTML, so the UI draws the lineage from shards to report; only the dataset
    URI still passes as a string. KFP keeps the artifacts under <store_root>/pipeline-root."""
    _, spec, _ = compiled
    store_root = runner.pipeline_parameters()["store_root"]
    assert spec["defaultPipelineRoot"] == runner.default_pipeline_root(store_root) == "s3://soho/pipeline-root"
    seen = set()
    for name, comp in spec["components"].items():
        step = name.removeprefix("comp-").rstrip("-0123456789")
        if "executorLabel" not in comp or step not in ARTIFACTS:
            continue
        seen.add(step)
        for kind, expected in zip(("inputDefinitions", "outputDefinitions"), ARTIFACTS[step]):
            got = {k: v["artifactType"]["schemaTitle"] for k, v in comp.get(kind, {}).get("artifacts", {}).items()}
            assert got == expected, (name, kind)
        if step == "report":
            assert comp["inputDefinitions"]["artifacts"]["evaluations"]["isArtifactList"]  # dsl.Collected
    assert seen == set(ARTIFACTS)
    producers = {spec_["taskOutputParameter"]["producerTask"] for ts in _tasks(spec).values() for t in ts
                 for spec_ in t.get("inputs", {}).get("parameters", {}).values() if "taskOutputParameter" in spec_}
    assert producers == {"data"}


def test_the_pipeline_root_is_chosen_when_compiling(tmp_path, capsys):
    from soho_core.cli import main

    out = tmp_path / "pipeline.yaml"
    assert main(["pipeline", "compile", "--out", str(out), "--pipeline-root", "minio://mlpipeline/v2/artifacts"]) == 0
    assert next(yaml.safe_load_all(out.read_text()))["defaultPipelineRoot"] == "minio://mlpipeline/v2/artifacts"
    assert main(["pipeline", "compile", "--out", str(out), "--pipeline-root", str(tmp_path / "root")]) == 2
    assert "KFP keeps artifacts only under s3://, gs://, minio:// URIs" in capsys.readouterr().err


def test_the_reviewed_yaml_is_what_the_pipeline_compiles_to(compiled):
    """pipelines/soho.yaml is checked in so that every change to the DAG shows in review."""
    reviewed = Path(__file__).resolve().parents[1] / "pipelines" / "soho.yaml"
    assert reviewed.exists() and compiled[0] == reviewed.read_text(), (
        "pipelines/soho.yaml differs from the compiled pipeline: regenerate it with "
        "`soho pipeline compile --out pipelines/soho.yaml` and review the diff")


def test_an_artifact_points_into_the_store(tmp_path):
    """publish() writes a pointer in KFP's own file of the artifact (and, but for Metrics, its
    metadata); location() reads it back in the consuming step. Nothing is copied."""
    from kfp.dsl import Dataset, Metrics

    shards = Dataset(name="shards", uri=str(tmp_path / "kfp" / "shard" / "shards"))
    steps.publish(shards, "s3://soho/shards/world", task="vqa")
    assert shards.metadata == {"uri": "s3://soho/shards/world", "task": "vqa"}
    assert json.loads(Path(shards.path).read_text()) == shards.metadata
    assert steps.location(Dataset(name="shards", uri=shards.uri)) == "s3://soho/shards/world"
    metrics = Metrics(name="metrics", uri=str(tmp_path / "kfp" / "evaluate" / "metrics"))
    metrics.log_metric("vqa/vqa_score", 0.5)
    steps.publish(metrics, "s3://soho/runs/1/vqa/metrics.json")
    assert metrics.metadata == {"vqa/vqa_score": 0.5}  # the UI's table of metrics stays numbers
    assert steps.location(metrics) == "s3://soho/runs/1/vqa/metrics.json"
    with pytest.raises(ValueError, match="'model' .* names no location in the store"):
        steps.location(Dataset(name="model", uri=str(tmp_path / "nothing")))


def _no_credentials(monkeypatch, tmp_path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_the_report_step_checks_the_store_before_work(tmp_path, monkeypatch):
    """Like every other step, the report ends with one line when the store cannot be used."""
    _no_credentials(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as exc:
        steps.report(str(tmp_path), [], "", "s3://soho-store/soho", "run-1")
    assert str(exc.value).startswith("soho: error: no S3 credentials for s3://soho-store/soho: set AWS_ACCESS_KEY_ID")


@pytest.mark.slow
def test_the_report_component_logs_one_line(s3_server, tmp_path):
    """The report component's own container command (the one its pod runs), its input artifacts
    written by publish(), into a missing bucket: one line on stderr, no traceback."""
    from kfp.dsl import Metrics, Model

    from components.report import report

    inputs = {}
    for name, cls, uri in (("pretrain", Model, str(tmp_path / "pretrain")),
                           ("evaluations", Metrics, str(tmp_path / "vqa" / "metrics.json"))):
        artifact = cls(name=name, uri=str(tmp_path / "kfp" / name))
        steps.publish(artifact, uri)
        inputs[name] = {"artifacts": [{"name": name, "uri": artifact.uri, "metadata": artifact.metadata,
                                       "type": {"schemaTitle": cls.schema_title}}]}
    outputs = {name: {"artifacts": [{"name": name, "uri": str(tmp_path / "out" / name),
                                     "type": {"schemaTitle": f"system.{kind}"}}]}
               for name, kind in (("markdown", "Markdown"), ("html", "HTML"), ("metrics", "Metrics"))}
    executor_input = {"inputs": {"parameterValues": {"dataset": "", "store_root": "s3://no-such-bucket",
                                                     "run_id": "run-1"}, "artifacts": inputs},
                      "outputs": {"artifacts": outputs, "parameters": {"Output": {"outputFile": str(tmp_path / "o")}},
                                  "outputFile": str(tmp_path / "executor_output.json")}}
    container = report.component_spec.implementation.container
    args = [json.dumps(executor_input) if a == "{{$}}" else a for a in container.args]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                        "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([*container.command, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"soho: error: S3 bucket 'no-such-bucket' does not exist at {s3_server} (in s3://no-such-bucket): create it, "
        f"or fix the URI or AWS_ENDPOINT_URL (on a cluster: in the Secret soho-s3)"]


def test_the_exit_handler_follows_the_whole_run_and_knows_its_job(compiled):
    """``finish`` runs after everything else, however it ended (the run's final status is its input),
    with what it needs to find the pre-training job; it writes to the store, so it has the S3 keys."""
    _, spec, platform = compiled
    finish = spec["root"]["dag"]["tasks"]["finish"]
    assert finish["triggerPolicy"] == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}
    assert finish["dependentTasks"] == ["exit-handler-1"]
    inputs = finish["inputs"]["parameters"]
    assert inputs["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert {k: v["componentInputParameter"] for k, v in inputs.items() if "componentInputParameter" in v} == {
        "store_root": "store_root", "launcher": "launcher", "namespace": "namespace"}
    assert inputs["run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
    envs = {e["envVar"] for s in platform["exec-finish"]["secretAsEnv"] for e in s["keyToEnv"]}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= envs


def test_parameters_are_typed(compiled):
    params = compiled[1]["root"]["inputDefinitions"]["parameters"]
    expect = {"data_source": "STRING", "store_root": "STRING", "preset": "STRING", "nodes": "NUMBER_INTEGER",
              "gpus_per_node": "NUMBER_INTEGER", "tasks": "LIST", "wandb_project": "STRING", "overrides": "LIST"}
    for name, kind in expect.items():
        assert params[name]["parameterType"] == kind, name
    assert params["tasks"]["defaultValue"] == ["vqa", "nlvr2", "retrieval", "ve"]


def test_secrets_resources_and_shm(compiled):
    _, spec, platform = compiled
    for name in ("data", "shard", "backbone", "pretrain", "pretrain-2", "finetune", "evaluate", "report"):
        envs = {e["envVar"] for s in platform[f"exec-{name}"]["secretAsEnv"] for e in s["keyToEnv"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= envs, name
    for name in ("pretrain", "pretrain-2", "finetune"):
        assert "WANDB_API_KEY" in {e["envVar"] for s in platform[f"exec-{name}"]["secretAsEnv"] for e in s["keyToEnv"]}
    acc = spec["deploymentSpec"]["executors"]["exec-finetune"]["container"]["resources"]["accelerator"]
    assert acc["resourceType"] == "nvidia.com/gpu" and "gpus_per_node" in acc["resourceCount"]


def _quantity(value: str) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    unit = next((u for u in units if value.endswith(u)), "")
    return float(value[:len(value) - len(unit)]) * units.get(unit, 1)


def test_every_pod_has_requests_and_limits_sized_per_step(compiled):
    """Requests and limits on every step; fixed sizes where the step's work is known, the node-size
    parameters for training and evaluation, a small watcher; GPU pods tolerate and select GPU
    nodes from pipeline parameters, and every training and evaluation pod has a bounded /dev/shm."""
    _, spec, platform = compiled
    executors, by_name = spec["deploymentSpec"]["executors"], _executors(spec)
    assert set(by_name) == {"data", "shard pretrain", "backbone", "pretrain", "pretrain (job)", "shard", "finetune",
                            "evaluate", "report", "finish"}
    # pretrain: launcher=torchrun trains in its own pod; backbone trains the CNN in its own pod
    node_sized = {"backbone", "pretrain", "finetune", "evaluate"}
    for name, label in by_name.items():
        res = executors[label]["container"]["resources"]
        for kind in ("Cpu", "Memory"):
            request, limit = res[f"resource{kind}Request"], res[f"resource{kind}Limit"]
            if name in node_sized:
                param = {"Cpu": "cpu_per_node", "Memory": "memory_per_node"}[kind]
                assert request == limit == f"{{{{$.inputs.parameters['pipelinechannel--{param}']}}}}", name
            else:
                assert 0 < _quantity(request) <= _quantity(limit), (name, kind)
        asks_gpus = "accelerator" in res
        assert asks_gpus == (name in ("backbone", "pretrain", "finetune")), name
        k8s = platform.get(label, {})
        if asks_gpus:
            assert k8s["tolerations"] == [{"tolerationJson": {"componentInputParameter":
                                                              "pipelinechannel--gpu_tolerations"}}], name
            assert k8s["nodeSelector"] == {"nodeSelectorJson": {"componentInputParameter":
                                                                "pipelinechannel--gpu_node_selector"}}, name
        else:
            assert "tolerations" not in k8s and "nodeSelector" not in k8s, name
        shm = [m for m in k8s.get("emptyDirMounts", []) if m["mountPath"] == "/dev/shm"]
        if name in node_sized:
            assert shm and shm[0]["medium"] == "Memory" and _quantity(shm[0]["sizeLimit"]) >= 2**30, name
        else:
            assert not shm, name
    watcher = executors[by_name["pretrain (job)"]]["container"]["resources"]
    assert _quantity(watcher["resourceCpuLimit"]) <= 0.5 and _quantity(watcher["resourceMemoryLimit"]) <= 2**29
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["gpu_tolerations"]["defaultValue"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                          "effect": "NoSchedule"}]
    assert params["gpu_node_selector"]["defaultValue"] == {}
    assert (params["cpu_per_node"]["defaultValue"], params["memory_per_node"]["defaultValue"]) == ("8", "32Gi")


def test_parse_params_types_and_names():
    got = runner.parse_params(["nodes=2", "tasks=vqa, ve", "store_root=s3://b/x", "overrides=train.max_steps=5"])
    assert got == {"nodes": 2, "tasks": ["vqa", "ve"], "store_root": "s3://b/x", "overrides": ["train.max_steps=5"]}
    with pytest.raises(ValueError, match="unknown pipeline parameter 'node'.*nodes"):
        runner.parse_params(["node=2"])
    with pytest.raises(ValueError, match="nodes='two'"):
        runner.parse_params(["nodes=two"])
    with pytest.raises(ValueError, match="name=value"):
        runner.parse_params(["nodes"])
    got = runner.parse_params(['gpu_node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}',
                               'gpu_tolerations=[{"key": "gpu", "operator": "Exists"}]', 'tasks=["vqa"]'])
    assert got == {"gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
                   "gpu_tolerations": [{"key": "gpu", "operator": "Exists"}], "tasks": ["vqa"]}
    with pytest.raises(ValueError, match="gpu_node_selector='gpu=h100': expected dict"):
        runner.parse_params(["gpu_node_selector=gpu=h100"])


def test_local_arguments_fail_before_work(tmp_path):
    args = runner.local_arguments("tiny", str(tmp_path), ["train.max_steps=3"], tasks=["vqa"])
    assert args["launcher"] == "torchrun" and args["tasks"] == ["vqa"] and args["overrides"][-1] == "train.max_steps=3"
    with pytest.raises(ValueError, match="preset 'huge'"):
        runner.local_arguments("huge", str(tmp_path))
    with pytest.raises(ValueError, match="task 'vqa2'"):
        runner.local_arguments("tiny", str(tmp_path), tasks=["vqa2"])
    with pytest.raises(ValueError, match="optim.lrr"):
        runner.local_arguments("tiny", str(tmp_path), ["optim.lrr=1"])


def test_a_local_run_starts_the_longest_fine_tunes_first(tmp_path):
    from soho_core.tasks.catalog import DOWNSTREAM

    assert sorted(runner.LOCAL_TASK_ORDER) == sorted(DOWNSTREAM)  # every task has its place
    assert runner.local_arguments("demo", str(tmp_path))["tasks"] == ["vqa", "nlvr2", "ve", "retrieval"]
    chosen = runner.local_arguments("demo", str(tmp_path), tasks=["retrieval", "ve", "vqa", "ve"])["tasks"]
    assert chosen == ["vqa", "ve", "retrieval"]


class FakeKfpClient:
    def __init__(self):
        self.calls = []

    def create_run_from_pipeline_func(self, func, **kw):
        self.calls.append(("func", func, kw))
        return type("Run", (), {"run_id": "run-1"})()

    def create_run_from_pipeline_package(self, path, **kw):
        self.calls.append(("package", path, kw))
        return type("Run", (), {"run_id": "run-2"})()


def test_submit_builds_the_client_call(tmp_path):
    """No KFP server here: the call kfp.Client receives is checked instead."""
    client = FakeKfpClient()
    params = runner.parse_params(["store_root=s3://soho", "nodes=2", "gpus_per_node=8", "preset=res18"])
    assert runner.submit("https://kfp.example.com", params, run_name="r", client=client) == "run-1"
    kind, func, kw = client.calls[0]
    assert kind == "func" and func.name == "soho"
    assert kw["arguments"] == params and kw["run_name"] == "r" and kw["experiment_name"] == "soho"
    # The run's artifacts go under its store_root; a package without one keeps its compiled root.
    assert kw["pipeline_root"] == "s3://soho/pipeline-root" == func.pipeline_spec.default_pipeline_root
    assert runner.submit("http://kfp:8888", {}, package=str(tmp_path / "p.yaml"), client=client) == "run-2"
    assert client.calls[-1][2]["pipeline_root"] is None
    runner.submit("http://kfp:8888", params, package=str(tmp_path / "p.yaml"), client=client,
                  pipeline_root="minio://mlpipeline/v2/artifacts")
    assert client.calls[-1][2]["pipeline_root"] == "minio://mlpipeline/v2/artifacts"
    with pytest.raises(ValueError, match="pipeline root '/data/soho/pipeline-root'"):
        runner.submit("http://kfp:8888", {"store_root": "/data/soho"}, client=client)
    with pytest.raises(ValueError, match="kfp.example.com"):
        runner.submit("kfp.example.com", {}, client=client)


def test_the_data_step_names_each_world_by_its_options_and_reuses_only_the_same(tmp_path, capsys):
    kw = dict(num_images=12, seed=2, image_size=32, min_objects=1, max_objects=2)
    four = steps.prepare_data("synthetic", str(tmp_path), **kw)
    eight = steps.prepare_data("synthetic", str(tmp_path), questions_per_image=8, **kw)
    assert Path(four).name == "synthetic-n12-s2-px32-obj1to2" and Path(eight).name == "synthetic-n12-s2-px32-obj1to2-q8"
    assert steps.prepare_data("synthetic", str(tmp_path), questions_per_image=8, **kw) == eight
    assert "already complete" in capsys.readouterr().out
    # A world written by another version of the generator (or with other options) is rendered again.
    manifest = json.loads((Path(eight) / "manifest.json").read_text())
    (Path(eight) / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    steps.prepare_data("synthetic", str(tmp_path), questions_per_image=8, **kw)
    assert "holds another world (version=1)" in capsys.readouterr().out
    assert json.loads((Path(eight) / "manifest.json").read_text()) == manifest


def test_steps_reject_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="data source 'imagenet'"):
        steps.prepare_data("imagenet", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        steps.prepare_data(str(tmp_path), str(tmp_path))
    with pytest.raises(ValueError, match="unknown task 'vqa2'"):
        steps.shard_task(str(tmp_path), str(tmp_path), "vqa2")
    with pytest.raises(ValueError, match="run_id is empty"):
        steps.run_uri(str(tmp_path), "", "pretrain")
    assert steps.evaluation_overrides(["train.max_steps=3", "finetune.eval_max_images=4", "data.num_workers=0"]) == [
        "finetune.eval_max_images=4", "data.num_workers=0"]


def test_shard_step_is_idempotent(synthetic_dir, tmp_path):
    root = steps.shard_task(str(synthetic_dir), str(tmp_path), "ve", shard_max_count=40)
    index = Path(root) / "ve" / "index.json"
    stamp = index.stat().st_mtime_ns
    assert steps.shard_task(str(synthetic_dir), str(tmp_path), "ve") == root
    assert index.stat().st_mtime_ns == stamp  # a retried or cached step keeps complete shards


def test_the_backbone_step_trains_the_cnn_on_a_second_world_once(synthetic_dir, tmp_path, capsys):
    """The warm start renders the next seed's world, trains the preset's CNN there with the preset's
    own CNN optimizer (an override that stops the CNN in training does not stop it here), and a rerun
    with the same inputs reuses the file; with nothing to learn from it returns ""."""
    import torch

    from soho_core.config import load_config
    from soho_core.models.backbone import Backbone

    store = tmp_path / "store"
    overrides = ["optim.backbone_lr=0", "finetune.head_lr_mult=1", "train.seed=5"]
    out = steps.warm_backbone(str(synthetic_dir), str(store), "tiny", 2, overrides)
    assert Path(out).parent == store / "backbones" and Path(out).name.startswith("synthetic-n160-s1-px64-obj1to2-tiny-2-")
    assert "synthetic-n160-s1-px64-obj1to2" in capsys.readouterr().out
    assert json.loads((store / "datasets" / "synthetic-n160-s1-px64-obj1to2" / "manifest.json").read_text())["seed"] == 1
    torch.manual_seed(5)
    untrained = Backbone(load_config("tiny").model.backbone).state_dict()
    saved = torch.load(out, weights_only=True)["state"]
    assert not torch.equal(saved["stem.0.weight"], untrained["stem.0.weight"])
    stamp = Path(out).stat().st_mtime_ns
    assert steps.warm_backbone(str(synthetic_dir), str(store), "tiny", 2, overrides) == out
    assert Path(out).stat().st_mtime_ns == stamp and "already trained" in capsys.readouterr().out
    # Another CNN setting is another file.
    assert steps.warm_backbone(str(synthetic_dir), str(store), "tiny", 2, ["model.backbone.out_stage=3"]) != out
    assert steps.warm_backbone(str(synthetic_dir), str(store), "tiny", 0) == ""
    official = tmp_path / "official"
    official.mkdir()
    assert steps.warm_backbone(str(official), str(store), "tiny", 2) == ""
    assert "no object labels" in capsys.readouterr().out
    with pytest.raises(ValueError, match="backbone_steps=-1"):
        steps.warm_backbone(str(synthetic_dir), str(store), "tiny", -1)


def _metrics_file(folder: Path, task: str, value: float, samples=None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    primary = {"vqa": "vqa_score", "ve": "accuracy"}[task]
    (folder / "metrics.json").write_text(json.dumps({"task": task, "split": "test", "num_examples": 10,
                                                     "metrics": {primary: value}, "samples": samples or []}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in (1, 2, 3)))
    return str(folder / "metrics.json")


def test_report_compares_with_the_previous_run(tmp_path, synthetic_dir):
    pre = tmp_path / "pretrain"
    pre.mkdir()
    (pre / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 9.0 - s, "loss_mlm": 4.0, "vd_usage": 0.5, "vd_perplexity": 20.0}) + "\n"
        for s in (10, 20, 30)))
    image_id = json.loads((synthetic_dir / "vqa.jsonl").read_text().splitlines()[0])["image_id"]
    sample = {"image_id": image_id, "question": "what color is it", "prediction": "red", "probability": 0.9,
              "answers": ["red"] * 10}
    history = str(tmp_path / "reports" / "latest.json")
    first = write_report(str(tmp_path / "r1"), str(pre), [_metrics_file(tmp_path / "vqa", "vqa", 0.5, [sample]),
                                                         _metrics_file(tmp_path / "ve", "ve", 0.4)],
                         dataset=str(synthetic_dir), run_id="run-1", history_uri=history)
    assert "first run" in first.markdown
    for png in ("pretrain_loss.png", "dictionary_usage.png", "dictionary_perplexity.png", "finetune_loss.png",
                f"samples/{image_id}.png"):
        assert (tmp_path / "r1" / png).read_bytes()[:4] == b"\x89PNG", png
        assert f"]({png})" in first.markdown
    assert "what color is it" in first.markdown and "data:image/png;base64," in first.markdown_inline
    # The same report as one HTML page (the UI's HTML artifact), every plot inside it.
    assert first.html.startswith("<!DOCTYPE html>") and "<td>what color is it</td>" in first.html
    assert first.html.count('src="data:image/png;base64,') == first.markdown.count("](") == len(first.images)
    assert "<h2>Pre-training</h2>" in first.html and "<table>" in first.html

    second = write_report(str(tmp_path / "r2"), str(pre), [_metrics_file(tmp_path / "vqa2", "vqa", 0.75),
                                                          _metrics_file(tmp_path / "ve2", "ve", 0.3)],
                          run_id="run-2", history_uri=history)
    assert "| vqa | test | 10 | vqa_score | 0.7500 | +0.2500 |" in second.markdown
    assert "| ve | test | 10 | accuracy | 0.3000 | -0.1000 |" in second.markdown
    assert "against run `run-1`" in second.markdown
    assert json.loads(Path(history).read_text())["run_id"] == "run-2"


@pytest.mark.slow
def test_local_pipeline_runs_end_to_end(tmp_path, capsys):
    """The cluster's DAG under kfp.local at the tiny preset: synthetic data, shards, torchrun
    pre-training, two fine-tuned and evaluated tasks (the fan-out), the report."""
    from soho_core.cli import main

    before = builtins.print, logging.getLogger().handlers[:]
    work = tmp_path / "work"
    code = main(["pipeline", "run", "--local", "--preset", "tiny", "--work-dir", str(work), "--tasks", "vqa,nlvr2",
                 "--set", "train.max_steps=4", "--set", "train.log_every=2", "--set", "finetune.max_steps=4",
                 "--param", "seed=3"])
    out = capsys.readouterr().out
    assert code == 0
    # Two tasks ran in threads, and the process prints and logs as it did before (see below).
    assert (builtins.print, logging.getLogger().handlers) == before
    (report,) = (work / "store" / "runs").glob("*/report/report.md")
    assert f"report: {report}" in out
    assert "| vqa | test |" in out and "| nlvr2 | test |" in out
    run = report.parent.parent
    summary = json.loads((report.parent / "summary.json").read_text())
    assert set(summary["metrics"]) == {"vqa", "nlvr2"} and summary["run_id"] == run.name
    for task in ("vqa", "nlvr2"):
        assert json.loads((run / task / "metrics.json").read_text())["task"] == task
        assert (run / task / "checkpoints" / "latest.json").exists()
    # The CNN warm start trained on a second world (the next seed) and pre-training started from it.
    (cnn,) = (work / "store" / "backbones").glob("*.pt")
    assert cnn.name.startswith("synthetic-n160-s4-px64-obj1to2-tiny-4-")
    assert sorted(p.name for p in (work / "store" / "datasets").iterdir()) == [
        "synthetic-n160-s3-px64-obj1to2", "synthetic-n160-s4-px64-obj1to2"]
    assert json.loads((run / "pretrain" / "config.json").read_text())["model"]["backbone"]["weights"] == str(cnn)
    steps_logged = [json.loads(l)["step"] for l in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == [2, 4]
    assert (report.parent / "pretrain_loss.png").exists()
    # KFP's own outputs: the evaluation Metrics, the Markdown and HTML artifacts the UI renders, and
    # the artifacts of shards and checkpoints, each pointing at its place in the store.
    kfp_root = work / "kfp"
    logged = {}
    for path in kfp_root.rglob("executor_output.json"):
        for art in json.loads(path.read_text()).get("artifacts", {}).get("metrics", {}).get("artifacts", []):
            logged.update(art.get("metadata", {}))
    assert {"vqa/vqa_score", "nlvr2/accuracy"} <= set(logged)
    pointers = {}
    for path in kfp_root.rglob("*"):
        if path.name in ("shards", "model", "metrics") and path.is_file():
            pointers.setdefault(path.name, set()).add(json.loads(path.read_text())["uri"])
    (shard_root,) = (work / "store" / "shards").iterdir()
    assert pointers == {"shards": {str(shard_root)}, "model": {str(run / t) for t in ("pretrain", "vqa", "nlvr2")},
                        "metrics": {str(run / t / "metrics.json") for t in ("vqa", "nlvr2")}}
    (md,) = [p for p in kfp_root.rglob("markdown") if p.is_file()]
    assert md.read_text().startswith("# SOHO pipeline report")
    (page,) = [p for p in kfp_root.rglob("html") if p.is_file()]
    assert "<h1>SOHO pipeline report</h1>" in page.read_text() and 'src="data:image/png;base64,' in page.read_text()
    # The exit handler recorded how the run ended.
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["report"], status["deleted_jobs"]) == ("SUCCEEDED", str(report), [])
    # Two tasks at a time (--parallelism 2, the default): both were sharded before either was evaluated.
    sharded = [(shard_root / t / "index.json").stat().st_mtime for t in ("vqa", "nlvr2")]
    evaluated = [(run / t / "metrics.json").stat().st_mtime for t in ("vqa", "nlvr2")]
    assert max(sharded) < min(evaluated)
    assert "SOHO_TASK_THREADS" not in os.environ  # the run's share of threads ends with it


def _trainers(command: str, marker: str) -> list[int]:
    """Pids of the training processes (not torchrun's agent) of ``soho <command>`` whose arguments
    mention ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue  # not a process, or gone
        trainer = any(a == "soho_core" and b == command for a, b in zip(args, args[1:]))
        if trainer and "torch.distributed.run" not in args and any(marker in a for a in args):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_a_finetune_killed_mid_run_succeeds_on_its_retry_from_the_checkpoint(tmp_path, monkeypatch):
    """kfp.local runs the retry policy: the fine-tune's trainer is killed (SIGKILL, as the kernel's
    out-of-memory killer does) while it writes its step-4 checkpoint; the step fails (torchrun
    itself does not restart it here), kfp.local runs it again, and the second try resumes from the
    step-2 checkpoint and ends at the planned step 6. The run then succeeds."""
    from soho_core import env as names

    work = tmp_path / "work"
    # Halfway through writing the step-4 checkpoint, the writer waits: the moment to kill it. (The
    # retry waits there too, unharmed; pre-training stops at step 2 and never gets there.)
    monkeypatch.setenv(names.FAULT_CHECKPOINT_PAUSE, "4:8")
    killed: list[int] = []

    def kill_when_paused(stop: threading.Event) -> None:
        while not stop.wait(0.05):
            if list((work / "store" / "runs").glob("*/vqa/checkpoints/step-00000004.pt.tmp-*")):
                for pid in _trainers("finetune", str(work)):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return

    stop = threading.Event()
    killer = threading.Thread(target=kill_when_paused, args=(stop,), daemon=True)
    killer.start()
    try:
        result = runner.run_local(str(work), preset="tiny", tasks=["vqa"], overrides=[
            "train.max_steps=2", "finetune.max_steps=6", "train.ckpt_every=2", "train.log_every=2"])
    finally:
        stop.set()
        killer.join()
    assert len(killed) == 1
    run = Path(result.report_uri).parent.parent
    ft = run / "vqa"
    assert json.loads((ft / "checkpoints" / "latest.json").read_text())["step"] == 6
    resumes = [e for e in map(json.loads, (ft / "metrics.jsonl").read_text().splitlines()) if e.get("event")]
    # One resume, from step 2, by a new step process (torchrun's own restart count is 0).
    assert [(e["event"], e["step"], e["restart"]) for e in resumes] == [("resume", 2, 0)]
    assert json.loads((run / "status.json").read_text())["state"] == "SUCCEEDED"
    assert set(result.summary["metrics"]) == {"vqa"}


@pytest.mark.slow
def test_a_failed_run_triggers_the_exit_handler(tmp_path):
    """A run whose data step fails (after its retries) ends failed, and the exit handler still runs:
    the run's final state is in the store. Nothing after the failed step ran."""
    work = tmp_path / "work"
    with pytest.raises(RuntimeError, match="FAILURE"):
        runner.run_local(str(work), preset="tiny", tasks=["vqa"], params={"data_source": str(tmp_path / "missing")})
    (status_file,) = (work / "store" / "runs").glob("*/status.json")
    status = json.loads(status_file.read_text())
    assert (status["state"], status["report"], status["deleted_jobs"]) == ("FAILED", "", [])
    assert "exit-handler-1" in status["error"]
    assert sorted(p.name for p in status_file.parent.iterdir()) == ["status.json"]


def _zip_folder(folder: Path) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return buf.getvalue()


def test_official_data_is_downloaded_into_the_store_and_sharded_per_task(coco, vqa, tmp_path):  # noqa: F811
    """data_source="official": the data step downloads (from a local HTTP server here) what the
    tasks need into the store; each shard step shards its task with the official readers."""
    from soho_core.data import download as dl
    from soho_core.data.shards import load_index
    from test_download import Server
    from test_readers import jpeg, write_json

    vg, karpathy = tmp_path / "vg", tmp_path / "karpathy"
    write_json(vg / "region_descriptions.json", [{"id": i, "regions": [{"region_id": i, "image_id": i, "phrase": p}]}
                                                 for i, p in ((1, "a tree"), (2, "a red car"))])
    jpeg(vg / "VG_100K" / "1.jpg")
    jpeg(vg / "VG_100K_2" / "2.jpg")
    write_json(karpathy / "dataset_coco.json", {"images": [
        {"filepath": f, "filename": f"COCO_{f}_{i:012d}.jpg", "cocoid": i, "split": s,
         "sentences": [{"raw": f"picture {i}"}]} for f, i, s in (("train2014", 9, "train"), ("val2014", 42, "test"))]})
    store = tmp_path / "store"
    with Server() as server:
        table = {}
        for name, folder in (("coco", coco), ("vqa2", vqa), ("vg", vg), ("karpathy", karpathy)):
            server.files[f"/{name}.zip"] = _zip_folder(folder)
            table[name] = (dl.Resource(f"{server.url}/{name}.zip", f"{name}.zip", extract=True),)
        table["nlvr2"] = (dl.Resource(f"{server.url}/nlvr2.json", "train.json"),)
        with pytest.raises(dl.UserProvidedError, match=r"task 'nlvr2' needs images .*store/datasets/official/nlvr2"):
            steps.prepare_data("official", str(store), tasks=["nlvr2"], download_sources=table)
        assert server.requests == []  # refused before any download
        dataset = steps.prepare_data("official", str(store), tasks=["vqa", "retrieval"], download_sources=table)
        assert dataset == str(store / "datasets" / "official")
        assert sorted(p.name for p in Path(dataset).iterdir()) == ["coco", "karpathy", "official.json", "vg", "vqa2"]
        n = len(server.requests)
        assert steps.prepare_data("official", str(store), tasks=["vqa", "retrieval"], download_sources=table) == dataset
        assert len(server.requests) == n  # a retried step downloads nothing again

    root = steps.shard_task(dataset, str(store), "pretrain", shard_max_count=2)
    assert root == str(store / "shards" / "official")
    _, index = load_index(root, "pretrain")
    assert index["source"] == "coco+vg" and index["splits"]["train"]["num_samples"] == 4 + 2  # train2014 + VG
    _, index = load_index(steps.shard_task(dataset, str(store), "vqa"), "vqa")
    assert {s: v["num_texts"] for s, v in index["splits"].items()} == {"train": 12, "test": 6}
    assert index["answer_vocab"][:2] == ["2", "yes"]
    _, index = load_index(steps.shard_task(dataset, str(store), "retrieval"), "retrieval")
    assert {s: v["num_samples"] for s, v in index["splits"].items()} == {"train": 1, "test": 1}
    stamp = (Path(root) / "pretrain" / "index.json").stat().st_mtime_ns
    assert steps.shard_task(dataset, str(store), "pretrain") == root
    assert (Path(root) / "pretrain" / "index.json").stat().st_mtime_ns == stamp  # complete: kept

    # The same folder, already downloaded, named by URI: checked, not downloaded again
    assert steps.prepare_data(dataset, str(tmp_path / "other"), tasks=["vqa"]) == dataset
    with pytest.raises(FileNotFoundError, match=r"neither .* official layout: .*/nothing/coco is missing"):
        steps.prepare_data(str(tmp_path / "nothing"), str(store), tasks=["vqa"])


def test_a_local_run_s_thread_share_is_read_and_a_bad_one_named(monkeypatch):
    from soho_core.env import TASK_THREADS, runtime_env

    monkeypatch.delenv(TASK_THREADS, raising=False)
    assert runtime_env().task_threads == 0
    monkeypatch.setenv(TASK_THREADS, "3")
    assert runtime_env().task_threads == 3
    for bad in ("0", "two"):
        monkeypatch.setenv(TASK_THREADS, bad)
        with pytest.raises(ValueError, match=f"{TASK_THREADS}='{bad}'"):
            runtime_env()
    with pytest.raises(ValueError, match="parallelism=3"):
        runner.run_local("unused", preset="tiny", parallelism=3)


def test_a_local_run_leaves_print_and_logging_as_it_found_them():
    """kfp.local swaps ``print`` and the root logger's handlers around every task and restores what
    it saw on entry. The two tasks of a ParallelFor run in threads; interleaved, they left the
    process printing indented lines and logging to a closed test stream (lost output and "Logging
    error" in the tests after the local pipeline, in a CI run on a loaded machine)."""
    from kfp.local import logging_utils

    root = logging.getLogger()
    before_print, before_handlers = builtins.print, root.handlers[:]

    def two_tasks_interleaved():
        for swap in (logging_utils.indented_print, logging_utils.local_logger_context):
            first, second = swap(), swap()
            first.__enter__()
            second.__enter__()
            first.__exit__(None, None, None)
            second.__exit__(None, None, None)

    try:
        two_tasks_interleaved()
        assert builtins.print is not before_print and root.handlers != before_handlers  # the hazard
    finally:
        builtins.print, root.handlers[:] = before_print, before_handlers
    with runner.process_globals_kept():
        two_tasks_interleaved()
    assert builtins.print is before_print and root.handlers == before_handlers

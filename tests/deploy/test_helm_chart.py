"""The Helm chart: lint, render, validate against Kubernetes' schemas, and check what it promises.

Needs the pinned helm from deploy/helm-tools (built with Go on first use; GUARDSTREAM_SKIP_HELM=1
skips these tests with a reason).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import (
    CHART,
    CI_VALUES,
    KNOWN_SETTINGS,
    KUBE_VERSION,
    NAMESPACE,
    Render,
)

VALUES_CASES = [pytest.param(None, id="default"), *(pytest.param(p, id=p.stem) for p in CI_VALUES)]
CI = {p.stem.removesuffix("-values"): p for p in CI_VALUES}

#: Custom resources kubernetes-validate has no schema for; checked structurally below.
CRD_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
SECRET_ENV = {
    "GUARDSTREAM_KAFKA_SASL_USERNAME",
    "GUARDSTREAM_KAFKA_SASL_PASSWORD",
    "GUARDSTREAM_REDIS_URL",
    "GUARDSTREAM_OPENAI_API_KEY",
}
WORKER = "gs-guardstream"
SERVER = "gs-guardstream-server"
ESCALATION = "gs-guardstream-escalation"


def _args(values: Path | None) -> tuple[Path, ...]:
    return () if values is None else (values,)


def _pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def _containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _pod_spec(deployment)
    return [*spec.get("initContainers", []), *spec["containers"]]


def _container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in _containers(deployment) if c["name"] == name]
    return found


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _env_value(container: dict[str, Any], name: str) -> str:
    entry = _env(container)[name]
    assert "value" in entry, f"{name} is not a plain value: {entry}"
    value: str = entry["value"]
    return value


def _gpu_in(resources: dict[str, Any]) -> bool:
    return any("nvidia.com/gpu" in (resources.get(k) or {}) for k in ("limits", "requests"))


# ---- lint and schema validation of everything rendered ------------------------------------------


@pytest.mark.parametrize("values", VALUES_CASES)
def test_helm_lint(helm: Path, values: Path | None) -> None:
    cmd = [str(helm), "lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION]
    if values is not None:
        cmd += ["-f", str(values)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("values", VALUES_CASES)
def test_rendered_manifests_are_valid(render: Any, values: Path | None) -> None:
    r: Render = render(*_args(values))
    assert r.returncode == 0, r.stderr
    assert r.docs, "nothing rendered"
    for doc in r.docs:
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            _check_custom_resource(doc, r)
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{where} does not validate against Kubernetes {KUBE_VERSION}: {exc.message}"
                f" at {'/'.join(str(p) for p in exc.path)}"
            )
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "gs", where
        assert "namespace" not in doc["metadata"], f"{where}: the namespace comes from helm"
    _check_selectors(r)


def _check_custom_resource(doc: dict[str, Any], r: Render) -> None:
    """What kubernetes-validate cannot: the fields the CRDs require and the references."""
    kind, meta, spec = doc["kind"], doc["metadata"], doc["spec"]
    assert meta["name"] and isinstance(meta.get("labels"), dict)
    if kind == "ScaledObject":
        target = spec["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment"
        r.one("Deployment", target["name"])
        assert isinstance(spec["minReplicaCount"], int)
        assert isinstance(spec["maxReplicaCount"], int)
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["triggers"], "a ScaledObject needs triggers"
        for trigger in spec["triggers"]:
            assert trigger["type"] == "kafka"
            meta_ = trigger["metadata"]
            for key in ("bootstrapServers", "consumerGroup", "topic", "lagThreshold"):
                assert isinstance(meta_[key], str) and meta_[key], key
            # KEDA reads trigger metadata as a map of strings.
            assert all(isinstance(v, str) for v in meta_.values()), meta_
            if "authenticationRef" in trigger:
                r.one("TriggerAuthentication", trigger["authenticationRef"]["name"])
    elif kind == "TriggerAuthentication":
        refs = spec["secretTargetRef"]
        assert refs
        for ref in refs:
            assert set(ref) == {"parameter", "name", "key"}, ref
            assert ref["parameter"] in {"username", "password", "ca", "cert", "key", "sasl", "tls"}
    elif kind == "ServiceMonitor":
        selector = spec["selector"]["matchLabels"]
        services = [
            s for s in r.of_kind("Service") if selector.items() <= s["metadata"]["labels"].items()
        ]
        assert len(services) == 1, "the ServiceMonitor must select exactly the worker Service"
        ports = {p["name"] for p in services[0]["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] in ports
            assert endpoint["path"] == "/metrics"
        assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
    else:  # pragma: no cover - CRD_KINDS and this function go together
        pytest.fail(f"no structural check for {kind}")


def _check_selectors(r: Render) -> None:
    """Services and PodDisruptionBudgets select the pods of exactly one Deployment."""
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in r.of_kind("Deployment")
    }
    for d in r.of_kind("Deployment"):
        assert d["spec"]["selector"]["matchLabels"].items() <= pods[d["metadata"]["name"]].items()
    for obj in [*r.of_kind("Service"), *r.of_kind("PodDisruptionBudget")]:
        sel = obj["spec"]["selector"]
        sel = sel.get("matchLabels", sel)
        matching = [n for n, labels in pods.items() if sel.items() <= labels.items()]
        assert len(matching) == 1, f"{obj['kind']}/{obj['metadata']['name']} selects {matching}"


# ---- topologies ----------------------------------------------------------------------------------


def test_single_topology_runs_the_engine_on_a_gpu(render: Any) -> None:
    r: Render = render()
    worker = r.one("Deployment", WORKER)
    c = _container(worker, "worker")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].startswith("guardstream/guardstream-gpu:")
    assert _env_value(c, "GUARDSTREAM_ENGINE") == "trtllm"
    tolerations = _pod_spec(worker)["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert not r.of_kind("Deployment")[1:], "no model server in the single topology"

    # The init container builds into the very folder the worker loads, on the same GPU.
    init = _container(worker, "engine-build")
    engine_dir = _env_value(c, "GUARDSTREAM_TRTLLM_ENGINE_DIR")
    assert init["command"][:3] == [
        "python3",
        "/opt/guardstream/scripts/ensure-engine.py",
        engine_dir,
    ]
    build = init["command"][init["command"].index("--") + 1 :]
    assert build[:3] == ["guardstream", "engine", "build"]
    assert build[build.index("--checkpoint") + 1] == _env_value(
        c, "GUARDSTREAM_TRTLLM_CHECKPOINT_DIR"
    )
    assert build[build.index("--output") + 1] == "{output}"
    assert init["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _env_value(c, "GUARDSTREAM_TRTLLM_BUILD_ON_START") == "false"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["engines"]["readOnly"] is True
    assert not {m["name"]: m for m in init["volumeMounts"]}["engines"].get("readOnly", False)
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in _pod_spec(worker)["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert {p["metadata"]["name"] for p in r.of_kind("PersistentVolumeClaim")} == set(
        claims.values()
    )


def test_engine_folder_follows_the_build_settings(render: Any) -> None:
    def engine_dir(*sets: str) -> str:
        r: Render = render(sets=list(sets))
        assert r.returncode == 0, r.stderr
        return _env_value(
            _container(r.one("Deployment", WORKER), "worker"), "GUARDSTREAM_TRTLLM_ENGINE_DIR"
        )

    base = engine_dir()
    assert base.startswith("/engines/GuardReasoner-8B-")
    fp8 = ("engine.trtllm.build.quantization=fp8", "engine.trtllm.build.calibDataset=calib/cnn")
    assert engine_dir(*fp8) != base
    assert engine_dir("engine.trtllm.build.maxBatchSize=64") != base
    assert engine_dir("engine.maxSequences=64") != base
    assert engine_dir("engine.trtllm.build.maxInputLen=2048") != base

    # fp8 calibrates on a local dataset (the default one is on the Hub): required, and passed on.
    no_calib: Render = render(sets=[fp8[0]])
    assert no_calib.returncode != 0
    assert "calibDataset" in no_calib.stderr
    init = _container(render(sets=list(fp8)).one("Deployment", WORKER), "engine-build")
    cmd = init["command"]
    assert cmd[cmd.index("--calib-dataset") + 1] == "/models/calib/cnn"
    assert cmd[cmd.index("--quantization") + 1] == "fp8"


def test_hf_engine(render: Any) -> None:
    r: Render = render(sets=["engine.name=hf", "engine.hf.device=cuda"])
    c = _container(r.one("Deployment", WORKER), "worker")
    assert c["image"].startswith("guardstream/guardstream-gpu:"), "torch lives in the GPU image"
    assert _env_value(c, "GUARDSTREAM_HF_MODEL_PATH") == "/models/GuardReasoner-8B"
    assert _env_value(c, "GUARDSTREAM_HF_DEVICE") == "cuda"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert not r.of_kind("ConfigMap"), "no engine build for hf"
    cpu: Render = render(sets=["engine.name=hf", "engine.hf.device=cpu", "gpu.count=0"])
    worker = cpu.one("Deployment", WORKER)
    assert not _gpu_in(_container(worker, "worker")["resources"])
    assert "tolerations" not in _pod_spec(worker)


def test_prebuilt_engine_has_no_build_step(render: Any) -> None:
    r: Render = render(CI["prebuilt-engine"])
    worker = r.one("Deployment", WORKER)
    assert "initContainers" not in _pod_spec(worker)
    assert not r.of_kind("ConfigMap")
    assert not r.of_kind("PersistentVolumeClaim"), "existing claims only"
    c = _container(worker, "worker")
    assert _env_value(c, "GUARDSTREAM_TRTLLM_ENGINE_DIR") == (
        "/engines/guardreasoner-8b-h100-trtllm-1.2.1"
    )


def test_pytorch_runtime_needs_no_engine_folder(render: Any) -> None:
    r: Render = render(sets=["engine.trtllm.runtime=pytorch"])
    worker = r.one("Deployment", WORKER)
    c = _container(worker, "worker")
    assert "GUARDSTREAM_TRTLLM_ENGINE_DIR" not in _env(c)
    assert "initContainers" not in _pod_spec(worker)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert [p["metadata"]["name"] for p in r.of_kind("PersistentVolumeClaim")] == [
        "gs-guardstream-models"
    ]


def test_split_topology_workers_on_cpu_call_the_server(render: Any) -> None:
    r: Render = render(CI["split"])
    worker = r.one("Deployment", WORKER)
    server = r.one("Deployment", SERVER)
    service = r.one("Service", SERVER)

    for c in _containers(worker):
        assert not _gpu_in(c["resources"]), "split workers must not ask for a GPU"
    assert "initContainers" not in _pod_spec(worker)
    assert "tolerations" not in _pod_spec(worker), "no GPU toleration on CPU workers"
    c = _container(worker, "worker")
    assert c["image"].startswith("guardstream/guardstream:")
    assert _env_value(c, "GUARDSTREAM_ENGINE") == "openai_http"
    url = urlparse(_env_value(c, "GUARDSTREAM_OPENAI_BASE_URL"))
    assert url.scheme == "http"
    assert url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"]
    assert url.path == "/v1"
    assert not {"models", "engines"} & {m["name"] for m in c["volumeMounts"]}

    s = _container(server, "server")
    assert s["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert s["command"][0] == "trtllm-serve"
    # trtllm-serve lists a model folder under its base name: the workers must ask for that name
    assert _env_value(c, "GUARDSTREAM_OPENAI_SERVED_MODEL") == PurePosixPath(s["command"][1]).name
    assert s["image"].startswith("nvcr.io/nvidia/tensorrt-llm/release:")
    assert s["ports"][0]["containerPort"] == url.port
    assert s["startupProbe"]["httpGet"]["path"] == "/health"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in _pod_spec(
        server
    )["tolerations"]
    # The service selects the server, not the workers.
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "server"


def test_the_engines_sequence_budget_follows_the_model_size(render: Any) -> None:
    """Per-request admission keeps engine.maxSequences decoding; 0 picks it by model size, and
    the TensorRT engine's and the model server's batch sizes follow it unless set."""

    def worker_env(*sets: str) -> dict[str, str]:
        r: Render = render(sets=list(sets))
        assert r.returncode == 0, r.stderr
        c = _container(r.one("Deployment", WORKER), "worker")
        return {n: _env_value(c, n) for n in _env(c) if "value" in _env(c)[n]}

    eight = worker_env()  # model.id GuardReasoner-8B
    assert eight["GUARDSTREAM_ENGINE_MAX_SEQUENCES"] == "128"
    assert eight["GUARDSTREAM_ADMISSION"] == "auto"
    assert eight["GUARDSTREAM_EARLY_EXIT"] == "true"
    assert "-b128-" in eight["GUARDSTREAM_TRTLLM_ENGINE_DIR"]
    one = worker_env("model.id=org/GuardReasoner-1B", "model.checkpointPath=GuardReasoner-1B")
    assert one["GUARDSTREAM_ENGINE_MAX_SEQUENCES"] == "256"
    assert "-b256-" in one["GUARDSTREAM_TRTLLM_ENGINE_DIR"]
    unknown = worker_env("model.id=someone/other-guard")
    assert unknown["GUARDSTREAM_ENGINE_MAX_SEQUENCES"] == "128", "unknown size: the smallest"
    fixed = worker_env("engine.maxSequences=96", "engine.trtllm.build.maxBatchSize=200")
    assert fixed["GUARDSTREAM_ENGINE_MAX_SEQUENCES"] == "96"
    assert "-b200-" in fixed["GUARDSTREAM_TRTLLM_ENGINE_DIR"]
    init = _container(render().one("Deployment", WORKER), "engine-build")["command"]
    assert init[init.index("--max-batch-size") + 1] == "128"

    split: Render = render(CI["split"], sets=["model.id=org/GuardReasoner-3B"])
    assert split.returncode == 0, split.stderr
    server = _container(split.one("Deployment", SERVER), "server")["command"]
    worker = _container(split.one("Deployment", WORKER), "worker")
    budget = _env_value(worker, "GUARDSTREAM_ENGINE_MAX_SEQUENCES")
    assert budget == "192"
    assert server[server.index("--max_batch_size") + 1] == budget
    assert _env_value(worker, "GUARDSTREAM_OPENAI_MAX_CONCURRENCY") == budget


def test_a_cascade_runs_a_second_model_server_in_either_topology(render: Any) -> None:
    """The cascade's second model is a model server: the chart's own (GPU nodes, its own
    Service and batch size) or an external one; the workers are pointed at it."""
    on = ["cascade.enabled=true", "cascade.model.revision=8b-commit"]
    needs_revision: Render = render(sets=["cascade.enabled=true"])
    assert needs_revision.returncode != 0
    assert "cascade.model.revision is required" in needs_revision.stderr
    for values in ((), (CI["split"],)):
        r: Render = render(*values, sets=on)
        assert r.returncode == 0, r.stderr
        escalation = r.one("Deployment", ESCALATION)
        service = r.one("Service", ESCALATION)
        server = _container(escalation, "server")
        assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert server["command"][1].endswith("/GuardReasoner-8B")
        assert server["command"][server["command"].index("--max_batch_size") + 1] == "64"
        labels = escalation["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"]["selector"]["app.kubernetes.io/component"] == "escalation-server"
        worker = _container(r.one("Deployment", WORKER), "worker")
        url = urlparse(_env_value(worker, "GUARDSTREAM_ESCALATE_OPENAI_BASE_URL"))
        assert url.hostname == service["metadata"]["name"] and url.path == "/v1"
        assert _env_value(worker, "GUARDSTREAM_ESCALATE_ENGINE") == "openai_http"
        assert _env_value(worker, "GUARDSTREAM_ESCALATE_MODEL_REVISION") == "8b-commit"
        assert _env_value(worker, "GUARDSTREAM_ESCALATE_TIMEOUT_S") == "30"
        assert _env_value(worker, "GUARDSTREAM_ESCALATE_OPENAI_SERVED_MODEL") == "GuardReasoner-8B"
    external: Render = render(sets=[*on, "cascade.baseUrl=http://big.example:8000/v1"])
    assert external.returncode == 0, external.stderr
    assert not [
        d for d in external.of_kind("Deployment") if d["metadata"]["name"].endswith("escalation")
    ]
    worker = _container(external.one("Deployment", WORKER), "worker")
    assert (
        _env_value(worker, "GUARDSTREAM_ESCALATE_OPENAI_BASE_URL") == "http://big.example:8000/v1"
    )
    assert "GUARDSTREAM_ESCALATE_OPENAI_SERVED_MODEL" not in _env(worker)
    off: Render = render()
    assert "GUARDSTREAM_ESCALATE_ENGINE" not in _env(
        _container(off.one("Deployment", WORKER), "worker")
    )


def test_a_model_server_needs_the_models_revision(render: Any) -> None:
    """Workers that call a server cannot digest its checkpoint: the revision keys their verdict
    cache, so without it a new checkpoint would read the old one's verdicts."""
    for sets in (
        ["topology=split", "model.revision="],
        ["engine.name=openai_http", "engine.openai.baseUrl=http://llm.example:8000/v1"],
    ):
        r: Render = render(sets=sets)
        assert r.returncode != 0, sets
        assert "model.revision is required" in r.stderr
    ok: Render = render(CI["split"])
    c = _container(ok.one("Deployment", WORKER), "worker")
    assert _env_value(c, "GUARDSTREAM_MODEL_REVISION") == "3b4c8f0e2a"


def test_served_model_name_is_model_id_for_an_external_server_unless_set(render: Any) -> None:
    external = [
        "engine.name=openai_http",
        "engine.openai.baseUrl=http://llm.example:8000/v1",
        "model.revision=abc123",
    ]
    c = _container(render(sets=external).one("Deployment", WORKER), "worker")
    assert _env_value(c, "GUARDSTREAM_OPENAI_BASE_URL") == "http://llm.example:8000/v1"
    assert "GUARDSTREAM_OPENAI_SERVED_MODEL" not in {e["name"] for e in c["env"]}  # = model.id
    named = [*external, "engine.openai.servedModel=guard-8b"]
    c = _container(render(sets=named).one("Deployment", WORKER), "worker")
    assert _env_value(c, "GUARDSTREAM_OPENAI_SERVED_MODEL") == "guard-8b"


# ---- autoscaling ---------------------------------------------------------------------------------


def test_keda_scaledobject_on_consumer_lag(render: Any) -> None:
    r: Render = render(CI["keda"])
    worker = r.one("Deployment", WORKER)
    assert "replicas" not in worker["spec"], "the autoscaler owns the replica count"
    so = r.one("ScaledObject", WORKER)
    assert so["spec"]["maxReplicaCount"] == 8  # == topics.partitions in keda-values
    topics = {t["metadata"]["topic"] for t in so["spec"]["triggers"]}
    assert topics == {"chat.prompts", "chat.responses"}
    for t in so["spec"]["triggers"]:
        assert t["metadata"]["sasl"] == "scram_sha512"
        assert t["metadata"]["tls"] == "enable"
        assert t["metadata"]["consumerGroup"] == "guardstream"
    auth = r.one("TriggerAuthentication", "gs-guardstream-kafka")
    refs = {ref["parameter"]: ref["name"] for ref in auth["spec"]["secretTargetRef"]}
    assert refs == {
        "username": "guardstream-kafka-sasl",
        "password": "guardstream-kafka-sasl",
        "ca": "guardstream-kafka-tls",
    }


def test_keda_max_replicas_above_partitions_fails(render: Any) -> None:
    r: Render = render(CI["keda"], sets=["autoscaling.keda.maxReplicaCount=9"])
    assert r.returncode != 0
    assert "exceeds topics.partitions" in r.stderr
    ok: Render = render(CI["keda"], sets=["autoscaling.keda.maxReplicaCount=8"])
    assert ok.returncode == 0, ok.stderr


def test_hpa_bounded_by_partitions_and_exclusive_with_keda(render: Any) -> None:
    r: Render = render(CI["hpa-replay"])
    hpa = r.one("HorizontalPodAutoscaler", WORKER)
    assert hpa["spec"]["maxReplicas"] == 6
    assert render(CI["hpa-replay"], sets=["autoscaling.hpa.maxReplicas=13"]).returncode != 0
    both: Render = render(CI["hpa-replay"], sets=["autoscaling.keda.enabled=true"])
    assert both.returncode != 0
    assert "schema" in both.stderr


# ---- values.schema.json --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("replicaCount=two", "/replicaCount"),
        ("batch.maxSize=-1", "/batch/maxSize"),
        ("batch.maxSize=0", "/batch/maxSize"),
        ("engine.name=foo", "/engine/name"),
        ("topology=mesh", "/topology"),
        ("policy=fail_sometimes", "/policy"),
        ("kafka.securityProtocol=SASL_SSL", "/kafka/sasl/existingSecret"),
        ("kafka.sasl.password=hunter2", "password"),
        ("redis.url=redis://:hunter2@redis:6379/0", "url"),
        ("cache.enabled=true,redis.existingSecret=", "/redis/existingSecret"),
        ("topics.partitions=0", "/topics/partitions"),
        ("server.image.tag=latest", "/server/image/tag"),
        ("engine.trtllm.build.quantization=int4", "/engine/trtllm/build/quantization"),
        ("telemetry.otlp.protocol=udp", "/telemetry/otlp/protocol"),
        ("unknownKey=1", "unknownKey"),
    ],
)
def test_schema_rejects_wrong_values(render: Any, setting: str, message: str) -> None:
    r: Render = render(sets=[setting])
    assert r.returncode != 0, f"{setting} was accepted"
    assert "values don't meet the specifications of the schema" in r.stderr, r.stderr
    assert message in r.stderr, r.stderr


# ---- secrets, grace period, security -------------------------------------------------------------


@pytest.mark.parametrize("values", VALUES_CASES)
def test_secrets_only_by_reference(render: Any, values: Path | None) -> None:
    r: Render = render(*_args(values), sets=["engine.openai.apiKeySecret.name=openai-key"])
    assert r.returncode == 0, r.stderr
    assert not r.of_kind("Secret"), "the chart never creates Secrets: it references existing ones"
    for d in r.of_kind("Deployment"):
        for c in _containers(d):
            for name, entry in _env(c).items():
                if name in SECRET_ENV:
                    assert "value" not in entry, f"{name} rendered as a plain value"
                    assert set(entry["valueFrom"]) == {"secretKeyRef"}, entry
                else:
                    assert "valueFrom" not in entry or "secretKeyRef" not in entry["valueFrom"]


def test_sasl_and_tls_from_existing_secrets(render: Any) -> None:
    r: Render = render(CI["keda"])
    c = _container(r.one("Deployment", WORKER), "worker")
    env = _env(c)
    assert env["GUARDSTREAM_KAFKA_SASL_USERNAME"]["valueFrom"]["secretKeyRef"] == {
        "name": "guardstream-kafka-sasl",
        "key": "username",
    }
    assert env["GUARDSTREAM_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "guardstream-kafka-sasl",
        "key": "password",
    }
    assert _env_value(c, "GUARDSTREAM_KAFKA_SASL_MECHANISM") == "SCRAM-SHA-512"
    assert _env_value(c, "GUARDSTREAM_KAFKA_SSL_CAFILE") == "/etc/guardstream/kafka-tls/ca.crt"
    assert "GUARDSTREAM_KAFKA_SSL_CERTFILE" not in env
    volumes = {v["name"]: v for v in _pod_spec(r.one("Deployment", WORKER))["volumes"]}
    assert volumes["kafka-tls"]["secret"]["secretName"] == "guardstream-kafka-tls"

    mtls: Render = render(CI["hpa-replay"])
    c = _container(mtls.one("Deployment", WORKER), "worker")
    assert _env_value(c, "GUARDSTREAM_KAFKA_SSL_CERTFILE") == "/etc/guardstream/kafka-tls/tls.crt"
    assert _env_value(c, "GUARDSTREAM_KAFKA_SSL_KEYFILE") == "/etc/guardstream/kafka-tls/tls.key"
    assert "GUARDSTREAM_REDIS_URL" not in _env(c), "cache disabled: no Redis URL"
    assert _env_value(c, "GUARDSTREAM_CACHE_ENABLED") == "false"


@pytest.mark.parametrize(("grace", "margin"), [(30, 15), (120, 0), (7, 60)])
def test_termination_grace_derives_from_the_service_grace(
    render: Any, grace: int, margin: int
) -> None:
    r: Render = render(sets=[f"gracePeriodSeconds={grace}", f"terminationMarginSeconds={margin}"])
    worker = r.one("Deployment", WORKER)
    c = _container(worker, "worker")
    assert int(_env_value(c, "GUARDSTREAM_GRACE_PERIOD_S")) == grace
    assert _pod_spec(worker)["terminationGracePeriodSeconds"] == grace + margin


@pytest.mark.parametrize("values", VALUES_CASES)
def test_pods_are_locked_down(render: Any, values: Path | None) -> None:
    r: Render = render(*_args(values))
    for d in r.of_kind("Deployment"):
        pod = _pod_spec(d)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        tmp_volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for c in _containers(d):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert "add" not in sc["capabilities"]
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in tmp_volumes, f"{c['name']}: /tmp must be an emptyDir"


@pytest.mark.parametrize("values", VALUES_CASES)
def test_worker_probes_and_port(render: Any, values: Path | None) -> None:
    r: Render = render(*_args(values))
    c = _container(r.one("Deployment", WORKER), "worker")
    port = int(_env_value(c, "GUARDSTREAM_WEB_PORT"))
    assert c["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model load budget"
    svc = r.one("Service", WORKER)
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}
    ]
    pdb = r.one("PodDisruptionBudget", WORKER)
    assert ("maxUnavailable" in pdb["spec"]) != ("minAvailable" in pdb["spec"])


def test_settings_reach_the_environment(render: Any) -> None:
    r: Render = render(
        sets=[
            "batch.maxSize=64",
            "batch.maxWaitMs=5",
            "engine.name=hf",
            "policy=fail_open",
            "shadow=true",
            "cache.ttlSeconds=600",
            "topics.verdicts=v2.verdicts",
            "telemetry.tracesExporter=otlp",
            "telemetry.otlp.endpoint=http://otel:4317",
            "moderate=prompts",
            "web.port=7000",
        ]
    )
    c = _container(r.one("Deployment", WORKER), "worker")
    expected = {
        "GUARDSTREAM_BATCH_MAX_SIZE": "64",
        "GUARDSTREAM_BATCH_MAX_WAIT_MS": "5",
        "GUARDSTREAM_ENGINE": "hf",
        "GUARDSTREAM_POLICY": "fail_open",
        "GUARDSTREAM_SHADOW": "true",
        "GUARDSTREAM_CACHE_TTL_S": "600",
        "GUARDSTREAM_TOPIC_VERDICTS": "v2.verdicts",
        "GUARDSTREAM_TRACES_EXPORTER": "otlp",
        "GUARDSTREAM_OTLP_ENDPOINT": "http://otel:4317",
        "GUARDSTREAM_MODERATE": "prompts",
        "GUARDSTREAM_WEB_PORT": "7000",
    }
    assert {k: _env_value(c, k) for k in expected} == expected
    assert c["ports"][0]["containerPort"] == 7000
    # Every plain variable is a string.
    for name, entry in _env(c).items():
        if "value" in entry:
            assert isinstance(entry["value"], str), name


@pytest.mark.parametrize("values", VALUES_CASES)
def test_env_names_are_service_settings(render: Any, values: Path | None) -> None:
    r: Render = render(*_args(values), sets=["engine.openai.apiKeySecret.name=openai-key"])
    for d in r.of_kind("Deployment"):
        for c in _containers(d):
            names = {n for n in _env(c) if n.startswith("GUARDSTREAM_")}
            assert names <= KNOWN_SETTINGS, f"not a setting: {sorted(names - KNOWN_SETTINGS)}"


def test_servicemonitor(render: Any) -> None:
    r: Render = render(CI["servicemonitor"])
    sm = r.one("ServiceMonitor", WORKER)
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["endpoints"][0]["interval"] == "15s"
    assert not render().of_kind("ServiceMonitor"), "off by default"


def test_notes_tell_how_to_watch_verdicts(helm: Path, tmp_path: Path) -> None:
    """`helm template` does not print NOTES.txt: render it through a copy of the chart."""
    chart = tmp_path / "guardstream"
    shutil.copytree(CHART, chart)
    (chart / "files" / "notes.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "zz-notes.yaml").write_text(
        'notes: {{ tpl (.Files.Get "files/notes.txt") . | toJson }}\n'
    )
    proc = subprocess.run(
        [
            str(helm),
            "template",
            "gs",
            str(chart),
            "-n",
            NAMESPACE,
            "--kube-version",
            KUBE_VERSION,
            "--show-only",
            "templates/zz-notes.yaml",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    notes = yaml.safe_load(proc.stdout)["notes"]
    assert "kafka-console-consumer.sh" in notes
    assert "--topic moderation.verdicts" in notes
    assert "--bootstrap-server kafka:9092" in notes
    assert "-c engine-build" in notes

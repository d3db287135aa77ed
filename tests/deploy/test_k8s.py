"""Static checks of the deploy stack: the Kubernetes manifests.

Nothing here needs Docker or a cluster (helpers: ``tests/deploy/parsing.py``)."""

from __future__ import annotations

import shutil
import subprocess
from urllib.parse import urlparse

import pytest
import yaml

from tests.deploy.parsing import (
    K8S_DIR,
    REQUIRED_ENV,
    _argv,
    _k8s,
    _k8s_docs,
    _k8s_files,
    _load_yaml,
    _mdlora_container,
    _option_value,
    _resolve_port,
    _walk,
)

# ---------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------


def test_k8s_manifests_parse() -> None:
    files = _k8s_files()
    assert files, "deploy/k8s has no manifests"
    for path, doc in _k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: missing apiVersion/kind"
        if doc["kind"] != "Kustomization":
            assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc['kind']} has no name"


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _load_yaml(K8S_DIR / "kustomization.yaml")
    resources = kustomization.get("resources", [])
    for resource in resources:
        assert (K8S_DIR / resource).is_file(), f"kustomization lists missing {resource}"
    manifests = {p.name for p in _k8s_files()} - {"kustomization.yaml", "kustomization.yml"}
    unlisted = manifests - set(resources)
    assert not unlisted, f"manifests not in kustomization.yaml: {sorted(unlisted)}"
    image_names = {image["name"] for image in kustomization.get("images", [])}
    for _, doc in _k8s_docs():
        for node in _walk(doc):
            if isinstance(node, dict) and isinstance(node.get("image"), str):
                repo = node["image"].rsplit(":", 1)[0]
                if repo.endswith("mdlora"):
                    assert repo in image_names, f"kustomization images does not cover {repo}"


def test_k8s_deployment_probes_ports_and_resources() -> None:
    deployment = _k8s("Deployment", "mdlora")
    assert deployment["spec"]["replicas"] == 3
    pod, container = _mdlora_container()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items(), "Deployment selector does not match its pods"

    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    ports = {int(p["containerPort"]) for p in container["ports"]}
    assert _resolve_port(readiness["port"], container) in ports
    assert _resolve_port(liveness["port"], container) in ports

    argv = _argv(container.get("command")) + _argv(container.get("args"))
    if argv:
        assert argv[:2] == ["mdlora", "serve"], f"container runs {argv}"
        port = _option_value(argv, "--port")
        assert port is not None and int(port) in ports, f"serves on {port}, declares {ports}"

    service = _k8s("Service", "mdlora")
    assert service["spec"]["selector"].items() <= labels.items(), "Service selects no mdlora pod"
    for entry in service["spec"]["ports"]:
        target = _resolve_port(entry.get("targetPort", entry["port"]), container)
        assert target in ports, f"Service targetPort {target} is not a container port {ports}"

    resources = container.get("resources", {})
    assert resources.get("requests", {}).get("cpu") and resources.get("requests", {}).get("memory")
    assert resources.get("limits", {}).get("memory")

    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    assert security.get("runAsNonRoot") is True
    assert security.get("runAsUser") == 10001


def test_k8s_configuration_comes_from_configmap_and_secret() -> None:
    _, container = _mdlora_container()
    config_maps = [
        e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e
    ]
    assert config_maps, "mdlora container takes no envFrom configMapRef"
    data: dict[str, str] = {}
    for name in config_maps:
        data.update(_k8s("ConfigMap", name).get("data", {}))
    expected = REQUIRED_ENV - {"MDLORA_ADMIN_TOKEN"}
    assert expected <= set(data), f"ConfigMap lacks {sorted(expected - set(data))}"
    assert "MDLORA_ADMIN_TOKEN" not in data, "the admin token belongs in a Secret"
    assert data["MDLORA_REGISTRY"] in {"redis", "local"}

    env = {e["name"]: e for e in container.get("env", [])}
    ref = env["MDLORA_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    secret = _k8s("Secret", ref["name"])
    values = {**secret.get("stringData", {}), **secret.get("data", {})}
    assert ref["key"] in values, f"Secret {ref['name']} has no key {ref['key']}"
    placeholder = str(values[ref["key"]]).lower()
    assert "example" in placeholder or "replace" in placeholder, (
        "the committed Secret must hold an obvious placeholder, not a real token"
    )

    redis_url = urlparse(data["MDLORA_REDIS_URL"])
    redis_service = _k8s("Service", str(redis_url.hostname))
    assert (redis_url.port or 6379) in {p["port"] for p in redis_service["spec"]["ports"]}
    redis_pods = [
        doc
        for _, doc in _k8s_docs()
        if doc.get("kind") == "Deployment"
        and redis_service["spec"]["selector"].items()
        <= doc["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert redis_pods, "no Deployment behind the Redis Service"


def test_k8s_artifact_dir_is_a_mounted_volume() -> None:
    pod, container = _mdlora_container()
    artifact_dir = _k8s("ConfigMap", "mdlora-config")["data"]["MDLORA_ARTIFACT_DIR"]
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if artifact_dir == m["mountPath"]
        or artifact_dir.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"no volumeMount holds {artifact_dir}"
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    volume = volumes[mounts[0]["name"]]
    if "persistentVolumeClaim" in volume:
        _k8s("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


def test_kubectl_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: `kubectl kustomize deploy/k8s` not run")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert all(d.get("metadata", {}).get("namespace") for d in built if d["kind"] != "Namespace")
    kinds = {d["kind"] for d in built}
    assert {"Deployment", "Service", "ConfigMap", "Secret"} <= kinds


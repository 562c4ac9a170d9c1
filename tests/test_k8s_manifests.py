"""The Kubernetes manifests (`deploy/k8s`, and its overlays for several API server processes and
for tensor parallelism), validated against the Kubernetes API's own JSON schemas.

The validator is `kubernetes-validate` (the published OpenAPI schemas of each Kubernetes
release, strict: unknown fields are errors). There is no `kustomize` binary on PyPI, so the
overlays are rendered here the way kustomize applies their JSON 6902 patches (`jsonpatch`, the
RFC 6902 implementation). ServiceMonitor and PrometheusRule are Prometheus Operator resources,
not in the Kubernetes schemas: their structure is checked in `test_deploy.py` and the rules'
expressions with promtool.
"""

from __future__ import annotations

from pathlib import Path

import jsonpatch
import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
# Oldest and newest Kubernetes release the manifests are checked against.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))


def render(folder: Path) -> list[dict]:
    """The objects `kubectl apply -k folder` would apply (resources and JSON 6902 patches only:
    what our kustomizations use; anything else is refused so that this stays honest)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
    assert not unsupported, f"{folder}: render() does not implement {unsupported}"
    objects: list[dict] = []
    for resource in kustomization["resources"]:
        path = (folder / resource).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        operations = yaml.safe_load((folder / patch["path"]).read_text())
        matched = [
            o
            for o in objects
            if o["kind"] == target["kind"] and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])
        ]
        assert matched, f"{folder}: patch {patch['path']} matches nothing"
        for obj in matched:
            objects[objects.index(obj)] = jsonpatch.apply_patch(obj, operations)  # raises on a failed `test` op
    return objects


def _deployment(objects: list[dict]) -> dict:
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    return deployment


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", ["base", *OVERLAYS])
def test_manifests_validate_against_the_kubernetes_schemas(variant, version):
    objects = render(K8S if variant == "base" else K8S / "overlays" / variant)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service"} <= kinds
    for obj in objects:
        if obj["kind"] in OPERATOR_KINDS:
            continue
        kubernetes_validate.validate(obj, version, strict=True)  # raises ValidationError with the path


def test_the_validator_catches_mistakes():
    """A misspelt field and a wrong type must fail: the check is not vacuous."""
    deployment = _deployment(render(K8S))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    wrong_field = jsonpatch.apply_patch(
        deployment, [{"op": "add", "path": "/spec/template/spec/containers/0/imagePullPolicyy", "value": "Always"}]
    )
    wrong_type = jsonpatch.apply_patch(deployment, [{"op": "replace", "path": "/spec/replicas", "value": "one"}])
    assert container["image"]
    for bad in (wrong_field, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


def test_overlays_change_what_they_say():
    base = _deployment(render(K8S))["spec"]["template"]["spec"]
    multi = _deployment(render(K8S / "overlays" / "multi-api-server"))["spec"]["template"]["spec"]
    tp = _deployment(render(K8S / "overlays" / "tensor-parallel"))["spec"]["template"]["spec"]
    args = multi["containers"][0]["args"]
    assert args[args.index("--api-server-count") + 1] == "4"
    assert args[: len(base["containers"][0]["args"])] == base["containers"][0]["args"]
    args = tp["containers"][0]["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert tp["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert tp["containers"][0]["image"].endswith(":cuda")
    assert "VLLM_CPU_KVCACHE_SPACE" not in {e["name"] for e in tp["containers"][0]["env"]}

"""deploy/: the Kubernetes manifests validate offline against the Kubernetes schemas (kubernetes-validate), base and
every overlay, after applying the overlays' patches the way kustomize does (strategic merge: maps merge, lists of
named items merge by name, null deletes a key, `$patch: delete` drops a resource; image overrides). Written, not
deployed here (no cluster)."""
import copy
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_VERSION = "1.30.0"
OVERLAYS = sorted(p.parent for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))


def _merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = _merge(base.get(k), v) if k in base else v
        return out
    if isinstance(base, list) and isinstance(patch,
                                             list) and all(isinstance(x, dict) and "name" in x for x in base + patch):
        out, index = [copy.deepcopy(x) for x in base], {x["name"]: i for i, x in enumerate(base)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = _merge(out[index[item["name"]]], item)
            else:
                out.append(item)
        return out
    return copy.deepcopy(patch)


def render(folder: Path) -> list[dict]:
    """A minimal kustomize build: resources (files or folders), labels, patches, images."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs = []
    for r in k.get("resources", []):
        p = (folder / r).resolve()
        docs += render(p) if p.is_dir() else [d for d in yaml.safe_load_all(p.read_text()) if d]
    for group in k.get("labels", []):
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(group["pairs"])
            if group.get("includeSelectors") and d["kind"] in ("Deployment", "PodDisruptionBudget", "Service"):
                sel = d["spec"]["selector"]
                (sel.setdefault("matchLabels", {}) if d["kind"] != "Service" else sel).update(group["pairs"])
                if d["kind"] == "Deployment":
                    d["spec"]["template"]["metadata"]["labels"].update(group["pairs"])
    for patch in k.get("patches", []):
        p = yaml.safe_load((folder / patch["path"]).read_text())
        key = (p["kind"], p["metadata"]["name"])
        hits = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) == key]
        assert hits, f"{folder / patch['path']}: patches {key}, which the resources do not have"
        if p.get("$patch") == "delete":
            docs.pop(hits[0])
        else:
            docs[hits[0]] = _merge(docs[hits[0]], p)
    for img in k.get("images", []):
        for d in docs:
            for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if c["image"].split(":")[0] == img["name"]:
                    c["image"] = f"{img.get('newName', img['name'])}:{img.get('newTag', c['image'].split(':')[-1])}"
    return docs


def validate(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("folder", [DEPLOY / "base", *OVERLAYS], ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_manifests_validate_against_the_kubernetes_schemas(folder):
    docs = render(folder)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler"}
    for d in docs:
        validate(d)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    c = pod["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and "--model-control-mode=none" in c["args"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "triton_queue_duration_us_per_request"


def test_validation_can_fail():
    """The validator is strict: a typo'd field and a wrong type are refused."""
    import kubernetes_validate

    dep = next(d for d in render(DEPLOY / "base") if d["kind"] == "Deployment")
    bad = copy.deepcopy(dep)
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)
    typo = copy.deepcopy(dep)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(typo)


def test_object_storage_overlay_replaces_the_volume():
    docs = render(DEPLOY / "overlays" / "object-storage")
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == "build")
    assert "emptyDir" in vol and "persistentVolumeClaim" not in vol
    assert pod["initContainers"][0]["volumeMounts"][0]["mountPath"] == "/models"

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
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    server, gateway = containers["tritonserver"], containers["gateway"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1 and "--model-control-mode=none" in server["args"]
    # tritonserver listens on loopback only, on the ports the gateway forwards to; the pod's gRPC/HTTP are the
    # gateway's, and the probes go through it
    assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--http-port=9000", "--grpc-port=9001"} <= set(
        server["args"])
    assert {"--upstream-http-port=9000", "--upstream-grpc-port=9001", "--address=0.0.0.0"} <= set(gateway["args"])
    assert {p["name"] for p in server["ports"]} == {"metrics"} and {p["name"] for p in gateway["ports"]} == {
        "http", "grpc"}
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    service = next(d for d in docs if d["kind"] == "Service")
    named = {p["name"] for c in containers.values() for p in c.get("ports", [])}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= named
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
    typo["spec"]["template"]["spec"]["containers"][1]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(typo)


def test_object_storage_overlay_replaces_the_volume():
    docs = render(DEPLOY / "overlays" / "object-storage")
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == "build")
    assert "emptyDir" in vol and "persistentVolumeClaim" not in vol
    assert pod["initContainers"][0]["volumeMounts"][0]["mountPath"] == "/models"


def test_gateway_sidecar_command_runs_in_front_of_a_server(server, tmp_path):
    """The gateway container's command and arguments, as deploy/ writes them (ports moved to free ones, the
    repository to the test server's), in front of a real tritonserver: health answers through it, a gzip body is
    refused with 415, and SIGTERM stops it cleanly."""
    import signal
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from storymaker_serve.runtime.serving.ports import free_port

    pod = next(d for d in render(DEPLOY / "base") if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    gateway = next(c for c in pod["containers"] if c["name"] == "gateway")
    http, grpc_port = free_port(), free_port()
    moved = {"--repo": str(server.repo), "--address": "127.0.0.1", "--http-port": str(http),
             "--grpc-port": str(grpc_port), "--upstream-http-port": str(server.upstream_http_port),
             "--upstream-grpc-port": str(server.upstream_grpc_port), "--drain-s": "5"}
    args = [f"{k}={moved.get(k, v)}" for k, v in (a.split("=", 1) for a in gateway["args"])]
    assert gateway["command"][:2] == ["python3", "-m"]
    proc = subprocess.Popen([sys.executable, "-m", *gateway["command"][2:], *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert "gateway: gRPC" in proc.stdout.readline()
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=10) as r:
            assert r.status == 200
        req = urllib.request.Request(f"http://127.0.0.1:{http}/v2/models/storymaker/infer", data=b"\x1f\x8b" * 10,
                                     headers={"Content-Encoding": "gzip"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 415
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0

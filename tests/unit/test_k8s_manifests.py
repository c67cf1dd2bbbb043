"""The Kubernetes manifests (deploy/k8s/), offline: each kustomization rendered by a small renderer
of the kustomize features it uses, every document validated against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields fail), and the properties the deployment relies on
checked (gRPC probes, drain, resources, PDBs, scrape annotations, GPUs, stable worker names)."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from common.config import GatewaySettings, PlannerSettings, WorkerSettings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# The oldest Kubernetes these manifests target (native gRPC probes are GA since 1.27) and the
# newest one kubernetes-validate==1.37.0 ships schemas for. Pinned: a package update must not
# move them silently.
K8S_VERSIONS = ("1.30", "1.37")
KUSTOMIZATIONS = {"base": K8S / "base", "cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
DOPD_IMAGE = "dopd-serving"
WORKLOADS = ("Deployment", "StatefulSet")
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding", "PriorityClass"}
# Each service's gRPC and metrics port settings, by the `python -m` module its container runs.
PORT_SETTINGS = {"services.gateway": ("DOPD_GATEWAY_PORT", "DOPD_GATEWAY_METRICS_PORT"),
                 "services.planner": ("DOPD_PLANNER_PORT", "DOPD_PLANNER_METRICS_PORT"),
                 "services.worker": ("DOPD_WORKER_PORT", "DOPD_WORKER_METRICS_PORT")}
# How many times DOPD_DRAIN_GRACE_S a SIGTERM may take at most, by module: the gateway waits for
# its running requests, then stops its HTTP server and its gRPC server, each with that grace; a
# worker drains its requests, then stops its gRPC server; the planner only stops its server.
DRAIN_GRACES = {"services.gateway": 3, "services.planner": 1, "services.worker": 2}
# Environment variables that are not settings fields but are read on purpose.
OTHER_DOPD_ENV = {"DOPD_CACHE_DIR"}  # common/modeling/loader.py


# -- a minimal kustomize -------------------------------------------------------------------------
SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches", "replicas"}
# Strategic merge: the merge key of each list field the patches touch; other lists are replaced.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "imagePullSecrets": "name"}


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def strategic_merge(base, patch, field: str = ""):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            assert not key.startswith("$"), f"patch directive {key} is not supported by this renderer"
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        key = MERGE_KEYS.get(field)
        if field == "ports":  # containers' ports merge on containerPort, Services' on port
            key = "containerPort" if all("containerPort" in p for p in base + patch) else "port"
        if key is None:
            return copy.deepcopy(patch)
        out = [copy.deepcopy(item) for item in base]
        for item in patch:
            at = next((i for i, old in enumerate(out) if old.get(key) == item[key]), None)
            if at is None:
                out.append(copy.deepcopy(item))
            else:
                out[at] = strategic_merge(out[at], item, field)
        return out
    return copy.deepcopy(patch)


def split_image(image: str) -> tuple[str, str]:
    """('name', ':tag' or '@digest' or '')."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    colon, slash = image.rfind(":"), image.rfind("/")
    return (image[:colon], image[colon:]) if colon > slash else (image, "")


def pod_spec(doc: dict) -> dict | None:
    return doc["spec"]["template"]["spec"] if doc["kind"] in WORKLOADS else None


def build(directory: Path) -> list[dict]:
    """Render a kustomization: resources (files or kustomization directories), then patches
    (strategic merge of whole documents), namespace, labels (metadata only), replicas, images."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kust) <= SUPPORTED, f"{directory}: kustomize features {set(kust) - SUPPORTED} not rendered here"
    docs: list[dict] = []
    for entry in kust.get("resources", []):
        path = directory / entry
        docs += build(path) if path.is_dir() else load_docs(path)
    for patch in kust.get("patches", []):
        assert set(patch) == {"path"}, f"{directory}: only whole-document patches by path are rendered here"
        for p in load_docs(directory / patch["path"]):
            hits = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) ==
                    (p["kind"], p["metadata"]["name"])]
            assert len(hits) == 1, f"{patch['path']}: {p['kind']}/{p['metadata']['name']} matches {len(hits)}"
            docs[hits[0]] = strategic_merge(docs[hits[0]], p)
    if "namespace" in kust:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = kust["namespace"]
    for labels in kust.get("labels", []):
        assert set(labels) == {"pairs"}, "only labels on metadata (no includeSelectors/includeTemplates)"
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(labels["pairs"])
    for replicas in kust.get("replicas", []):
        hits = [d for d in docs if d["kind"] in WORKLOADS and d["metadata"]["name"] == replicas["name"]]
        assert len(hits) == 1, f"replicas: {replicas['name']} matches {len(hits)}"
        hits[0]["spec"]["replicas"] = replicas["count"]
    for image in kust.get("images", []):
        assert set(image) <= {"name", "newName", "newTag", "digest"}
        for d in docs:
            spec = pod_spec(d)
            for c in (spec or {}).get("containers", []) + (spec or {}).get("initContainers", []):
                name, suffix = split_image(c["image"])
                if name != image["name"]:
                    continue
                if "digest" in image:
                    suffix = "@" + image["digest"]
                elif "newTag" in image:
                    suffix = ":" + str(image["newTag"])
                c["image"] = image.get("newName", name) + suffix
    seen = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(seen) == len(set(seen)), f"{directory}: duplicate resources"
    return docs


# -- what the deployment relies on ------------------------------------------------------------------
def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def config_data(docs: list[dict]) -> dict[str, str]:
    return next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "dopd-config")["data"]


def setting(docs: list[dict], container: dict, name: str) -> str | None:
    """The value a DOPD container sees for `name`: its env, else the ConfigMap it reads."""
    if name in env_of(container):
        return env_of(container)[name].get("value")
    if any(src.get("configMapRef", {}).get("name") == "dopd-config" for src in container.get("envFrom", [])):
        return config_data(docs).get(name)
    return None


def module_of(container: dict) -> str:
    argv = " ".join(container.get("command", []) + container.get("args", []))
    found = re.search(r"python -m (services\.\w+)", argv)
    assert found, f"container {container['name']} runs no DOPD service: {argv}"
    return found.group(1)


def named_port(container: dict, name: str) -> int | None:
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == name), None)


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def is_dopd(container: dict) -> bool:
    return split_image(container["image"])[0].rsplit("/", 1)[-1] == DOPD_IMAGE


def problems(docs: list[dict]) -> list[str]:
    """Everything wrong with a rendered kustomization ([] = fine)."""
    out: list[str] = []
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    known = {f"DOPD_{n.upper()}" for cls in (GatewaySettings, PlannerSettings, WorkerSettings)
             for n in cls.model_fields} | OTHER_DOPD_ENV
    out += [f"ConfigMap: {k} is no setting" for k in config_data(docs) if k not in known]
    for w in workloads:
        spec, meta = pod_spec(w), w["spec"]["template"]["metadata"]
        where = f"{w['kind']}/{w['metadata']['name']}"
        if not selects(w["spec"]["selector"]["matchLabels"], meta.get("labels", {})):
            out.append(f"{where}: selector does not select its pods")
        for c in spec["containers"]:
            at = f"{where}/{c['name']}"
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    out.append(f"{at}: no {probe}")
            requests = c.get("resources", {}).get("requests", {})
            if not {"cpu", "memory"} <= set(requests) or "memory" not in c.get("resources", {}).get("limits", {}):
                out.append(f"{at}: needs cpu and memory requests and a memory limit")
            defined: set[str] = set()
            for e in c.get("env", []):  # $(VAR) expands only from variables defined above it
                for ref in re.findall(r"\$\((\w+)\)", e.get("value", "")):
                    if ref not in defined:
                        out.append(f"{at}: {e['name']} uses $({ref}) before it is defined")
                defined.add(e["name"])
            if not is_dopd(c):
                continue
            out += [f"{at}: env {n} is no setting" for n in env_of(c) if n.startswith("DOPD_") and n not in known]
            port_var, metrics_var = PORT_SETTINGS[module_of(c)]
            grpc_port, metrics_port = named_port(c, "grpc"), named_port(c, "metrics")
            if grpc_port is None or str(grpc_port) != setting(docs, c, port_var):
                out.append(f"{at}: containerPort grpc {grpc_port} is not {port_var}")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if c.get(probe, {}).get("grpc", {}).get("port") != grpc_port:
                    out.append(f"{at}: {probe} is not a gRPC health probe on port {grpc_port}")
            annotations = meta.get("annotations", {})
            scrape = (annotations.get("prometheus.io/scrape"), annotations.get("prometheus.io/port"),
                      annotations.get("prometheus.io/path"))
            if metrics_port is None or str(metrics_port) != setting(docs, c, metrics_var) or \
                    scrape != ("true", str(metrics_port), "/metrics"):
                out.append(f"{at}: scrape annotations {scrape} do not point at {metrics_var} ({metrics_port})")
            command = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            if len(command) != 2 or command[0] != "sleep":
                out.append(f"{at}: preStop is not a sleep")
                continue
            drain = float(setting(docs, c, "DOPD_DRAIN_GRACE_S") or 10.0)
            steps = DRAIN_GRACES[module_of(c)]
            need = float(command[1]) + steps * drain
            if spec.get("terminationGracePeriodSeconds", 30) < need:
                out.append(f"{at}: terminationGracePeriodSeconds < preStop + {steps} x DOPD_DRAIN_GRACE_S = {need:g}")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for name, svc in services.items():
        chosen = [w for w in workloads if selects(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        if len(chosen) != 1:
            out.append(f"Service/{name} selects {len(chosen)} workloads")
            continue
        ports = {p["name"] for c in pod_spec(chosen[0])["containers"] for p in c.get("ports", [])}
        out += [f"Service/{name}: targetPort {p['targetPort']} is no container port"
                for p in svc["spec"]["ports"] if p["targetPort"] not in ports]
    for name in ("dopd-gateway", "dopd-worker"):
        target = next((w for w in workloads if w["metadata"]["name"] == name), None)
        if target is None:
            out.append(f"no workload {name}")
            continue
        labels = target["spec"]["template"]["metadata"]["labels"]
        if not any(d["kind"] == "PodDisruptionBudget" and selects(d["spec"]["selector"]["matchLabels"], labels)
                   for d in docs):
            out.append(f"no PodDisruptionBudget for {name}")
    return out


def address_problems(docs: list[dict]) -> list[str]:
    """How services find each other: the planner and Redis by Service, workers by stable names."""
    out: list[str] = []
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    data = config_data(docs)
    for var, value in (("DOPD_PLANNER_ADDRESS", data["DOPD_PLANNER_ADDRESS"]),
                       ("DOPD_REDIS_URL", data["DOPD_REDIS_URL"].removeprefix("redis://").split("/")[0])):
        host, port = value.rsplit(":", 1)
        if host not in services or int(port) not in [p["port"] for p in services[host]["spec"]["ports"]]:
            out.append(f"{var}={value} is no Service port")
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    headless = services.get(sts["spec"]["serviceName"])
    if headless is None or headless["spec"].get("clusterIP") != "None" or \
            not headless["spec"].get("publishNotReadyAddresses"):
        out.append("the workers' serviceName is no headless Service publishing not-ready pods")
    worker = pod_spec(sts)["containers"][0]
    env = env_of(worker)
    if env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name" or \
            env.get("POD_NAMESPACE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != \
            "metadata.namespace":
        out.append("worker: POD_NAME/POD_NAMESPACE do not come from the downward API")
    advertised = f"$(POD_NAME).{sts['spec']['serviceName']}.$(POD_NAMESPACE).svc"
    if env.get("DOPD_ADVERTISE_HOST", {}).get("value") != advertised:
        out.append(f"worker: DOPD_ADVERTISE_HOST is not its stable name {advertised}")
    if env.get("DOPD_WORKER_ID", {}).get("value") != "$(POD_NAME)":
        out.append("worker: DOPD_WORKER_ID is not the pod name")
    planner = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "dopd-planner")
    if planner["spec"]["replicas"] != 1 or planner["spec"].get("strategy", {}).get("type") != "Recreate":
        out.append("the planner must be one replica, replaced with Recreate")
    return out


def gpus(container: dict) -> tuple[object, object]:
    res = container.get("resources", {})
    return res.get("requests", {}).get("nvidia.com/gpu"), res.get("limits", {}).get("nvidia.com/gpu")


# -- the tests --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: build(path) for name, path in KUSTOMIZATIONS.items()}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_every_document_is_valid(rendered, name, version):
    kinds = {d["kind"] for d in rendered[name]}
    assert {"ConfigMap", "Deployment", "StatefulSet", "Service", "PodDisruptionBudget"} <= kinds
    errors = []
    for doc in rendered[name]:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert errors == [], f"{name} is invalid for Kubernetes {version}"


def _broken(rendered) -> list[tuple[str, dict]]:
    deployment = next(d for d in rendered["gpu"] if d["kind"] == "Deployment"
                      and d["metadata"]["name"] == "dopd-gateway")
    unknown_field = copy.deepcopy(deployment)
    unknown_field["spec"]["replica"] = 3  # a typo: strict validation knows no such field
    named_grpc_port = copy.deepcopy(deployment)  # gRPC probes take a number, not a port name
    named_grpc_port["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    env_number = copy.deepcopy(deployment)
    env_number["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "X", "value": 1})
    pdb_object = copy.deepcopy(next(d for d in rendered["gpu"] if d["kind"] == "PodDisruptionBudget"))
    pdb_object["spec"]["maxUnavailable"] = {"count": 1}
    return [("unknown field", unknown_field), ("named grpc port", named_grpc_port),
            ("env value not a string", env_number), ("object for int-or-string", pdb_object)]


@pytest.mark.parametrize("case", range(4))
def test_an_invalid_document_is_rejected(rendered, case):
    what, doc = _broken(rendered)[case]
    for version in K8S_VERSIONS:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, version, strict=True)
            pytest.fail(f"{what}: accepted by {version}")


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_probes_drain_resources_pdbs_and_scraping(rendered, name):
    assert problems(rendered[name]) == []
    assert address_problems(rendered[name]) == []


def test_the_checks_catch_what_they_check(rendered):
    docs = copy.deepcopy(rendered["gpu"])
    gateway = next(d for d in docs if d["metadata"]["name"] == "dopd-gateway" and d["kind"] == "Deployment")
    worker = next(d for d in docs if d["kind"] == "StatefulSet")
    gw, wk = pod_spec(gateway)["containers"][0], pod_spec(worker)["containers"][0]
    gw["livenessProbe"] = {"tcpSocket": {"port": 50051}}
    del wk["lifecycle"]
    del wk["resources"]["requests"]["memory"]
    pod_spec(gateway)["terminationGracePeriodSeconds"] = 30
    gateway["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = "9999"
    docs = [d for d in docs if not (d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == "dopd-worker")]
    config_data(docs)["DOPD_DRAIN_GRACE_SECONDS"] = "10"
    found = "\n".join(problems(docs))
    for expected in ("dopd-gateway/gateway: livenessProbe is not a gRPC", "dopd-worker/worker: preStop",
                     "dopd-worker/worker: needs cpu and memory", "dopd-gateway/gateway: terminationGrace",
                     "dopd-gateway/gateway: scrape annotations", "no PodDisruptionBudget for dopd-worker",
                     "DOPD_DRAIN_GRACE_SECONDS is no setting"):
        assert expected in found, f"{expected!r} not reported in:\n{found}"
    env = wk["env"]
    env.insert(0, env.pop(next(i for i, e in enumerate(env) if e["name"] == "DOPD_ADVERTISE_HOST")))
    assert "DOPD_ADVERTISE_HOST uses $(POD_NAME) before it is defined" in "\n".join(problems(docs))


def test_gpu_overlay_gives_each_worker_one_gpu(rendered):
    for name, docs in rendered.items():
        for w in (d for d in docs if d["kind"] in WORKLOADS):
            for c in pod_spec(w)["containers"]:
                if name == "gpu" and w["kind"] == "StatefulSet":
                    assert [str(x) for x in gpus(c)] == ["1", "1"], f"{name}: {c['name']} gpus {gpus(c)}"
                    assert {"name": "models", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
                else:
                    assert gpus(c) == (None, None), f"{name}: {w['metadata']['name']} asks for a GPU"
    gpu = rendered["gpu"]
    assert config_data(gpu)["DOPD_DEVICE"] == "cuda"
    assert next(d for d in gpu if d["kind"] == "StatefulSet")["spec"]["replicas"] == 4


def test_overlays_set_namespace_images_and_replicas(rendered):
    for name, namespace in (("gpu", "dopd"), ("cpu", "dopd-dev")):
        docs = rendered[name]
        assert [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"] == [namespace]
        assert all(d["metadata"]["namespace"] == namespace for d in docs if d["kind"] != "Namespace")
        assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dopd" for d in docs
                   if d["kind"] != "Namespace")  # the overlay's own: the base's labels stay in the base
        images = {c["image"] for w in docs if w["kind"] in WORKLOADS for c in pod_spec(w)["containers"]}
        assert images == {"dopd-serving:latest", "redis:7"}
    replicas = {name: {d["metadata"]["name"]: d["spec"]["replicas"] for d in docs if d["kind"] in WORKLOADS}
                for name, docs in rendered.items()}
    assert replicas["gpu"]["dopd-gateway"] == 3 and replicas["cpu"]["dopd-gateway"] == 1
    assert replicas["base"]["dopd-gateway"] >= 2
    gateway_svc = next(d for d in rendered["gpu"] if d["kind"] == "Service" and d["metadata"]["name"] == "dopd-gateway")
    assert {p["port"] for p in gateway_svc["spec"]["ports"]} == {50051, 8000, 9101}


def test_renderer_strategic_merge_and_images():
    base = {"spec": {"containers": [{"name": "a", "image": "x", "env": [{"name": "A", "value": "1"}],
                                     "ports": [{"containerPort": 1}], "args": ["p", "q"]}],
                     "tolerations": [{"key": "k"}], "drop": 1}}
    patch = {"spec": {"containers": [{"name": "a", "env": [{"name": "A", "value": "2"}, {"name": "B", "value": "3"}],
                                      "ports": [{"containerPort": 2}], "args": ["r"]},
                                     {"name": "b", "image": "y"}],
                      "tolerations": [{"key": "t"}], "drop": None}}
    merged = strategic_merge(base, patch)
    assert merged == {"spec": {"containers": [
        {"name": "a", "image": "x", "env": [{"name": "A", "value": "2"}, {"name": "B", "value": "3"}],
         "ports": [{"containerPort": 1}, {"containerPort": 2}], "args": ["r"]},
        {"name": "b", "image": "y"}], "tolerations": [{"key": "t"}]}}
    assert split_image("reg.io:5000/team/dopd-serving:1.2") == ("reg.io:5000/team/dopd-serving", ":1.2")
    assert split_image("reg.io:5000/dopd-serving") == ("reg.io:5000/dopd-serving", "")
    assert split_image("dopd-serving@sha256:ab") == ("dopd-serving", "@sha256:ab")


@pytest.mark.parametrize(("pod", "initial", "role"), [
    ("dopd-worker-0", "2", "prefill"), ("dopd-worker-1", "2", "prefill"), ("dopd-worker-2", "2", "decode"),
    ("dopd-worker-0", "0", "decode"), ("dopd-worker-11", "2", "decode")])
def test_worker_initial_role_by_ordinal(rendered, pod, initial, role):
    worker = pod_spec(next(d for d in rendered["gpu"] if d["kind"] == "StatefulSet"))["containers"][0]
    shell, flag, script = worker["command"]
    assert (shell, flag) == ("/bin/sh", "-c") and "exec python -m services.worker" in script
    script = script.replace("exec python -m services.worker", 'echo "$DOPD_ROLE"')
    done = subprocess.run([shell, flag, script], env={"POD_NAME": pod, "INITIAL_PREFILL_WORKERS": initial},
                          capture_output=True, text=True, timeout=10, check=True)
    assert done.stdout.strip() == role

"""infra/helm/airflow-values.yaml and infra/k8s/serving.yaml cannot be installed here (no cluster):
check them statically. The chart's fields used below were read from the official chart's
values.schema.json (apache/airflow, chart/values.schema.json, Airflow 3 era); each entry is the
JSON type that schema gives the field."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_FIELDS = {
    "executor": str, "airflowVersion": str, "defaultAirflowTag": str,
    "images.airflow.repository": str, "images.airflow.tag": str, "images.airflow.pullPolicy": str,
    "postgresql.enabled": bool, "redis.enabled": bool, "statsd.enabled": bool,
    "data.metadataSecretName": str, "apiSecretKeySecretName": str, "jwtSecretName": str,
    "env": list, "secret": list, "volumes": list, "volumeMounts": list, "config": dict,
    "dags.persistence.enabled": bool, "dags.gitSync.enabled": bool,
    "logs.persistence.enabled": bool, "logs.persistence.size": str,
    "apiServer.replicas": int, "apiServer.resources": dict, "scheduler.replicas": int, "scheduler.resources": dict,
    "dagProcessor.enabled": bool, "dagProcessor.replicas": int, "triggerer.replicas": int,
    "workers.resources": dict, "extraConfigMaps": dict,
}
RESOURCE_KEYS = {"requests", "limits", "claims"}  # ResourceRequirements allows nothing else


def _leaves(values: dict, prefix: str = "") -> dict:
    """Dotted paths down to the fields the chart schema types (lists, config and resources are leaves)."""
    leaves = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in CHART_FIELDS:
            leaves.update(_leaves(value, path + "."))
        else:
            leaves[path] = value
    return leaves


def _values() -> dict:
    return yaml.safe_load((ROOT / "infra" / "helm" / "airflow-values.yaml").read_text())


def test_airflow_values_use_only_chart_fields_with_their_types():
    leaves = _leaves(_values())
    unknown = sorted(set(leaves) - set(CHART_FIELDS))
    assert not unknown, f"not fields of the official chart (typo?): {unknown}"
    for path, value in leaves.items():
        assert isinstance(value, CHART_FIELDS[path]), f"{path}: {type(value).__name__}"
        if path.endswith(".resources"):
            assert set(value) <= RESOURCE_KEYS, path


def test_airflow_runs_the_kubernetes_executor_from_the_project_image():
    values = _values()
    assert values["executor"] == "KubernetesExecutor"
    assert values["images"]["airflow"]["repository"] == "transformer-optimization/project"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["x-project-image"]["image"] == f"transformer-optimization/project:{values['images']['airflow']['tag']}"
    base = (ROOT / "infra" / "project" / "Dockerfile").read_text()
    assert f"FROM apache/airflow:{values['airflowVersion']}-python3.11" in base
    env = {item["name"]: item["value"] for item in values["env"]}
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["AIRFLOW__USAGE_DATA_COLLECTION__ENABLED"] == "False"
    assert all(set(item) == {"name", "value"} for item in values["env"])  # the chart allows nothing else here
    assert all({"envName", "secretName"} <= set(item) for item in values["secret"])
    # Task pods see the same volumes the serving manifest declares (and the GPU pod template, below).
    claims = {item["persistentVolumeClaim"]["claimName"] for item in values["volumes"]
              if "persistentVolumeClaim" in item}
    declared = {doc["metadata"]["name"] for doc in _serving() if doc["kind"] == "PersistentVolumeClaim"}
    assert claims == declared
    assert {(m["name"], m["mountPath"]) for m in values["volumeMounts"]} == {
        ("pipeline-data", "/data"), ("triton-models", "/models"), ("gpu-pod-template", "/opt/airflow/gpu-pod-template")}


def _serving() -> list[dict]:
    return [doc for doc in yaml.safe_load_all((ROOT / "infra" / "k8s" / "serving.yaml").read_text()) if doc]


def test_serving_manifest_wires_deployments_services_and_the_autoscaler():
    docs = _serving()
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    assert {("Deployment", "triton"), ("Service", "triton"), ("Service", "triton-replicas"), ("Deployment", "gateway"),
            ("Service", "gateway"), ("HorizontalPodAutoscaler", "gateway"), ("HorizontalPodAutoscaler", "triton")} <= kinds
    deployments = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Deployment"}
    for doc in docs:
        if doc["kind"] == "Service":
            selected = [d for d in deployments.values()
                        if doc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert len(selected) == 1, doc["metadata"]["name"]
            ports = {port["name"] for c in selected[0]["spec"]["template"]["spec"]["containers"]
                     for port in c.get("ports", [])}
            assert {port["targetPort"] for port in doc["spec"]["ports"]} <= ports
        if doc["kind"] == "HorizontalPodAutoscaler":
            target = doc["spec"]["scaleTargetRef"]
            assert target["kind"] == "Deployment" and target["name"] in deployments
            assert 1 <= doc["spec"]["minReplicas"] <= doc["spec"]["maxReplicas"]
    for name, deployment in deployments.items():
        assert deployment["spec"]["selector"]["matchLabels"].items() <= \
            deployment["spec"]["template"]["metadata"]["labels"].items(), name
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert ":" in container["image"] and not container["image"].endswith(":latest"), name
            assert container["readinessProbe"] and container["livenessProbe"], name
            assert container["resources"]["requests"], name
    # Triton in Kubernetes runs the same derived image and flags as in docker-compose.
    triton = deployments["triton"]["spec"]["template"]["spec"]["containers"][0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert triton["image"] == compose["x-triton"]["image"]
    assert "--model-control-mode=explicit" in triton["args"] and "--load-model=*" in triton["args"]


def test_triton_scales_out_and_promotions_reach_every_replica():
    """Promotions resolve the headless Service (one address per ready pod); a sidecar keeps each replica
    on the newest version written, with the flags the module really takes."""
    from serving import replica_sync
    from serving.triton_client import replica_urls

    docs = {(doc["kind"], doc["metadata"]["name"]): doc for doc in _serving()}
    assert docs[("Service", "triton-replicas")]["spec"]["clusterIP"] == "None"
    assert docs[("HorizontalPodAutoscaler", "triton")]["spec"]["minReplicas"] >= 2
    assert docs[("Deployment", "triton")]["spec"].get("strategy", {}).get("type") != "Recreate"
    values = yaml.safe_load((ROOT / "infra" / "helm" / "airflow-values.yaml").read_text())
    url = {item["name"]: item["value"] for item in values["env"]}["PIPELINE_TRITON_URL"]
    assert url == "dns:triton-replicas:8000"
    resolved = replica_urls(url, lambda host, port, family, kind: [(family, kind, 6, "", ("10.1.0.9", port))])
    assert resolved == ["10.1.0.9:8000"]
    containers = {c["name"]: c for c in docs[("Deployment", "triton")]["spec"]["template"]["spec"]["containers"]}
    sidecar = containers["model-sync"]
    assert sidecar["command"][:3] == ["python", "-m", "serving.replica_sync"]
    parser_calls = [replica_sync.parse_args(command[3:])
                    for command in (sidecar["command"], sidecar["readinessProbe"]["exec"]["command"])]
    assert [str(call.repository) for call in parser_calls] == ["/models", "/models"]
    assert parser_calls[1].once and {m["mountPath"] for m in sidecar["volumeMounts"]} == {"/models"}


def test_the_monitor_reads_each_gateway_and_triton_replica_on_its_own():
    """Through the load-balancing Services a scrape lands on any replica; the headless Services list
    one address per ready pod, and the monitor reads each one's /metrics."""
    from monitoring.monitor import metrics_urls

    docs = {(doc["kind"], doc["metadata"]["name"]): doc for doc in _serving()}
    headless = docs[("Service", "gateway-replicas")]["spec"]
    assert headless["clusterIP"] == "None" and headless["selector"] == docs[("Service", "gateway")]["spec"]["selector"]
    env = {item["name"]: item["value"] for item in yaml.safe_load(
        (ROOT / "infra" / "helm" / "airflow-values.yaml").read_text())["env"]}
    pods = {"gateway-replicas": ["10.1.0.4", "10.1.0.3"], "triton-replicas": ["10.1.0.9"]}

    def resolve(host, port, family, kind):
        return [(family, kind, 6, "", (address, port)) for address in pods[host]]
    assert metrics_urls(env["PIPELINE_GATEWAY_URL"], "gateway", resolve) == [
        "http://10.1.0.3:8090/metrics", "http://10.1.0.4:8090/metrics"]
    assert metrics_urls(env["PIPELINE_TRITON_METRICS_URL"], "Triton", resolve) == ["http://10.1.0.9:8002/metrics"]


def test_each_gateway_pod_keeps_its_prediction_journal_on_a_volume():
    docs = {(doc["kind"], doc["metadata"]["name"]): doc for doc in _serving()}
    pod = docs[("Deployment", "gateway")]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert mounts["prediction-journal"] == env["GATEWAY_JOURNAL_DIR"] and "emptyDir" in volumes["prediction-journal"]
    size_limit = volumes["prediction-journal"]["emptyDir"]["sizeLimit"]
    assert int(env["GATEWAY_JOURNAL_MAX_BYTES"]) < int(size_limit.removesuffix("Gi")) << 30


def test_the_reconcile_loop_runs_once_against_every_replica():
    """One writer follows the MLflow alias for all replicas (the headless Service), with the flags the
    module really takes, on the repository the promotions write (read-write)."""
    from tasks.reconcile import parse_args

    docs = {(doc["kind"], doc["metadata"]["name"]): doc for doc in _serving()}
    spec = docs[("Deployment", "reconcile")]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    container = spec["template"]["spec"]["containers"][0]
    loop, probe = (parse_args(command[3:], {}) for command in
                   (container["command"], container["readinessProbe"]["exec"]["command"]))
    assert container["command"][:3] == ["python", "-m", "tasks.reconcile"]
    assert (loop.triton, str(loop.repository), loop.once, probe.once) == ("dns:triton-replicas:8000", "/models",
                                                                          False, True)
    mount = container["volumeMounts"][0]
    assert mount["mountPath"] == "/models" and not mount.get("readOnly")
    claims = {volume["persistentVolumeClaim"]["claimName"] for volume in spec["template"]["spec"]["volumes"]}
    assert claims == {"triton-models"}


def test_the_pipeline_signs_in_to_mlflow_from_the_secret():
    """Airflow tasks through the connection mlflow_default, the reconcile loop through MLFLOW_TRACKING_*."""
    from tasks.settings import MLFLOW_CONNECTION_ID

    secrets = {item["envName"]: item for item in _values()["secret"]}
    connection = secrets[f"AIRFLOW_CONN_{MLFLOW_CONNECTION_ID.upper()}"]
    assert (connection["secretName"], connection["secretKey"]) == ("transformer-optimization", "mlflow-connection")
    docs = {(doc["kind"], doc["metadata"]["name"]): doc for doc in _serving()}
    env = {item["name"]: item for item in
           docs[("Deployment", "reconcile")]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_USERNAME"]["value"] == "pipeline"
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "transformer-optimization", "key": "mlflow-pipeline-password"}
    header = (ROOT / "infra" / "helm" / "airflow-values.yaml").read_text()
    assert "--from-literal=mlflow-connection=" in header and "--from-literal=mlflow-pipeline-password=" in header


# What the chart's helpers print (chart/templates/_helpers.yaml: the env helpers' lines start with two
# spaces and a newline, the mount helper's with "- "), so the GPU pod template's indentation can be
# checked without helm: `_render` applies `tpl`'s few constructs the template uses the way Go does.
def _chart_helpers(values: dict) -> dict[str, str]:
    custom = "\n  # Dynamically created environment variables" + "".join(
        f'\n  - name: {item["name"]}\n    value: "{item["value"]}"' for item in values["env"]) + "".join(
        f"\n  - name: {item['envName']}\n    valueFrom:\n      secretKeyRef:\n        name: {item['secretName']}"
        f"\n        key: {item['secretKey']}" for item in values["secret"])
    return {
        "standard_airflow_environment": "\n  # Hard Coded Airflow Envs\n  - name: AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"
                                        "\n    valueFrom:\n      secretKeyRef:\n        name: "
                                        f"{values['data']['metadataSecretName']}\n        key: connection",
        "custom_airflow_environment": custom,
        "airflow_config_mount": '- name: config\n  mountPath: "/opt/airflow/airflow.cfg"\n  subPath: airflow.cfg'
                                "\n  readOnly: true",
        "worker.serviceAccountName": "airflow-worker",
        "airflow_logs_volume_claim": "airflow-logs",
        "airflow_config": "airflow-config",
    }


def _render(template: str, values: dict) -> str:
    """Helm's tpl for `{{ .Release.Name }}`, `{{ include "x" . }}`, `| indent N`, `| nindent N` and
    `{{ toYaml .Values.x | nindent N }}`; `{{-` eats the whitespace before it, as in Go templates."""
    import re

    helpers = _chart_helpers(values)

    def action(match: re.Match) -> str:
        expr = match.group("expr")
        head, _, pipe = (part.strip() for part in expr.partition("|"))
        if head == ".Release.Name":
            text = "airflow"
        elif head.startswith("include "):
            text = helpers[re.fullmatch(r'include "([^"]+)" \.', head).group(1)]
        elif head.startswith("toYaml .Values."):
            text = yaml.safe_dump(values[head.removeprefix("toYaml .Values.")], sort_keys=False).rstrip("\n")
        else:
            raise AssertionError(f"not emulated: {expr}")
        if pipe:
            kind, width = pipe.split()
            text = ("\n" if kind == "nindent" else "") + " " * int(width) + text.replace("\n", "\n" + " " * int(width))
        return ("" if match.group("dash") else match.group("space")) + text

    return re.sub(r"(?P<space>\s*)\{\{(?P<dash>-?)\s*(?P<expr>.+?)\s*\}\}", action, template)


def _gpu_pod_template(values: dict) -> tuple[str, str, dict]:
    """(ConfigMap name, file name, the pod) of the GPU tasks' pod template, rendered as above."""
    ((name, config_map),) = values["extraConfigMaps"].items()
    ((filename, text),) = yaml.safe_load(_render(config_map["data"], values)).items()
    return name, filename, yaml.safe_load(text)


def test_gpu_tasks_get_a_pod_template_with_the_gpu_image_and_an_nvidia_gpu():
    values = _values()
    name, filename, pod = _gpu_pod_template(values)
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert pod["kind"] == "Pod" and pod["spec"]["restartPolicy"] == "Never"
    (base,) = pod["spec"]["containers"]
    assert base["name"] == "base"  # the container the KubernetesExecutor runs the task in
    gpu_image = compose["services"]["airflow-worker-gpu"]["image"]  # the TARGET=gpu build of infra/project/Dockerfile
    cpu_image = values["images"]["airflow"]
    assert base["image"] == gpu_image != f"{cpu_image['repository']}:{cpu_image['tag']}"
    assert base["resources"]["limits"]["nvidia.com/gpu"] == 1 and set(base["resources"]) <= RESOURCE_KEYS
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
    # It replaces the chart's worker template, so it carries what a task pod needs from it.
    env = {item["name"]: item for item in base["env"]}
    assert env["AIRFLOW__CORE__EXECUTOR"]["value"] == "LocalExecutor"
    assert {item["name"] for item in values["env"]} | {item["envName"] for item in values["secret"]} <= set(env)
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" in env
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in base["volumeMounts"]}
    assert set(volumes) == set(mounts) == {"logs", "config"} | {volume["name"] for volume in values["volumes"]}
    assert mounts["config"] == "/opt/airflow/airflow.cfg" and values["logs"]["persistence"]["enabled"]
    # PIPELINE_GPU_POD_TEMPLATE names this file where every Airflow pod (the scheduler too) mounts it.
    (template_volume,) = [volume for volume in values["volumes"] if "configMap" in volume]
    assert template_volume["configMap"]["name"] == name
    (template_mount,) = [mount for mount in values["volumeMounts"] if mount["name"] == template_volume["name"]]
    path = {item["name"]: item["value"] for item in values["env"]}["PIPELINE_GPU_POD_TEMPLATE"]
    assert path == f"{template_mount['mountPath']}/{filename}" and "subPath" not in template_mount


def test_the_pod_template_render_check_catches_bad_indentation():
    values = _values()
    config_map = next(iter(values["extraConfigMaps"].values()))
    helper = '"custom_airflow_environment" . | indent'
    broken = config_map["data"].replace(f"{helper} 8", f"{helper} 4")
    assert broken != config_map["data"]
    try:
        _, _, pod = _gpu_pod_template({**values, "extraConfigMaps": {"x": {"data": broken}}})
    except yaml.YAMLError:
        return
    assert "PIPELINE_GPU_POD_TEMPLATE" not in {item["name"] for item in pod["spec"]["containers"][0]["env"]}


def _kustomization(folder: str) -> dict:
    return yaml.safe_load((ROOT / "infra" / folder / "kustomization.yaml").read_text())


def test_the_gpu_serving_overlay_gives_each_triton_pod_an_nvidia_gpu():
    assert _kustomization("k8s")["resources"] == ["serving.yaml"]
    overlay = _kustomization("k8s-gpu")
    assert overlay["resources"] == ["../k8s"]
    (patch,) = overlay["patches"]
    assert patch["target"] == {"kind": "Deployment", "name": "triton"}
    spec = yaml.safe_load(patch["patch"])["spec"]["template"]["spec"]
    (triton,) = spec["containers"]
    assert triton["name"] == "triton" and triton["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    base = {c["name"] for c in next(doc for doc in _serving() if doc["kind"] == "Deployment"
                                     and doc["metadata"]["name"] == "triton")["spec"]["template"]["spec"]["containers"]}
    assert "triton" in base  # the patch merges into the container that exists


def _kubectl() -> str | None:
    import shutil

    return shutil.which("kubectl")


@pytest.mark.skipif(_kubectl() is None, reason="kubectl (kustomize) is not installed")
def test_the_gpu_overlay_renders_the_base_with_a_gpu_triton():
    import subprocess

    def render(folder: str) -> dict:
        out = subprocess.run([_kubectl(), "kustomize", str(ROOT / "infra" / folder)], check=True,
                             capture_output=True, text=True, timeout=120).stdout
        return {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(out) if doc}

    cpu, gpu = render("k8s"), render("k8s-gpu")
    assert cpu == {(doc["kind"], doc["metadata"]["name"]): doc for doc in _serving()}
    assert set(cpu) == set(gpu)
    assert {key for key in cpu if cpu[key] != gpu[key]} == {("Deployment", "triton")}
    pod = gpu[("Deployment", "triton")]["spec"]["template"]["spec"]
    triton = next(c for c in pod["containers"] if c["name"] == "triton")
    assert triton["resources"]["limits"] == {"memory": "8Gi", "nvidia.com/gpu": 1}
    assert triton["image"] == next(c for c in cpu[("Deployment", "triton")]["spec"]["template"]["spec"]["containers"]
                                   if c["name"] == "triton")["image"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    sidecar = next(c for c in pod["containers"] if c["name"] == "model-sync")
    assert "nvidia.com/gpu" not in sidecar["resources"].get("limits", {})

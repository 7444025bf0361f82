"""infra/helm/airflow-values.yaml and infra/k8s/serving.yaml cannot be installed here (no cluster):
check them statically. The chart's fields used below were read from the official chart's
values.schema.json (apache/airflow, chart/values.schema.json, Airflow 3 era); each entry is the
JSON type that schema gives the field."""

from pathlib import Path

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
    "workers.resources": dict,
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
    # Task pods see the same volumes the serving manifest declares.
    claims = {item["persistentVolumeClaim"]["claimName"] for item in values["volumes"]}
    declared = {doc["metadata"]["name"] for doc in _serving() if doc["kind"] == "PersistentVolumeClaim"}
    assert claims == declared
    assert {(m["name"], m["mountPath"]) for m in values["volumeMounts"]} == {("pipeline-data", "/data"),
                                                                          ("triton-models", "/models")}


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

"""docker-compose.yml cannot run here (no docker engine); check what can be checked statically."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_service_has_a_pinned_image_or_a_build():
    for name, service in _compose()["services"].items():
        image = service.get("image", "")
        assert service.get("build") or (image and ":" in image and not image.endswith(":latest")), name


def test_published_ports_bind_loopback_only():
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_telemetry_is_off_for_mlflow_and_airflow():
    services = _compose()["services"]
    for name in ("mlflow", "airflow-scheduler", "airflow-api-server"):
        env = services[name]["environment"]
        assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["DO_NOT_TRACK"] == "true", name


def test_long_running_services_have_health_checks_or_depend_on_them():
    services = _compose()["services"]
    for name in ("postgres", "mlflow", "triton", "airflow-api-server"):
        assert "healthcheck" in services[name], name


def test_no_secret_is_committed():
    text = (ROOT / "docker-compose.yml").read_text()
    assert "change-me" not in text
    assert "${POSTGRES_PASSWORD:?" in text
    assert (ROOT / ".env.example").exists()
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_gateway_replicas_sit_behind_nginx():
    services = _compose()["services"]
    gateway, nginx = services["gateway"], services["nginx"]
    assert gateway["deploy"]["replicas"] >= 2 and not gateway.get("ports")  # only reachable through nginx
    assert "serving.gateway:app_from_env" in gateway["command"]
    assert gateway["environment"]["GATEWAY_PREDICTION_LOG_URL"].startswith("postgresql")
    assert nginx["ports"] == ["127.0.0.1:8090:8090"] and "healthcheck" in nginx and "healthcheck" in gateway
    config = (ROOT / "infra" / "nginx" / "nginx.conf").read_text()
    assert "server gateway:8090 resolve" in config and "proxy_next_upstream" in config
    assert "./infra/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert "CREATE DATABASE predictions" in (ROOT / "infra" / "postgres" / "init.sql").read_text()


ONE_SHOT = {"airflow-init", "minio-init"}


def test_long_running_services_restart_and_have_health_checks():
    for name, service in _compose()["services"].items():
        if name in ONE_SHOT:
            assert service["restart"] == "no", name
            continue
        assert service.get("restart") == "unless-stopped", name
        check = service.get("healthcheck", {})
        assert check.get("test") and check.get("interval") and check.get("retries"), f"{name} has no health check"


def test_airflow_runs_the_celery_executor_with_redis_and_scalable_workers():
    services = _compose()["services"]
    for name in ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                 "airflow-worker"):
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://:${REDIS_PASSWORD:?"), name
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
    assert services["airflow-worker"]["command"] == ["celery", "worker"]
    assert services["airflow-worker"]["deploy"]["replicas"] >= 2
    # Workers and the scheduler see the same DAG data and the same Triton model repository.
    assert services["airflow-worker"]["volumes"] == services["airflow-scheduler"]["volumes"]


def test_mlflow_keeps_artifacts_in_minio_and_only_mlflow_holds_its_credentials():
    services = _compose()["services"]
    mlflow = services["mlflow"]
    assert "--artifacts-destination s3://mlflow" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert "mc mb --ignore-existing store/mlflow" in " ".join(services["minio-init"]["command"])
    assert "boto3" in (ROOT / "infra" / "mlflow" / "Dockerfile").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in services["airflow-worker"]["environment"]


def test_triton_runs_on_cpu_or_gpu_by_profile_from_the_derived_image():
    services = _compose()["services"]
    cpu, gpu = services["triton"], services["triton-gpu"]
    assert cpu["profiles"] == ["cpu"] and gpu["profiles"] == ["gpu"]
    assert cpu["build"]["context"] == gpu["build"]["context"] == "infra/triton"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "triton" in gpu["networks"]["default"]["aliases"]  # clients use one name either way
    dockerfile = (ROOT / "infra" / "triton" / "Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/tritonserver:24.10-py3" in dockerfile
    wanted = [line for line in (ROOT / "infra" / "triton" / "requirements.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    locked = (ROOT / "requirements-triton.lock").read_text().split()
    assert {"numpy==1.26.4", "tokenizers==0.23.3"} <= set(wanted) <= set(locked)
    gateway_needs = services["gateway"]["depends_on"]
    assert gateway_needs["triton"]["required"] is False and gateway_needs["triton-gpu"]["required"] is False


def test_every_required_variable_is_in_the_example_env_file():
    import re

    required = set(re.findall(r"\$\{([A-Z_]+):\?", (ROOT / "docker-compose.yml").read_text()))
    example = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
               if "=" in line and not line.startswith("#")}
    assert required and required <= example, required - example
    assert (ROOT / "infra" / "airflow" / "passwords.json.example").exists()
    assert "infra/airflow/passwords.json" in (ROOT / ".gitignore").read_text().split()


def test_named_volumes_are_declared():
    compose = _compose()
    used = {volume.split(":")[0] for service in compose["services"].values() for volume in service.get("volumes", [])
            if not volume.startswith(".")}
    assert used == set(compose["volumes"])


def test_prometheus_scrapes_services_that_exist_on_their_ports():
    compose = _compose()
    config = yaml.safe_load((ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"triton", "gateway", "airflow"} <= set(jobs)
    assert jobs["triton"]["static_configs"][0]["targets"] == ["triton:8002"]
    assert "127.0.0.1:8002:8002" in compose["services"]["triton"]["ports"]
    assert jobs["gateway"]["dns_sd_configs"][0] == {"names": ["gateway"], "type": "A", "port": 8090,
                                                    "refresh_interval": "30s"}
    assert jobs["airflow"]["static_configs"][0]["targets"] == ["statsd-exporter:9102"]
    airflow_env = compose["services"]["airflow-scheduler"]["environment"]
    assert airflow_env["AIRFLOW__METRICS__STATSD_HOST"] == "statsd-exporter"
    assert "/etc/prometheus/alerts.yml" in config["rule_files"]
    rules = yaml.safe_load((ROOT / "infra" / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    assert rules and all(rule["alert"] and rule["expr"] and rule["annotations"]["summary"] for rule in rules)


def test_grafana_is_provisioned_with_the_dashboard_the_builder_writes():
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("build_dashboard", ROOT / "infra" / "grafana" / "build_dashboard.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    committed = json.loads((ROOT / "infra" / "grafana" / "dashboards" / "serving.json").read_text())
    assert committed == builder.dashboard(), "run PYTHONPATH=. python infra/grafana/build_dashboard.py"
    titles = " ".join(panel["title"] for panel in committed["panels"]).lower()
    for wanted in ("latency", "throughput", "error rate", "utilization", "memory"):
        assert wanted in titles
    provider = yaml.safe_load((ROOT / "infra" / "grafana" / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load((ROOT / "infra" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    grafana = _compose()["services"]["grafana"]
    assert "./infra/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]


def test_the_project_image_is_stamped_with_the_code_version_compose_passes():
    build = _compose()["x-project-image"]["build"]
    assert build["args"]["CODE_VERSION"] == "${CODE_VERSION:-}"
    dockerfile = (ROOT / build["dockerfile"]).read_text()
    assert 'ARG CODE_VERSION=""' in dockerfile
    assert '> /opt/project/CODE_VERSION' in dockerfile  # beside tasks/, where tasks.lineage looks for it

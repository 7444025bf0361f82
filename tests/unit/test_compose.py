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
    # Each replica's prediction journal on its own volume, made in the image (owned by its user).
    assert gateway["volumes"] == [gateway["environment"]["GATEWAY_JOURNAL_DIR"]]
    assert f"mkdir -p {gateway['volumes'][0]}" in (ROOT / "infra" / "project" / "Dockerfile").read_text()
    assert nginx["ports"] == ["127.0.0.1:8090:8090"] and "healthcheck" in nginx and "healthcheck" in gateway
    config = (ROOT / "infra" / "nginx" / "nginx.conf").read_text()
    assert "server gateway:8090 resolve" in config and "proxy_next_upstream" in config
    assert "./infra/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert "CREATE DATABASE predictions" in (ROOT / "infra" / "postgres" / "init.sql").read_text()


ONE_SHOT = {"airflow-init", "minio-init", "mlflow-accounts"}


def test_long_running_services_restart_and_have_health_checks():
    for name, service in _compose()["services"].items():
        if name in ONE_SHOT:
            assert service["restart"] == "no", name
            continue
        assert service.get("restart") == "unless-stopped", name
        check = service.get("healthcheck", {})
        assert check.get("test") and check.get("interval") and check.get("retries"), f"{name} has no health check"


def test_the_reconcile_loop_follows_the_alias_on_the_shared_repository():
    """The loop's command and health check parse with the flags the module takes, on the repository
    volume the Airflow workers promote to."""
    from tasks.reconcile import parse_args

    service = _compose()["services"]["reconcile"]
    loop = parse_args(service["command"][3:], {})
    probe = parse_args(service["healthcheck"]["test"][4:], {})
    assert (loop.mlflow, loop.triton, str(loop.repository), loop.once, probe.once) == (
        "http://mlflow:5000", "triton:8000", "/models", False, True)
    assert "triton-models:/models" in service["volumes"]


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


def test_mlflow_refuses_anonymous_users_and_the_pipeline_signs_in_with_its_own_account():
    import configparser
    import json

    from opsctl.mlflow_auth import auth_config, build_parser
    from tasks.settings import MLFLOW_CONNECTION_ID

    services = _compose()["services"]
    mlflow = services["mlflow"]
    assert mlflow["command"].startswith("mlflow server --app-name basic-auth ")
    assert mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == "${MLFLOW_AUTH_ADMIN_PASSWORD:?set in .env}"
    assert mlflow["environment"]["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${MLFLOW_FLASK_SERVER_SECRET_KEY:?")
    # The image carries the config the stack writes (NO_PERMISSIONS), its users on a volume, and Flask-WTF.
    ini = (ROOT / "infra" / "mlflow" / "basic_auth.ini").read_text()
    assert ini == auth_config("sqlite:////mlflow-auth/basic_auth.db")
    parsed = configparser.ConfigParser()
    parsed.read_string(ini)
    assert parsed["mlflow"]["default_permission"] == "NO_PERMISSIONS" and "admin_password" not in parsed["mlflow"]
    assert "mlflow-auth:/mlflow-auth" in mlflow["volumes"]
    dockerfile = (ROOT / "infra" / "mlflow" / "Dockerfile").read_text()
    assert "MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini" in dockerfile
    locked = (ROOT / "requirements.lock").read_text().split()
    assert "COPY basic_auth.ini /etc/mlflow/basic_auth.ini" in dockerfile
    assert all(pin in locked and pin in dockerfile for pin in ("Flask-WTF==1.3.0", "WTForms==3.3.2"))
    # The accounts are made once MLflow is healthy; whoever talks to MLflow waits for them.
    accounts = services["mlflow-accounts"]
    assert accounts["command"][:3] == ["python", "-m", "opsctl.mlflow_auth"]
    parsed_args = build_parser().parse_args(accounts["command"][3:])
    # The reviewer may move the aliases of each served model's registered model.
    assert (parsed_args.url, parsed_args.registered_models) == ("http://mlflow:5000",
                                                                ["text-classifier", "topic-classifier"])
    assert accounts["depends_on"]["mlflow"]["condition"] == "service_healthy"
    for name in ("reconcile", "airflow-worker", "airflow-scheduler"):
        assert services[name]["depends_on"]["mlflow-accounts"]["condition"] == "service_completed_successfully", name
    # Airflow tasks read the pipeline's account from the connection; the reconcile loop from its environment.
    connection = json.loads(services["airflow-worker"]["environment"][f"AIRFLOW_CONN_{MLFLOW_CONNECTION_ID.upper()}"])
    assert connection == {"conn_type": "http", "host": "http://mlflow:5000", "login": "pipeline",
                          "password": "${PIPELINE_MLFLOW_PASSWORD:?set in .env}"}
    reconcile = services["reconcile"]["environment"]
    assert (reconcile["MLFLOW_TRACKING_USERNAME"], reconcile["MLFLOW_TRACKING_PASSWORD"]) == (
        "pipeline", "${PIPELINE_MLFLOW_PASSWORD:?set in .env}")
    assert accounts["environment"]["PIPELINE_MLFLOW_PASSWORD"] == reconcile["MLFLOW_TRACKING_PASSWORD"]


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


def test_the_monitor_reads_each_gateway_replica_on_its_own():
    """Docker's DNS gives one address per replica of the scaled gateway (as Prometheus finds them);
    through nginx the monitor's scrapes would land on any replica and mix their counters."""
    from monitoring.monitor import metrics_urls

    compose = _compose()
    url = compose["services"]["airflow-scheduler"]["environment"]["PIPELINE_GATEWAY_URL"]
    assert url == "dns:gateway:8090"
    addresses = {"gateway": ["172.18.0.7", "172.18.0.6"]}
    resolved = metrics_urls(url, "gateway", lambda host, port, family, kind: [
        (family, kind, 6, "", (address, port)) for address in addresses[host]])
    assert resolved == ["http://172.18.0.6:8090/metrics", "http://172.18.0.7:8090/metrics"]


def test_named_volumes_are_declared():
    compose = _compose()
    # Bind mounts (./...) and anonymous volumes (/...) need no declaration.
    used = {volume.split(":")[0] for service in compose["services"].values() for volume in service.get("volumes", [])
            if not volume.startswith((".", "/"))}
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


# The GPU target (docs/gpu.md). An engine loads only in the TensorRT it was built with, so the GPU
# image pins the TensorRT of the Triton release that serves it: Triton 24.10 (nvcr.io/nvidia/
# tritonserver:24.10-py3) ships TensorRT 10.5.0.18 (NVIDIA Frameworks Support Matrix, 24.10), whose
# pip release is tensorrt-cu12 10.5.0. Add a row here when infra/triton/Dockerfile moves.
TRITON_TENSORRT = {"24.10": "10.5.0"}
GPU_QUEUE = "${PIPELINE_GPU_QUEUE:-}"


def _dockerfile_stages(path: Path) -> dict[str, list[str]]:
    """Instructions (continuation lines joined, comments dropped) per stage; unnamed stages by index."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip("\\").strip() + " " if raw.endswith("\\") else raw.strip()
        if not raw.endswith("\\"):
            lines.append(current)
            current = ""
    stages: dict[str, list[str]] = {"<global>": []}
    name = "<global>"
    for line in lines:
        if line.startswith("FROM "):
            parts = line.split()
            name = parts[3] if len(parts) == 4 and parts[2].upper() == "AS" else f"<stage {len(stages)}>"
            stages[name] = []
        stages[name].append(line)
    return stages


def _interpolate(text: str, env: dict[str, str]) -> str:
    """docker compose's ${VAR:-default}: the default when VAR is unset or empty."""
    import re

    return re.sub(r"\$\{([A-Z_]+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), text)


def test_the_cpu_image_is_unchanged_by_default():
    stages = _dockerfile_stages(ROOT / "infra" / "project" / "Dockerfile")
    assert stages["<global>"] == ["ARG TARGET=cpu"]
    final = stages[list(stages)[-1]]
    assert final[0] == "FROM deps-${TARGET}"
    assert stages["airflow-base"][0] == "FROM apache/airflow:3.3.2-python3.11 AS airflow-base"
    assert stages["deps-cpu"] == [
        "FROM airflow-base AS deps-cpu",
        "RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu "
        "-r /opt/project/requirements.lock"]
    cpu_build = " ".join(stages["airflow-base"] + stages["deps-cpu"] + final)
    for gpu_only in ("tensorrt", "onnxruntime-gpu", "nvidia", "TARGET=gpu"):
        assert gpu_only not in cpu_build, gpu_only
    # Every service on the project image builds the default (cpu) target; only the GPU worker asks for gpu.
    compose = _compose()
    assert "TARGET" not in compose["x-project-image"]["build"]["args"]
    for name, service in compose["services"].items():
        if service.get("build", {}).get("dockerfile") == "infra/project/Dockerfile":
            target = service["build"].get("args", {}).get("TARGET", "cpu")
            assert target == ("gpu" if name == "airflow-worker-gpu" else "cpu"), name


def test_the_gpu_image_builds_engines_with_the_tensorrt_triton_serves():
    import re

    triton_from = (ROOT / "infra" / "triton" / "Dockerfile").read_text()
    release = re.search(r"^FROM nvcr\.io/nvidia/tritonserver:(\d+\.\d+)-py3$", triton_from, re.M).group(1)
    stages = _dockerfile_stages(ROOT / "infra" / "project" / "Dockerfile")
    gpu = stages["deps-gpu"]
    assert gpu[0] == "FROM airflow-base AS deps-gpu"
    assert f"ARG TENSORRT_VERSION={TRITON_TENSORRT[release]}" in gpu
    (trt_install,) = [line for line in gpu if "tensorrt-cu12==" in line]
    assert trt_install.startswith("RUN pip install --no-cache-dir --extra-index-url https://pypi.nvidia.com ")
    for dist in ("tensorrt-cu12", "tensorrt-cu12-libs", "tensorrt-cu12-bindings"):
        assert f'"{dist}==${{TENSORRT_VERSION}}"' in trt_install, dist
    assert "ENV PIPELINE_TRITON_TENSORRT=${TENSORRT_VERSION}" in gpu
    # CUDA torch: requirements.lock from PyPI (its Linux torch wheel is the CUDA build), never the CPU index.
    assert not any("download.pytorch.org/whl/cpu" in line for line in gpu)
    # onnxruntime-gpu takes the place of onnxruntime (one `onnxruntime` module): apply the stage's sed.
    (lock_install,) = [line for line in gpu if "requirements-gpu.lock" in line and line.startswith("RUN sed")]
    pattern, replacement = re.search(r'"s/(.+?)/(.+?)/"', lock_install).groups()
    ort_gpu = re.search(r"^ARG ONNXRUNTIME_GPU_VERSION=(.+)$", "\n".join(gpu), re.M).group(1)
    replacement = replacement.replace("${ONNXRUNTIME_GPU_VERSION}", ort_gpu)
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    gpu_lock = [re.sub(pattern, replacement, line) for line in lock]
    changed = [(old, new) for old, new in zip(lock, gpu_lock) if old != new]
    (old_line, new_line), = changed
    assert old_line.startswith("onnxruntime==") and new_line == f"onnxruntime-gpu[cuda,cudnn]=={ort_gpu}"
    assert old_line.split("==")[1].split(".")[0] == ort_gpu.split(".")[0]  # same major release
    assert "pip install --no-cache-dir -r /tmp/requirements-gpu.lock" in lock_install
    assert any(line.startswith("torch==") for line in gpu_lock)


def test_the_gpu_profile_runs_a_gpu_worker_and_triton_on_an_nvidia_gpu():
    compose = _compose()
    services = compose["services"]
    worker, triton, cpu_worker = services["airflow-worker-gpu"], services["triton-gpu"], services["airflow-worker"]
    assert worker["profiles"] == triton["profiles"] == ["gpu"]
    (worker_gpu,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert worker_gpu == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    (triton_gpu,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert triton_gpu["driver"] == "nvidia" and triton_gpu["capabilities"] == ["gpu"]
    # Built from the GPU variant of the project image, under its own name, with the same code stamp.
    cpu_build = compose["x-project-image"]["build"]
    assert worker["build"]["dockerfile"] == cpu_build["dockerfile"] and worker["build"]["context"] == "."
    assert worker["build"]["args"] == {"TARGET": "gpu", "CODE_VERSION": cpu_build["args"]["CODE_VERSION"]}
    cpu_image = compose["x-project-image"]["image"]
    assert worker["image"] == cpu_image.replace("/project:", "/project-gpu:") != cpu_image
    # It consumes only the GPU queue, one task at a time (evaluate times candidates on the GPU).
    assert worker["command"] == ["celery", "worker", "--queues", "${PIPELINE_GPU_QUEUE:-gpu}", "--concurrency", "1"]
    assert "--queues" not in cpu_worker["command"] and "profiles" not in cpu_worker  # the default queue
    # Otherwise an Airflow worker like the others: same settings, volumes and health check.
    assert worker["environment"] == cpu_worker["environment"]
    assert worker["volumes"] == cpu_worker["volumes"] == services["airflow-scheduler"]["volumes"]
    assert worker["healthcheck"] == cpu_worker["healthcheck"] and worker["restart"] == "unless-stopped"
    assert worker["depends_on"] == cpu_worker["depends_on"]


def test_gpu_tasks_leave_the_default_queue_only_when_the_env_file_says_so():
    import re

    compose = _compose()
    airflow = [name for name, service in compose["services"].items()
               if service.get("environment", {}).get("AIRFLOW__CORE__EXECUTOR") == "CeleryExecutor"]
    assert {"airflow-scheduler", "airflow-dag-processor", "airflow-worker", "airflow-worker-gpu"} <= set(airflow)
    for name in airflow:
        assert compose["services"][name]["environment"]["PIPELINE_GPU_QUEUE"] == GPU_QUEUE, name
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if "=" in line and not line.startswith("#"))
    assert example["PIPELINE_GPU_QUEUE"] == "" and example["COMPOSE_PROFILES"] == "cpu"
    queue_arg = compose["services"]["airflow-worker-gpu"]["command"][3]
    # The example env file: GPU tasks stay on the default queue (no GPU worker there to wait for).
    assert _interpolate(GPU_QUEUE, example) == ""
    # The gpu profile's settings: the DAG's GPU queue is the one the GPU worker consumes.
    gpu_env = {**example, "COMPOSE_PROFILES": "gpu", "PIPELINE_GPU_QUEUE": "gpu"}
    assert _interpolate(GPU_QUEUE, gpu_env) == _interpolate(queue_arg, gpu_env) == "gpu"
    header = (ROOT / "docker-compose.yml").read_text().split("\nname:")[0]
    assert re.search(r"COMPOSE_PROFILES=gpu and PIPELINE_GPU_QUEUE=gpu", header)

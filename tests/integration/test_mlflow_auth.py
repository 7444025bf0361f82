"""MLflow with authentication as the local stack runs it: the basic-auth app started from the stack's own
spec on a free port, the accounts made by the stack's provisioning, and what each one may do.

Who may move the alias: a reviewer account moves ``champion`` on the model the pipeline registered;
anonymous requests and wrong passwords are refused."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from collections.abc import Iterator

import pytest
import requests

from opsctl import mlflow_auth
from opsctl.process import ProcessManager, ServiceError, free_port
from opsctl.services import base_environment, mlflow_secrets, mlflow_spec, provision_mlflow_accounts
from opsctl.settings import StackSettings
from tasks import model_aliases
from tasks.errors import RegistryAccessDenied

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StackSettings, dict[str, str], list[str]]]:
    """The stack's MLflow with authentication (settings, its credentials, the accounts its first start made)."""
    settings = StackSettings(home=tmp_path_factory.mktemp("auth-stack"), mlflow_port=free_port())
    secrets = mlflow_secrets(settings)
    spec = mlflow_spec(settings, base_environment(settings, os.environ), secrets)
    manager = ProcessManager(settings.pids_dir, settings.logs_dir)
    manager.start(spec)
    try:
        manager.wait_healthy(spec, timeout_s=120)
        yield settings, secrets, provision_mlflow_accounts(settings, secrets)
    finally:
        manager.stop("mlflow", stop_signal=signal.SIGTERM)  # its job runner lingers 30 s after SIGINT


@contextlib.contextmanager
def signed_in(username: str, password: str) -> Iterator[None]:
    """MLflow clients in this process send these credentials (they read the variables on each request)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", username)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        yield


@pytest.fixture(scope="module")
def registered(stack, tmp_path_factory) -> tuple[str, str]:
    """As the pipeline: a run with an artifact, registered as versions 1 and 2; champion on 1."""
    import mlflow

    settings, secrets, _ = stack
    model, url = settings.registered_model, settings.mlflow_url
    with signed_in(mlflow_auth.PIPELINE, secrets[mlflow_auth.PIPELINE]):
        client = model_aliases.mlflow_client(url)
        run = client.create_run(client.create_experiment("auth-test"))
        files = tmp_path_factory.mktemp("model")
        (files / "model.onnx").write_bytes(b"not really a model")
        client.log_artifacts(run.info.run_id, str(files), "model")
        client.create_registered_model(model)
        versions = [client.create_model_version(model, f"runs:/{run.info.run_id}/model", run.info.run_id).version
                    for _ in range(2)]
        model_aliases.set_alias(url, model, "champion", str(versions[0]))
        assert mlflow.get_tracking_uri() == url
    return run.info.run_id, str(versions[1])


def test_anonymous_requests_read_nothing_and_change_nothing(stack):
    settings, _, created = stack
    assert created == [mlflow_auth.PIPELINE, mlflow_auth.REVIEWER]
    url = settings.mlflow_url
    assert requests.get(f"{url}/api/2.0/mlflow/registered-models/search", timeout=10).status_code == 401
    assert requests.get(f"{url}/api/2.0/mlflow/experiments/search", params={"max_results": 10},
                        timeout=10).status_code == 401
    created_anonymously = requests.post(f"{url}/api/2.0/mlflow/experiments/create", json={"name": "x"}, timeout=10)
    assert created_anonymously.status_code == 401
    assert requests.get(f"{url}/health", timeout=10).status_code == 200  # health checks need no account


def test_a_wrong_password_is_refused_and_said_so(stack, registered):
    from mlflow.exceptions import MlflowException

    settings, _, _ = stack
    with signed_in(mlflow_auth.REVIEWER, "not-the-reviewer-password"):
        with pytest.raises(MlflowException) as refused:
            model_aliases.mlflow_client(settings.mlflow_url).get_registered_model(settings.registered_model)
        assert refused.value.get_http_status_code() == 401
        # "no champion" would be a lie: the reconcile loop and opsctl say the credentials were refused.
        with pytest.raises(RegistryAccessDenied, match="refused the credentials"):
            model_aliases.alias_version(settings.mlflow_url, settings.registered_model, "champion")


def test_the_pipeline_records_runs_and_moves_deletes_and_tags(stack, registered):
    settings, secrets, _ = stack
    url, model = settings.mlflow_url, settings.registered_model
    run_id, version = registered
    with signed_in(mlflow_auth.PIPELINE, secrets[mlflow_auth.PIPELINE]):
        client = model_aliases.mlflow_client(url)
        client.log_metric(run_id, "accuracy", 0.9)
        model_aliases.tag_version(url, model, version, {"approval": "pending"})
        model_aliases.set_alias(url, model, "challenger", version)
        model_aliases.delete_alias(url, model, "challenger")
        model_aliases.delete_version_tag(url, model, version, "approval")
        assert model_aliases.alias_version(url, model, "challenger") is None
        assert "approval" not in model_aliases.version_tags(url, model, version)
        assert model_aliases.alias_version(url, model, "no-such-alias") is None


def test_the_reviewer_moves_the_alias_and_changes_nothing_else(stack, registered):
    from mlflow.exceptions import MlflowException

    settings, secrets, _ = stack
    url, model = settings.mlflow_url, settings.registered_model
    run_id, version = registered
    with signed_in(mlflow_auth.REVIEWER, secrets[mlflow_auth.REVIEWER]):
        client = model_aliases.mlflow_client(url)
        client.set_registered_model_alias(model, "champion", version)  # what approving in the UI does
        assert model_aliases.alias_version(url, model, "champion") == version
        model_aliases.tag_version(url, model, version, {"rejected": "a reviewer may also reject"})
        assert client.get_run(run_id).data.metrics.get("accuracy") is not None  # reads the runs
        for change in (lambda: client.log_param(run_id, "touched", "yes"),
                       lambda: client.delete_registered_model_alias(model, "champion")):
            with pytest.raises(MlflowException) as denied:
                change()
            assert denied.value.get_http_status_code() == 403
    with signed_in(mlflow_auth.PIPELINE, secrets[mlflow_auth.PIPELINE]):
        assert model_aliases.alias_version(url, model, "champion") == version  # the pipeline sees the move


def test_secrets_stay_owner_only_out_of_the_logs_and_a_restart_makes_no_accounts(stack):
    settings, secrets, _ = stack
    path = settings.mlflow_credentials_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert mlflow_secrets(settings) == secrets  # kept across restarts
    assert "NO_PERMISSIONS" in settings.mlflow_auth_config.read_text()
    assert not any(secret in settings.mlflow_auth_config.read_text() for secret in secrets.values())
    log = (settings.logs_dir / "mlflow.log").read_text(errors="replace")
    assert "basic-auth" in log and not any(secret in log for secret in secrets.values())
    assert provision_mlflow_accounts(settings, secrets) == []


def test_an_admin_password_that_no_longer_matches_says_what_to_do(stack):
    settings, secrets, _ = stack
    with pytest.raises(ServiceError, match="refused the admin password.*mlflow-credentials.json.*basic_auth.db"):
        provision_mlflow_accounts(settings, secrets | {"admin": "not-the-admin-password"})

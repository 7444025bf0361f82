"""MLflow registered-model aliases and version tags: which version is the champion, and moving it.

Shared by the registry step (which records runs and versions) and promotion (which moves aliases).
"""

from __future__ import annotations

from tasks.errors import RegistryAccessDenied


def mlflow_client(tracking_uri: str):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.MlflowClient(tracking_uri)


def set_alias(tracking_uri: str, registered_model: str, alias: str, version: str) -> None:
    mlflow_client(tracking_uri).set_registered_model_alias(registered_model, alias, version)


def alias_version(tracking_uri: str, registered_model: str, alias: str) -> str | None:
    """The version ``alias`` names; None when there is no such alias or model (MLflow with authentication
    answers 403 for a model that does not exist). Refused credentials are an error, not "no alias"."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
    try:
        return str(client.get_model_version_by_alias(registered_model, alias).version)  # an int from a SQL store
    except Exception as error:  # noqa: BLE001 - MLflow raises RestException for "no such alias/model"
        if isinstance(error, MlflowException) and error.get_http_status_code() == 401:
            raise RegistryAccessDenied(
                f"MLflow at {tracking_uri} refused the credentials (401): set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD to the pipeline's account (docs/configuration.md, MLflow accounts)") from None
        return None


def delete_alias(tracking_uri: str, registered_model: str, alias: str) -> None:
    mlflow_client(tracking_uri).delete_registered_model_alias(registered_model, alias)


def delete_version_tag(tracking_uri: str, registered_model: str, version: str, key: str) -> None:
    """Remove a version tag if it is there."""
    client = mlflow_client(tracking_uri)
    if key in client.get_model_version(registered_model, version).tags:
        client.delete_model_version_tag(registered_model, version, key)


def tag_version(tracking_uri: str, registered_model: str, version: str, tags: dict[str, str]) -> None:
    client = mlflow_client(tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, version, key, value)


def version_tags(tracking_uri: str, registered_model: str, version: str) -> dict[str, str]:
    return dict(mlflow_client(tracking_uri).get_model_version(registered_model, version).tags)


def alias_tags(tracking_uri: str, registered_model: str, alias: str) -> tuple[str, dict[str, str]] | None:
    """The version ``alias`` points at, with that version's tags (None: no such alias or model)."""
    version = alias_version(tracking_uri, registered_model, alias)
    return None if version is None else (version, version_tags(tracking_uri, registered_model, version))

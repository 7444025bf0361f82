"""MLflow with authentication (its basic-auth app): the configuration, the accounts, what each may do.

With ``default_permission = NO_PERMISSIONS`` a request without valid credentials is refused (401)
and an account reads or changes only what it was granted (403 otherwise). Besides ``admin``:

- ``pipeline``: every process of the pipeline (Airflow tasks through the Airflow connection
  ``mlflow_default``, the reconcile loop, opsctl). MANAGE on every experiment and registered model:
  it creates experiments, runs, registered models and versions, moves and deletes aliases, sets and
  deletes tags.
- ``reviewer``: a person who decides what serves. READ on every experiment and registered model;
  EDIT on the registered models serving follows (one per served model), which lets it move their
  aliases (approve a challenger, roll back by hand) and tag their versions (``rejected``). It deletes
  nothing.

MLflow's permissions do not single out aliases: EDIT on the model also lets the reviewer change its
descriptions and tags. Any signed-in account may create a new experiment or registered model (MLflow
gives its creator MANAGE on it); nobody else sees it until granted.

``python -m opsctl.mlflow_auth --url URL --registered-model NAME [--registered-model NAME ...]`` sets the accounts up on a running
server (docker-compose's one-shot ``mlflow-accounts``): passwords from ``MLFLOW_AUTH_ADMIN_PASSWORD``,
``PIPELINE_MLFLOW_PASSWORD`` and ``PIPELINE_MLFLOW_REVIEWER_PASSWORD``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from tasks.settings import MLFLOW_CONNECTION_ID

ADMIN = "admin"
PIPELINE = "pipeline"
REVIEWER = "reviewer"
# The keys of the stack's credentials file: one password per account, and the key that signs the UI's
# CSRF tokens (MLflow needs the same one across restarts and workers).
SECRET_NAMES = (ADMIN, PIPELINE, REVIEWER, "flask_secret_key")

# The basic-auth app's REST API (MLflow 3.17: users under 2.0, the unified permission grants under 3.0).
CREATE_USER = "/api/2.0/mlflow/users/create"
GET_USER = "/api/2.0/mlflow/users/get"
GRANT_PERMISSION = "/api/3.0/mlflow/users/permissions/grant"


class AuthSetupError(RuntimeError):
    """MLflow's accounts could not be set up; the message says why."""


@dataclass(frozen=True)
class Grant:
    resource_type: str  # experiment | registered_model
    resource_id: str  # a registered model's name, or "*" for every one
    permission: str  # READ | EDIT | MANAGE


def account_grants(registered_models: Sequence[str]) -> dict[str, tuple[Grant, ...]]:
    """What each account may do; ``registered_models`` are those whose aliases the reviewer moves (one per
    served model)."""
    return {
        PIPELINE: (Grant("experiment", "*", "MANAGE"), Grant("registered_model", "*", "MANAGE")),
        REVIEWER: (Grant("experiment", "*", "READ"), Grant("registered_model", "*", "READ"),
                   *(Grant("registered_model", name, "EDIT") for name in registered_models)),
    }


def auth_config(database_url: str) -> str:
    """The basic-auth app's ini file. No secret in it: the admin password is passed by environment.

    A checked password is remembered for 5 minutes: without that cache every request pays a scrypt hash
    (about a second on a busy 2-core machine, and a pipeline run makes hundreds of MLflow calls). A
    password changed through MLflow's API takes effect at once on the worker that changed it (the stack
    runs one worker)."""
    return ("[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = {database_url}\n"
            f"admin_username = {ADMIN}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 300\n")


def server_environment(config_path: Path, admin_password: str, secret_key: str) -> dict[str, str]:
    """What ``mlflow server --app-name basic-auth`` reads: its config, the first admin password, the CSRF key."""
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config_path), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key}


def client_environment(username: str, password: str) -> dict[str, str]:
    """The variables every MLflow client reads its credentials from (on each request)."""
    return {"MLFLOW_TRACKING_USERNAME": username, "MLFLOW_TRACKING_PASSWORD": password}


def airflow_connection_environment(url: str, username: str, password: str) -> dict[str, str]:
    """The Airflow connection ``mlflow_default`` as an ``AIRFLOW_CONN_*`` variable (Airflow's JSON form)."""
    value = json.dumps({"conn_type": "http", "host": url, "login": username, "password": password})
    return {f"AIRFLOW_CONN_{MLFLOW_CONNECTION_ID.upper()}": value}


def stack_client_environment(credentials_file: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The pipeline account's credentials from the local stack's credentials file, for opsctl's own MLflow
    calls; {} when the caller chose an account (``MLFLOW_TRACKING_USERNAME`` set) or there is no file
    (MLflow without authentication, or never started)."""
    if environ.get("MLFLOW_TRACKING_USERNAME") or not credentials_file.exists():
        return {}
    password = json.loads(credentials_file.read_text()).get(PIPELINE)
    return client_environment(PIPELINE, password) if password else {}


def provision_accounts(url: str, admin_password: str, passwords: Mapping[str, str], registered_models: Sequence[str],
                       timeout_s: float = 10.0) -> list[str]:
    """Create the accounts that do not exist yet and grant each what it may do (idempotent).

    Returns the names of the accounts created now. An existing account keeps its password.
    """
    session = requests.Session()
    session.auth = (ADMIN, admin_password)
    created = []
    for username, grants in account_grants(registered_models).items():
        found = _call(session, "GET", url + GET_USER, timeout_s, params={"username": username})
        if "RESOURCE_DOES_NOT_EXIST" in found.text:
            _expect_ok(_call(session, "POST", url + CREATE_USER, timeout_s,
                             json={"username": username, "password": passwords[username]}), f"create {username}")
            created.append(username)
        else:
            _expect_ok(found, f"look up {username}")
        for grant in grants:
            response = _call(session, "POST", url + GRANT_PERMISSION, timeout_s,
                             json={"username": username, "resource_type": grant.resource_type,
                                   "resource_id": grant.resource_id, "permission": grant.permission})
            if "RESOURCE_ALREADY_EXISTS" not in response.text:  # granted at an earlier start
                _expect_ok(response, f"grant {username} {grant.permission} on {grant.resource_type} "
                                     f"{grant.resource_id}")
    return created


def _call(session: requests.Session, method: str, url: str, timeout_s: float, **kwargs) -> requests.Response:
    try:
        response = session.request(method, url, timeout=timeout_s, **kwargs)
    except requests.RequestException as error:
        raise AuthSetupError(f"could not reach MLflow at {url}: {error}") from None
    if response.status_code == 401:
        raise AuthSetupError(f"MLflow refused the {ADMIN} password (401 from {url}): its user database was "
                             "created with another one")
    return response


def _expect_ok(response: requests.Response, what: str) -> None:
    if response.status_code == 404:
        raise AuthSetupError(f"MLflow has no accounts API at {response.url}: it runs without authentication (a "
                             "server started before authentication was on? stop it and start it again)")
    if response.status_code != 200:
        raise AuthSetupError(f"MLflow could not {what}: {response.status_code} {response.text[:300]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m opsctl.mlflow_auth", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the MLflow server, e.g. http://mlflow:5000")
    parser.add_argument("--registered-model", required=True, action="append", dest="registered_models",
                        help="a registered model the reviewer moves aliases of (repeat it for each served model)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = {ADMIN: "MLFLOW_AUTH_ADMIN_PASSWORD", PIPELINE: "PIPELINE_MLFLOW_PASSWORD",
             REVIEWER: "PIPELINE_MLFLOW_REVIEWER_PASSWORD"}
    missing = [variable for variable in names.values() if not os.environ.get(variable)]
    if missing:
        print(f"error: set {', '.join(missing)} (the accounts' passwords)", file=sys.stderr)
        return 2
    passwords = {account: os.environ[variable] for account, variable in names.items()}
    try:
        created = provision_accounts(args.url.rstrip("/"), passwords[ADMIN], passwords, args.registered_models)
    except AuthSetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"MLflow accounts ready at {args.url} (created now: {', '.join(created) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

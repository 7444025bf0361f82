"""``opsctl``: the command line of the local stack.

Exit codes: 0 success, 1 a step failed (the message says what to do), 2 bad usage,
3 ``status`` found a service stopped, 130 interrupted. Set OPSCTL_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from opsctl.process import ServiceError
from serving.model_repository import DEFAULT_MODEL
from opsctl.settings import SettingsError, StackSettings


def _cmd_up(settings: StackSettings, args: argparse.Namespace) -> int:
    from opsctl.services import LocalStack

    stack = LocalStack(settings)
    stack.up(with_airflow=not args.no_airflow)
    _print_urls(settings, stack.airflow_admin_password())
    return 0


def _cmd_mlflow_password(settings: StackSettings, args: argparse.Namespace) -> int:
    """Print one MLflow account's password (asked for explicitly: `up` never prints it)."""
    from opsctl.services import LocalStack

    if not settings.mlflow_auth:
        print("error: MLflow runs without authentication (PIPELINE_MLFLOW_AUTH=false): there are no accounts",
              file=sys.stderr)
        return 1
    password = LocalStack(settings).mlflow_password(args.account)
    if password is None:
        print(f"error: no password for {args.account} in {settings.mlflow_credentials_file}: start the stack "
              "with `make up` first", file=sys.stderr)
        return 1
    print(password)
    return 0


def _cmd_down(settings: StackSettings, args: argparse.Namespace) -> int:
    from opsctl.services import LocalStack

    stack = LocalStack(settings)
    stack.down()
    print("local stack stopped")
    return 0


def _cmd_purge(settings: StackSettings, args: argparse.Namespace) -> int:
    """Drop the stack's PostgreSQL databases and its Celery broker keys (refused while the stack runs)."""
    from opsctl.services import LocalStack

    LocalStack(settings).purge()
    return 0


def _cmd_status(settings: StackSettings, args: argparse.Namespace) -> int:
    from opsctl.services import LocalStack

    states = LocalStack(settings).status()
    if args.json:
        print(json.dumps(states, indent=2))
    else:
        for name, state in states.items():
            marker = f"running (pid {state['pid']})" if state["running"] else "stopped"
            print(f"{name:24s} {marker:22s} log: {state['log']}")
    return 0 if all(state["running"] for state in states.values()) else 3


def _cmd_fetch_assets(settings: StackSettings, args: argparse.Namespace) -> int:
    from tasks.assets import fetch_demo_assets

    assets = fetch_demo_assets(settings.assets_cache, progress=print)
    for key, path in assets.as_dict().items():
        print(f"{key:10s} {path}")
    return 0


def _cmd_demo(settings: StackSettings, args: argparse.Namespace) -> int:
    from opsctl.demo import run_demo

    return run_demo(settings, profile=args.profile, timeout_s=args.timeout, force=args.force)


def _cmd_demo_drift(settings: StackSettings, args: argparse.Namespace) -> int:
    from opsctl.demo_drift import run_drift_demo

    return run_drift_demo(settings, profile=args.profile, timeout_s=args.timeout, rate=args.rate, force=args.force)


def _cmd_demo_latency(settings: StackSettings, args: argparse.Namespace) -> int:
    from opsctl.demo_latency import run_latency_demo

    return run_latency_demo(settings, timeout_s=args.timeout, rate=args.rate, duration_s=args.duration, run=args.run)


def _cmd_demo_multimodel(settings: StackSettings, args: argparse.Namespace) -> int:
    from opsctl.demo_multimodel import run_multimodel_demo

    return run_multimodel_demo(settings, timeout_s=args.timeout, force=args.force)


def _cmd_champion(settings: StackSettings, args: argparse.Namespace) -> int:
    """Which MLflow version is the champion, what it is, and what Triton serves."""
    from serving.triton_client import TritonClient
    from tasks import model_aliases
    from tasks.promote import PREVIOUS_ALIAS

    lines = champion_lines(settings.mlflow_url, TritonClient(settings.triton_http_url), args.registered_model,
                           args.triton_model, PREVIOUS_ALIAS, model_aliases)
    print("\n".join(lines))
    return 0 if lines and not lines[0].startswith("no champion") else 1


def champion_lines(mlflow_url: str, triton, registered_model: str, triton_model: str, previous_alias: str,
                   registry) -> list[str]:
    champion = registry.alias_version(mlflow_url, registered_model, "champion")
    served = triton.ready_versions(triton_model) if triton.is_ready(triton_model) else []
    serving = f"Triton {triton_model}: " + (f"version {served[-1]} ready" if served else "not serving")
    if champion is None:
        return [f"no champion: {registered_model} has no 'champion' alias yet (run `make demo`)", serving]
    tags = registry.version_tags(mlflow_url, registered_model, champion)
    lines = [f"champion: {registered_model} version {champion} ({tags.get('candidate', '?')}, "
             f"accuracy {tags.get('metric.accuracy', '?')}, p50 {tags.get('metric.latency_p50_ms', '?')} ms), "
             f"served as Triton {tags.get('triton_model', '?')} version {tags.get('triton_version', '?')}", serving]
    previous = registry.alias_version(mlflow_url, registered_model, previous_alias)
    lines.append(f"previous champion: version {previous} (`opsctl rollback` serves it again)" if previous
                 else "previous champion: none")
    lines.append(f"MLflow: {mlflow_url}/#/models/{registered_model}/versions/{champion}")
    return lines


def _cmd_classify(settings: StackSettings, args: argparse.Namespace) -> int:
    """Send texts through the gateway (as clients do) and print what came back."""
    import httpx

    response = httpx.post(f"{settings.gateway_url}/v1/classify", json={"texts": args.texts}, timeout=30)
    body = response.json()
    if response.status_code != 200:
        print(f"error: the gateway answered {response.status_code}: {body.get('error', body)}", file=sys.stderr)
        return 1
    print(f"{body['model']} version {body['model_version']}, {body['latency_ms']:.1f} ms")
    for text, prediction in zip(args.texts, body["predictions"]):
        probability = prediction["probabilities"][prediction["label"]]
        print(f"  {prediction['label']:10s} p={probability:.3f}  {text[:100]}")
    return 0


def _cmd_rollback(settings: StackSettings, args: argparse.Namespace) -> int:
    from tasks.config import PromoteConfig
    from tasks.promote import PromotionTarget
    from tasks.reconcile import rollback

    config = PromoteConfig(registered_model=args.registered_model, triton_model=args.triton_model)
    target = PromotionTarget(settings.triton_http_url, settings.triton_model_repository, settings.mlflow_url)
    result = rollback(config, target)
    info = result.info
    print(f"rolled back: {info['registered_model']} version {info['mlflow_version']} is the champion again "
          f"(Triton {info['triton_model']} version {int(result.metrics['triton_version'])}, the files of "
          f"version {info['files_of_triton_version']}); "
          f"version {info['replaced_version'] or '-'} is no longer served")
    return 0


def _print_urls(settings: StackSettings, password: str | None) -> None:
    print()
    if settings.mlflow_auth:
        print(f"MLflow UI:   {settings.mlflow_url}  (sign in as reviewer; `opsctl mlflow-password reviewer` prints the"
              f" password, kept in {settings.mlflow_credentials_file})")
    else:
        print(f"MLflow UI:   {settings.mlflow_url}  (no authentication: PIPELINE_MLFLOW_AUTH=false)")
    print(f"Airflow UI:  {settings.airflow_url}  (user admin, password {password or '(not generated yet)'};"
          f" stored in {settings.airflow_passwords_file})")
    print(f"Triton:      http://{settings.triton_http_url}  (gRPC {settings.host}:{settings.triton_grpc_port},"
          f" metrics http://{settings.host}:{settings.triton_metrics_port}/metrics)")
    print(f"Logs:        {settings.logs_dir}")
    if settings.database_url:
        from opsctl.databases import hide_password

        executor = (f"CeleryExecutor, {settings.celery_workers} workers on {hide_password(settings.celery_broker_url)}"
                    if settings.celery_broker_url else "LocalExecutor")
        print(f"Databases:   {', '.join(settings.database_names.values())} on {hide_password(settings.database_url)}"
              f" (Airflow: {executor}; `opsctl purge` drops them once the stack is down)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opsctl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start MLflow, Triton and Airflow on 127.0.0.1 (no-op when running)")
    up.add_argument("--no-airflow", action="store_true", help="start only MLflow and Triton")
    up.set_defaults(handler=_cmd_up)
    commands.add_parser("down", help="stop every service the stack started").set_defaults(handler=_cmd_down)
    commands.add_parser(
        "purge", help="drop the stack's PostgreSQL databases and Celery broker keys (PIPELINE_DATABASE_URL, "
                      "PIPELINE_CELERY_BROKER_URL); refused while the stack runs"
    ).set_defaults(handler=_cmd_purge)
    status = commands.add_parser("status", help="show which services run (exit 3 when any is stopped)")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_cmd_status)
    commands.add_parser(
        "fetch-assets", help="download and verify the demo teacher and data (cached; never fetched twice)"
    ).set_defaults(handler=_cmd_fetch_assets)
    champion = commands.add_parser("champion", help="the MLflow champion version, what it is and what Triton serves")
    champion.add_argument("--registered-model", default="text-classifier", help="MLflow registered model name")
    champion.add_argument("--triton-model", default=DEFAULT_MODEL, help="Triton ensemble name")
    champion.set_defaults(handler=_cmd_champion)
    password = commands.add_parser("mlflow-password", help="print the password of an MLflow account of the stack")
    password.add_argument("account", nargs="?", default="reviewer", choices=["reviewer", "pipeline", "admin"])
    password.set_defaults(handler=_cmd_mlflow_password)
    classify = commands.add_parser("classify", help="send texts through the gateway and print the predictions")
    classify.add_argument("texts", nargs="+", help="one or more texts (quote each)")
    classify.set_defaults(handler=_cmd_classify)
    back = commands.add_parser("rollback", help="serve the previous champion again (Triton and MLflow alias)")
    back.add_argument("--registered-model", default="text-classifier", help="MLflow registered model name")
    back.add_argument("--triton-model", default=DEFAULT_MODEL, help="Triton ensemble name")
    back.set_defaults(handler=_cmd_rollback)
    demo = commands.add_parser("demo", help="trigger optimize_model through Airflow and print what it did")
    demo.add_argument("--profile", choices=["demo", "quick"], default="demo", help="size of the demo run")
    demo.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the DAG run")
    demo.add_argument("--force", action="store_true",
                      help="train even when the champion was trained on the same data with the same code")
    demo.set_defaults(handler=_cmd_demo)
    drift = commands.add_parser("demo-drift", help="normal then shifted traffic; the monitor detects the drift and "
                                                   "triggers a retrain on data with labelled shifted examples")
    drift.add_argument("--profile", choices=["demo", "quick"], default="demo", help="size of the retrain")
    drift.add_argument("--timeout", type=float, default=2400.0, help="seconds to wait for the retrain")
    drift.add_argument("--rate", type=float, default=16.0, help="requests per second in each traffic phase")
    drift.add_argument("--force", action="store_true", help="retrain even when nothing changed")
    drift.set_defaults(handler=_cmd_demo_drift)
    latency = commands.add_parser("demo-latency", help="serve a slow champion; the monitor sees the latency breach "
                                                       "and triggers a re-optimization within the latency budget")
    latency.add_argument("--timeout", type=float, default=2400.0, help="seconds to wait for the re-optimization")
    latency.add_argument("--rate", type=float, default=8.0, help="requests per second in each traffic phase")
    latency.add_argument("--duration", type=float, default=40.0, help="seconds of traffic in each phase")
    latency.add_argument("--run", help="the optimize_model run whose FP32 model to pin (default: the champion's)")
    latency.set_defaults(handler=_cmd_demo_latency)
    multimodel = commands.add_parser("demo-multimodel", help="train a topic classifier (multi-class news) and serve it "
                                                             "beside the sentiment one; ask each on its own route and "
                                                             "run each model's monitor")
    multimodel.add_argument("--timeout", type=float, default=2400.0, help="seconds to wait for the training run")
    multimodel.add_argument("--force", action="store_true", help="retrain even when nothing changed")
    multimodel.set_defaults(handler=_cmd_demo_multimodel)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = StackSettings.from_env(os.environ)
        if settings.mlflow_auth:  # opsctl's own MLflow calls (champion, rollback, the demos) sign in as the pipeline
            from opsctl.mlflow_auth import stack_client_environment

            os.environ.update(stack_client_environment(settings.mlflow_credentials_file, os.environ))
        return args.handler(settings, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - a CLI user gets a message, not a traceback
        if os.environ.get("OPSCTL_DEBUG"):
            raise
        print(f"error: {_describe(error)}", file=sys.stderr)
        return 1


def _describe(error: Exception) -> str:
    """Our own errors already say what to do; others get their type and a pointer to the logs."""
    from serving.errors import ServingError
    from tasks.errors import PipelineError

    expected = (ServiceError, SettingsError, PipelineError, ServingError, FileNotFoundError, PermissionError)
    if isinstance(error, expected):
        return str(error)
    import requests

    if isinstance(error, requests.ConnectionError):
        return f"could not connect ({error}); is the stack up? Start it with `make up`."
    return (f"{type(error).__name__}: {error}. Check `opsctl status` and the logs in .stack/logs; "
            "OPSCTL_DEBUG=1 shows the traceback.")


if __name__ == "__main__":
    sys.exit(main())

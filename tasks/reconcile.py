"""Serving follows the registry: every Triton replica serves the version the MLflow alias names.

The alias ``champion`` of the registered model is the source of truth. ``reconcile_once`` compares
it with what the model repository and each replica serve and acts through the same safe switch a
promotion uses (load beside, switch, smoke-test, restore on failure), holding the repository's
``serving_lock`` so it never switches while a promotion does:

- the champion's files are the newest ensemble version: replicas that serve another version load it;
- its files are an older version (someone moved the alias back in the MLflow UI, or a rollback):
  they are copied to a new version and switched to;
- its files are not in the repository (a version approved in the UI, or a lost repository): its
  serving bundle is downloaded from the registry and served as a new version.

The version served before becomes ``previous_champion``, unless a rollback replaced it. A version
that cannot be served is tagged ``serving_error`` (the reason, visible in the MLflow UI) and not tried
again until someone deletes the tag; the version before keeps serving.

``rollback`` (``opsctl rollback``, the ``rollback_model`` DAG, an error breach) only moves the alias
back and reconciles. The loop (``python -m tasks.reconcile``) runs beside Triton in every stack.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from monitoring.features import REFERENCE_FILE
from serving import model_repository as repo
from serving.triton_client import TritonReplicas, TritonUnavailable, load_and_wait
from tasks import model_aliases
from tasks.config import PromoteConfig
from tasks.errors import ConfigError, PipelineError, PromotionFailed
from tasks.promote import (PREVIOUS_ALIAS, ROLLED_BACK_TAG, SERVING_ERROR_TAG, SWITCHED_AT_TAG, PromotionTarget,
                           check_serving, restore_serving, switch_to, record_served, serve_bundle, serving_lock)
from tasks.registry import VERSION_ROLE_TAG
from tasks.results import StepResult, StepStatus
from tasks.served_models import parse_model_entry, unique_models
from tasks.serving_bundle import download_bundle

log = logging.getLogger("tasks.reconcile")


@dataclass(frozen=True)
class Reconciled:
    """What one reconcile pass found or did."""

    action: str  # nothing | in_sync | loaded | switched | rebuilt | refused
    message: str
    mlflow_version: str | None = None
    triton_version: int | None = None
    files_of: int | None = None  # the Triton version whose files were served again (switched)


def reconcile_once(config: PromoteConfig, target: PromotionTarget) -> Reconciled:
    """Make every replica serve the version ``config.alias`` names (see the module's docstring).
    ``PromotionFailed`` when it cannot; the version before keeps serving."""
    replicas = TritonReplicas.from_spec(target.triton_url)
    replicas.wait_ready(timeout_s=30)
    with serving_lock(target.model_repository, config.triton_model):
        return reconcile_locked(config, target, replicas)


def reconcile_locked(config: PromoteConfig, target: PromotionTarget, replicas: TritonReplicas) -> Reconciled:
    """``reconcile_once`` for a caller that holds ``serving_lock``."""
    uri, model, name, repository = target.tracking_uri, config.registered_model, config.triton_model, \
        target.model_repository
    champion = model_aliases.alias_version(uri, model, config.alias)
    if champion is None:
        return Reconciled("nothing", f"{model} has no {config.alias!r} alias: nothing to serve")
    tags = model_aliases.version_tags(uri, model, champion)
    refusal = _refusal(model, champion, tags)
    if refusal:
        return Reconciled("refused", refusal, champion)
    on_disk = repo.ensemble_versions(repository, name)
    files = files_of(repository, name, model, champion, tags)
    if files is not None and files == on_disk[-1]:
        return _converge(replicas, name, champion, files)
    served_before = repo.registered_version(repository, name, on_disk[-1]) if on_disk else None
    try:
        if files is not None:
            version = _serve_files_of(replicas, repository, name, files, model, champion)
            result = Reconciled("switched", f"{name}: now serving {model} v{champion} as Triton version {version} "
                                            f"(the files of version {files})", champion, version, files)
        else:
            version = _rebuild(config, target, replicas, champion)
            result = Reconciled("rebuilt", f"{name}: now serving {model} v{champion} as Triton version {version} "
                                           "(rebuilt from the registry)", champion, version)
    except PromotionFailed as error:
        model_aliases.tag_version(uri, model, champion, {SERVING_ERROR_TAG: str(error)[:4000]})
        raise
    if served_before is not None and served_before[0] == model and served_before[1] != champion:
        _set_previous(uri, config, served_before[1])
    record_served(uri, config, champion, version)
    return result


def _refusal(model: str, version: str, tags: dict[str, str]) -> str:
    """Why a version the alias names is not served (empty when it may be)."""
    if tags.get(VERSION_ROLE_TAG) == "reference":
        return (f"{model} v{version} is a run's reference teacher (PyTorch, tag {VERSION_ROLE_TAG}=reference): it "
                "is never served; point the alias at a candidate version")
    if tags.get(SERVING_ERROR_TAG):
        return (f"{model} v{version} was not served: {tags[SERVING_ERROR_TAG]} (delete its version tag "
                f"{SERVING_ERROR_TAG!r} to try again)")
    return ""


def files_of(repository: Path, name: str, model: str, version: str, tags: dict[str, str]) -> int | None:
    """The newest ensemble version holding ``model`` ``version``'s files: by the folders' markers, else
    (folders written before markers) by the version's ``triton_version`` tag."""
    on_disk = repo.ensemble_versions(repository, name)
    marked = [number for number in on_disk if repo.registered_version(repository, name, number) == (model, version)]
    if marked:
        return marked[-1]
    tagged = tags.get("triton_version")
    if tags.get("triton_model") == name and tagged and tagged.isdigit() and int(tagged) in on_disk \
            and repo.registered_version(repository, name, int(tagged)) is None:
        return int(tagged)
    return None


def _converge(replicas: TritonReplicas, name: str, champion: str, version: int) -> Reconciled:
    """Load the newest version on the replicas that serve another one (started mid-switch, restarted)."""
    behind = [client for client in replicas.clients
              if (client.ready_versions(name) if client.is_ready(name) else []) != [version]]
    if not behind:
        return Reconciled("in_sync", f"{name}: serving v{champion} as Triton version {version}", champion, version)
    for client in behind:
        load_and_wait(client, repo.ensemble_models(name)[:-1], version)
        load_and_wait(client, (name,), version)
    return Reconciled("loaded", f"{name}: {len(behind)} replica(s) now serve v{champion} as Triton version {version}",
                      champion, version)


def _serve_files_of(replicas: TritonReplicas, repository: Path, name: str, source: int, model: str,
                    champion: str) -> int:
    """Serve the files of Triton version ``source`` again as a new version (forward, as a promotion)."""
    present = repo.ensemble_versions(repository, name)
    try:
        version = repo.copy_ensemble_components(repository, name, source)
    except repo.RepositoryError as error:
        raise PromotionFailed(f"cannot serve {name} version {source} again: {error}") from error
    reference = repository / name / str(source) / REFERENCE_FILE
    try:
        with tempfile.TemporaryDirectory(prefix="marker-") as scratch:
            marker = repo.write_registered_version(Path(scratch), model, champion)
            switch_to(replicas, repository, name, version, repo.repinned_ensemble_config(repository, name, source, version),
                       tuple(path for path in (reference, marker) if path.exists()))
        for client in replicas.clients:
            check_serving(client, name, version)
    except Exception as error:  # noqa: BLE001 - whatever failed, the current version must serve again
        restore_serving(replicas, repository, name, version, present)
        raise PromotionFailed(f"serving {name} from the files of version {source} failed: {error}; version "
                              f"{present[-1]} serves again") from error
    return version


def _rebuild(config: PromoteConfig, target: PromotionTarget, replicas: TritonReplicas, champion: str) -> int:
    """Download the champion's serving bundle and serve it as a new version, numbered above anything a
    replica still serves from memory."""
    in_memory = [number for client in replicas.clients for number in client.loaded_versions(config.triton_model)]
    with tempfile.TemporaryDirectory(prefix="rebuild-") as scratch:
        bundle = download_bundle(target.tracking_uri, config.registered_model, champion, Path(scratch))
        version, _ = serve_bundle(bundle, config, replicas, target.model_repository, champion,
                                  min_version=1 + max(in_memory, default=0))
    return version


def _set_previous(uri: str, config: PromoteConfig, replaced: str) -> None:
    """``previous_champion`` names the version served before, unless a rollback replaced it."""
    if model_aliases.version_tags(uri, config.registered_model, replaced).get(ROLLED_BACK_TAG):
        if model_aliases.alias_version(uri, config.registered_model, PREVIOUS_ALIAS) is not None:
            model_aliases.delete_alias(uri, config.registered_model, PREVIOUS_ALIAS)
        return
    model_aliases.set_alias(uri, config.registered_model, PREVIOUS_ALIAS, replaced)


def rollback(config: PromoteConfig, target: PromotionTarget) -> StepResult:
    """Serve the ``previous_champion`` again: move the alias back and reconcile. The replaced version is
    tagged ``rolled_back`` (so it does not become the previous champion); if serving fails, the aliases
    and the served version are as before."""
    uri, model = target.tracking_uri, config.registered_model
    previous = model_aliases.alias_version(uri, model, PREVIOUS_ALIAS)
    if previous is None:
        raise PromotionFailed(f"{model} has no {PREVIOUS_ALIAS!r} alias: nothing to roll back to")
    replicas = TritonReplicas.from_spec(target.triton_url)
    replicas.wait_ready(timeout_s=30)
    with serving_lock(target.model_repository, config.triton_model):
        current = model_aliases.alias_version(uri, model, config.alias)
        if current is not None:
            model_aliases.tag_version(uri, model, current, {ROLLED_BACK_TAG: f"replaced by version {previous}"})
        model_aliases.set_alias(uri, model, config.alias, previous)
        try:
            result = reconcile_locked(config, target, replicas)
            if result.action == "refused":
                raise PromotionFailed(result.message)
        except Exception as error:  # noqa: BLE001 - the aliases go back to what serves
            _undo_rollback(uri, config, current, previous)
            raise PromotionFailed(f"rollback of {model} to version {previous} failed: {error}; the aliases are "
                                  "unchanged") from error
    # A rollback is no fresh switch: a breach after it is not blamed on it (no second rollback).
    model_aliases.tag_version(uri, model, previous, {"rolled_back_from": current or "", SWITCHED_AT_TAG: ""})
    log.info("rolled back %s to MLflow v%s (Triton v%s)", model, previous, result.triton_version)
    return StepResult(step="rollback", status=StepStatus.SUCCESS, metrics={"triton_version": float(result.triton_version)},
                      info={"registered_model": model, "mlflow_version": previous, "replaced_version": current or "",
                            "triton_model": config.triton_model,
                            "files_of_triton_version": "" if result.files_of is None else str(result.files_of)})


def _undo_rollback(uri: str, config: PromoteConfig, current: str | None, previous: str) -> None:
    if current is not None:
        model_aliases.set_alias(uri, config.registered_model, config.alias, current)
        model_aliases.delete_version_tag(uri, config.registered_model, current, ROLLED_BACK_TAG)
    model_aliases.set_alias(uri, config.registered_model, PREVIOUS_ALIAS, previous)


# -- the loop -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None, env: dict[str, str] | None = None) -> argparse.Namespace:
    env = dict(os.environ if env is None else env)
    parser = argparse.ArgumentParser(prog="python -m tasks.reconcile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mlflow", default=env.get("PIPELINE_MLFLOW_TRACKING_URI"), help="MLflow tracking URI")
    parser.add_argument("--triton", default=env.get("PIPELINE_TRITON_URL", "127.0.0.1:8000"),
                        help="Triton replicas: host:port[,host:port] or dns:name:port")
    parser.add_argument("--repository", type=Path, default=env.get("PIPELINE_TRITON_MODEL_REPOSITORY"),
                        help="the shared model repository")
    parser.add_argument("--registered-model", default=PromoteConfig.registered_model, help="MLflow registered model")
    parser.add_argument("--triton-model", default=PromoteConfig.triton_model, help="Triton ensemble")
    parser.add_argument("--model", action="append", default=[], metavar="SERVED=REGISTERED",
                        help="a served model (Triton ensemble) and the registered model whose alias it follows; "
                             "repeat it for several models side by side (given: --registered-model and "
                             "--triton-model are not used)")
    parser.add_argument("--interval", type=float, default=15.0, help="seconds between passes")
    parser.add_argument("--once", action="store_true", help="one pass, then exit (status 1 when not in sync)")
    args = parser.parse_args(argv)
    if not args.mlflow or not args.repository:
        parser.error("--mlflow and --repository (or PIPELINE_MLFLOW_TRACKING_URI and "
                     "PIPELINE_TRITON_MODEL_REPOSITORY) are required")
    try:
        args.configs = configs_of(args.model, args.registered_model, args.triton_model)
    except ConfigError as error:
        parser.error(str(error))
    return args


def configs_of(entries: list[str], registered_model: str, triton_model: str) -> list[PromoteConfig]:
    """The promote configs of the models to reconcile: one per ``served=registered`` entry, else the one
    ``registered_model`` / ``triton_model`` name."""
    if not entries:
        return [PromoteConfig(registered_model=registered_model, triton_model=triton_model)]
    models = unique_models(tuple(parse_model_entry(entry) for entry in entries))
    return [PromoteConfig(registered_model=model.registered, triton_model=model.served) for model in models]


def pass_once(config: PromoteConfig, target: PromotionTarget) -> tuple[bool, str]:
    """One pass for the loop: (in sync, what it found or did); errors become the message."""
    try:
        result = reconcile_once(config, target)
    except (PipelineError, TritonUnavailable, OSError) as error:
        return False, f"{config.triton_model}: not in sync: {error}"
    except Exception as error:  # noqa: BLE001 - MLflow down or answering errors: the loop keeps going
        return False, f"{config.triton_model}: not in sync: {type(error).__name__}: {error}"
    return result.action != "refused", result.message


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    target = PromotionTarget(args.triton, args.repository, args.mlflow)
    last: dict[str, str] = {}
    while True:
        all_in_sync = True
        for config in args.configs:  # each served model from its own registered model's alias
            in_sync, state = pass_once(config, target)
            if state != last.get(config.triton_model):  # log changes, not every pass
                (log.info if in_sync else log.warning)(state)
                last[config.triton_model] = state
            all_in_sync = all_in_sync and in_sync
        if args.once:
            return 0 if all_in_sync else 1
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())

"""
### rollback_model

Serves the **previous champion** again. Triggered by hand (the Airflow UI's "Trigger DAG"), never
on a schedule. It moves the MLflow alias `champion` back to the version `previous_champion` names
and reconciles Triton with it: the older version's files become a new Triton version through the
same safe switch a promotion uses (load beside the serving one, switch, check; restore on failure),
so no request fails. The replaced version is tagged `rolled_back` and is not the next previous
champion, so a second rollback cannot bring it back.

Moving the alias in the MLflow UI does the same (the reconcile loop beside Triton follows it within
its interval); this DAG and `opsctl rollback` call the one function, `tasks.reconcile.rollback`.
"""

from __future__ import annotations

import os

from airflow.sdk import Param, dag, task

PARAMS = {
    "registered_model": Param("text-classifier", type="string", description="MLflow registered model name"),
    "triton_model": Param("text_classifier", type="string", pattern="^[A-Za-z0-9_-]+$",
                          description="Triton model name"),
}


@dag(
    dag_id="rollback_model",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    tags=["serving", "mlflow", "triton"],
    doc_md=__doc__,
)
def rollback_model():
    @task
    def roll_back() -> dict:
        """Move the alias back to previous_champion and serve it (the reason of a failure is in the log)."""
        from airflow.sdk import get_current_context

        from tasks.config import PromoteConfig
        from tasks.promote import PromotionTarget
        from tasks.reconcile import rollback
        from tasks.settings import PipelineSettings

        params = get_current_context()["params"]
        settings = PipelineSettings.in_airflow_task(os.environ)
        config = PromoteConfig(registered_model=params["registered_model"], triton_model=params["triton_model"])
        target = PromotionTarget(settings.triton_url, settings.triton_model_repository, settings.mlflow_tracking_uri)
        return rollback(config, target).to_dict()

    roll_back()


rollback_model()

"""Manual approval (param ``approval=manual``): a person decides in the MLflow UI what serves.

The gated winner is not served by the run. Its serving bundle is logged on its version (so the
registry can serve it), it gets the alias ``challenger`` and the version tags ``approval=pending`` and
``approval_deadline``, and its description says what to look at. The run then waits (the DAG's
``await_approval`` sensor, deferred between checks: it holds no worker slot) for one of:

- **approved**: a reviewer pointed ``champion`` at the version. The run reconciles Triton with the
  alias at once (``tasks.reconcile``; the loop beside Triton would within its interval anyway), so
  the version is served through the safe switch, and the previous champion becomes
  ``previous_champion``;
- **rejected**: a reviewer added the version tag ``rejected`` (its value is the reason);
- **expired**: nobody decided before ``approval_timeout_hours``.

In every case the ``challenger`` alias is removed and ``approval`` says what happened.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from serving.truncation import DEFAULT_TRUNCATION
from tasks import model_aliases
from tasks.config import PromoteConfig
from tasks.promote import PromotionTarget, build_bundle
from tasks.reconcile import reconcile_once
from tasks.results import StepResult, StepStatus
from tasks.serving_bundle import log_bundle

CHALLENGER_ALIAS = "challenger"
APPROVAL_TAG = "approval"  # pending | approved | rejected | expired
DEADLINE_TAG = "approval_deadline"
REJECTED_TAG = "rejected"


@dataclass(frozen=True)
class Proposal:
    """A version waiting for a reviewer."""

    version: str
    deadline: datetime  # timezone-aware

    def describe(self, config: PromoteConfig) -> str:
        return (f"waiting for a reviewer until {self.deadline:%Y-%m-%d %H:%M} UTC: in the MLflow UI, point the alias "
                f"{config.alias!r} of {config.registered_model} at version {self.version} to serve it, or add the "
                f"version tag {REJECTED_TAG!r} (its value the reason) to reject it")


def propose(config: PromoteConfig, target: PromotionTarget, model_dir: Path, predictions: Path, data_dir: Path,
            version: str, max_length: int, intra_op_threads: int, now: datetime,
            truncation: str = DEFAULT_TRUNCATION) -> Proposal:
    """Make ``version`` the challenger: its serving bundle in the registry, the alias and the tags."""
    with tempfile.TemporaryDirectory(prefix="propose-") as scratch:
        bundle = build_bundle(config, model_dir, predictions, data_dir, max_length, intra_op_threads, Path(scratch),
                              truncation)
        log_bundle(target.tracking_uri, config.registered_model, version, bundle)
    proposal = Proposal(version, now + timedelta(hours=config.approval_timeout_hours))
    model_aliases.set_alias(target.tracking_uri, config.registered_model, CHALLENGER_ALIAS, version)
    model_aliases.tag_version(target.tracking_uri, config.registered_model, version,
                              {APPROVAL_TAG: "pending", DEADLINE_TAG: proposal.deadline.isoformat()})
    return proposal


def decision(tracking_uri: str, config: PromoteConfig, proposal: Proposal, now: datetime) -> str:
    """``approved``, ``rejected``, ``expired`` or ``pending`` (a reviewer's action wins over the clock)."""
    if model_aliases.alias_version(tracking_uri, config.registered_model, config.alias) == proposal.version:
        return "approved"
    if REJECTED_TAG in model_aliases.version_tags(tracking_uri, config.registered_model, proposal.version):
        return "rejected"
    return "expired" if now >= proposal.deadline else "pending"


def conclude(config: PromoteConfig, target: PromotionTarget, proposal: Proposal, outcome: str) -> StepResult:
    """Serve an approved version (reconcile), or record a rejection or an expiry; the challenger alias goes."""
    uri, model = target.tracking_uri, config.registered_model
    if model_aliases.alias_version(uri, model, CHALLENGER_ALIAS) == proposal.version:
        model_aliases.delete_alias(uri, model, CHALLENGER_ALIAS)
    model_aliases.tag_version(uri, model, proposal.version, {APPROVAL_TAG: outcome})
    info = {"registered_model": model, "mlflow_version": proposal.version, "approval": outcome,
            "triton_model": config.triton_model}
    if outcome == "rejected":
        why = model_aliases.version_tags(uri, model, proposal.version).get(REJECTED_TAG) or "no reason given"
        return StepResult(step="promote", status=StepStatus.SKIPPED, info=info,
                          reason=f"version {proposal.version} was rejected by a reviewer ({why}); the champion stays")
    if outcome == "expired":
        return StepResult(step="promote", status=StepStatus.SKIPPED, info=info,
                          reason=f"no reviewer approved or rejected version {proposal.version} within "
                                 f"{config.approval_timeout_hours:g} h; the champion stays (it is still registered: "
                                 f"pointing {config.alias!r} at it later serves it)")
    served = reconcile_once(config, target)
    if served.mlflow_version != proposal.version or served.action in ("refused", "nothing"):
        return StepResult(step="promote", status=StepStatus.FAILED, info=info,
                          reason=f"version {proposal.version} was approved, but Triton does not serve it: "
                                 f"{served.message}")
    return StepResult(step="promote", status=StepStatus.SUCCESS, info=info | {"alias": config.alias},
                      metrics={"triton_version": float(served.triton_version or 0)},
                      reason=f"approved by a reviewer; {served.message}")

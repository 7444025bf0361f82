"""optimize_model end to end with ``dag.test()`` for each supported encoder family on a tiny model of
its own (tokenizer of the family's kind), against the real MLflow and Triton: every CPU technique
task succeeds, the winner is promoted, and Triton's ensemble (the family's ``tokenizer.json`` in the
tokenizer model, its pad token) serves the logits the promoted ONNX file gives in-process.

``make test`` runs XLM-RoBERTa (a SentencePiece family: Unigram pieces, pad id 1 and RoBERTa's position
ids); the others, DistilBERT (the most different module layout) included, are marked ``slow`` (``make
test-slow``): a run takes 65-190 s on a 2-core machine, and ``make test`` must stay within 25 minutes.
tests/unit/test_families.py checks every family's student, pruning, export, quantization and served
tokenizer on its own in ``make test``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.dags.test_optimize_model_run import _run_dag, airflow_env  # noqa: F401  (a fixture)

IN_MAKE_TEST = ("xlm-roberta",)
FAMILIES = ("xlm-roberta", "roberta", "distilbert", "electra", "albert", "bert")
TEXTS = ["good great movie", "awful dull plot and a boring ending", "the film was not really fun"]

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("family", [family if family in IN_MAKE_TEST else pytest.param(family, marks=pytest.mark.slow)
                                    for family in FAMILIES])
def test_family_runs_every_cpu_task_promotes_and_serves(family, local_services, airflow_env, labelled_csv,
                                                        tmp_path_factory):
    from serving.triton_client import TritonClient
    from tasks.modeling import build_tiny_model, load_tokenizer
    from tasks.onnx_model import MODEL_FILENAME, onnx_logits
    from tasks.recipe import OPTIMIZE_MODEL, Target
    from tasks.settings import safe_name

    teacher = build_tiny_model(tmp_path_factory.mktemp("teacher") / family, family=family)
    triton_model = f"family_{family.replace('-', '_')}"
    conf = {
        "data_source": str(labelled_csv), "teacher": str(teacher), "epochs": 3.0, "learning_rate": 5e-3,
        "max_length": 32, "registered_model": f"family-{family}", "triton_model": triton_model,
        "student_layers": 1, "distill_epochs": 2.0, "prune_heads": 0.5, "prune_ffn": 0.5, "prune_epochs": 1.0,
        "target": "cpu",
    }
    state, run_id, tasks, output = _run_dag(airflow_env, conf)
    assert state == "success", output[-4000:]
    built = {stage.id for stage in OPTIMIZE_MODEL.on(Target.CPU) if stage.technique != "sparsify"
             and "sparsify" not in OPTIMIZE_MODEL.techniques_needed(stage.id)}
    assert {task for task, task_state in tasks.items() if task_state == "success"} >= built | {"promote"}, tasks
    run_dir = local_services.settings.runs_dir / safe_name(run_id)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["candidates"]) == {"teacher_pytorch", "onnx_fp32", "onnx_int8", "student_onnx_fp32",
                                          "student_int8", "pruned_onnx_fp32", "pruned_int8"}
    assert summary["promotion"]["status"] == "success", summary["promotion"]
    winner_dir = run_dir / OPTIMIZE_MODEL.producer(summary["winner"]).output
    expected = onnx_logits(winner_dir / MODEL_FILENAME, load_tokenizer(winner_dir), TEXTS, 32)
    client = TritonClient(local_services.settings.triton_http_url)
    served = client.classify(triton_model, TEXTS)  # one request: padded to the longest text by the pad token
    client.close()
    np.testing.assert_allclose(served["LOGITS"], expected, atol=1e-4)

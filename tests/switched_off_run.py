"""What a run of optimize_model with distill and quantize switched off (so prune off too) must show,
however it ran (the scheduler in tests/integration/test_local_stack.py, ``dag.test()`` in
tests/dags/test_optimize_model_run.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tasks.recipe import OPTIMIZE_MODEL, Target

GPU_STAGES = {stage.id for stage in OPTIMIZE_MODEL.on(Target.GPU)}
GPU_CANDIDATES = {stage.candidate for stage in OPTIMIZE_MODEL.on(Target.GPU) if stage.candidate}
# The techniques' tasks, and the GPU branch (target auto on a worker without a GPU: resolve_target skips it).
SKIPPED = {"distill_student", "export_student", "quantize_student", "prune_student", "export_pruned",
           "quantize_pruned", "quantize_int8", "sparsify_student", "export_sparse"} | GPU_STAGES


def assert_switched_off_run(tasks: dict[str, str], run_dir: Path, task_log: Callable[[str], str]) -> dict:
    """The switched-off tasks are SKIPPED with the reason in their logs (``task_log(task id)``), and the
    teacher's two FP32 candidates are evaluated, registered, gated and one of them promoted; returns
    the run's summary."""
    assert {task for task, task_state in tasks.items() if task_state == "skipped"} == SKIPPED, tasks
    assert {task for task, task_state in tasks.items() if task_state == "success"} == set(tasks) - SKIPPED, tasks
    assert "distill switched off in the run's params" in task_log("distill_student")
    assert "quantize switched off in the run's params" in task_log("quantize_int8")

    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["candidates"]) == {"teacher_pytorch", "onnx_fp32"}
    assert set(summary["versions"]) == {"onnx_fp32"} and summary["versions"]["onnx_fp32"]
    assert summary["reference_version"] not in (None, summary["versions"]["onnx_fp32"])  # the teacher, registered
    assert summary["switched_off"]["student_int8"] == "distill and quantize switched off in the run's params"
    assert set(summary["switched_off"]) == {"onnx_int8", "student_onnx_fp32", "student_int8", "pruned_onnx_fp32",
                                            "pruned_int8", "sparse_onnx_fp32"} | GPU_CANDIDATES
    assert summary["switched_off"]["trt_int8"] == "quantize switched off in the run's params"
    assert summary["switched_off"]["onnx_fp16"].startswith("target auto: no NVIDIA GPU visible to CUDA")
    assert summary["promotion"]["status"] == "success" and summary["winner"] == "onnx_fp32"
    page = (run_dir / "report" / "report.md").read_text()
    assert "Switched off (not built, evaluated or registered): " in page
    assert "onnx_int8 (quantize switched off in the run's params)" in page
    return summary

"""The pipeline steps as a plain library (no Airflow import).

Every step has the shape ``run(config, inputs..., out_dir) -> StepResult``: it writes its
outputs under a run-scoped folder (to a temporary name, then renamed), saves the config that
produced them next to them, and returns URIs and scalar metrics small enough for XCom.
"""

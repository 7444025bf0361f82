"""opsctl: start, stop and inspect the local stack (MLflow, Triton, Airflow) and run the demo."""

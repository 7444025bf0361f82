-- The MLflow backend store lives beside the Airflow metadata database.
CREATE DATABASE mlflow OWNER airflow;

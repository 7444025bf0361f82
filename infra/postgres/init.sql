-- The MLflow backend store lives beside the Airflow metadata database.
CREATE DATABASE mlflow OWNER airflow;
-- The gateway's prediction log (monitoring reads it).
CREATE DATABASE predictions OWNER airflow;

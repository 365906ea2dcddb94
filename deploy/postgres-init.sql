-- One database per service (run once, when the postgres volume is first initialised).
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
CREATE DATABASE optuna;

-- Databases of the stack's other services, beside vitsem's own.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;

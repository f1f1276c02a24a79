"""Airflow DAG: scheduled retraining with the beam-rtml Flex Templates (Airflow 2.4+).

Two tasks, the same loop as templates/schedule/retrain.workflow.yaml:

1. `backfill`: the backfill template with no_state (training examples only, into a folder of this
   run; the Bigtable feature state belongs to the streaming scorer and is left alone);
2. `train`: the train template on that folder and on the `days` days (both ends included) that
   end `label_delay_days` days before the last day of data, the day before the run's data
   interval ends (for the run of Monday 2026-03-02 03:00 with the defaults: 2026-01-24 ..
   2026-02-22), UTC, with publish_guard=average_precision: the new version is published into
   model_dir only if its validation average precision is at least the serving version's, else it
   goes to model_dir/.refused/VERSION. Fraud reports arrive up to about 7 days after the
   transaction, so the latest days are left out until their labels are in, as `rtml retrain`
   does (rtml/retrain.py training_window).

Each task waits for its Dataflow job; a failed job fails the task and train does not run.
Copy this file into the DAGs folder of an Airflow with apache-airflow-providers-google, and set
the Airflow Variable `rtml_retrain` (JSON) to override the defaults below, at least `project`
and `bucket`, e.g.
    airflow variables set --json rtml_retrain '{"project": "my-project", "bucket": "my-rtml-bucket"}'
The Airflow connection `gcp_conn_id` needs roles/dataflow.developer, roles/iam.serviceAccountUser
on the worker account and read access to the bucket's template specs (see templates/README.md).
"""

from datetime import timedelta

import pendulum
from airflow import DAG
from airflow.models import Variable
from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator

# Defaults, each overridable in the Airflow Variable `rtml_retrain` (a JSON object).
DEFAULTS = {
    "project": "my-project",
    "region": "us-central1",
    "bucket": "my-rtml-bucket",
    "days": 30,  # training window in days, both ends included; at least 3
    "label_delay_days": 7,  # days between the window's end and the last day of data (late fraud reports); >= 0
    "schedule": "0 3 * * 1",  # Mondays 03:00 UTC
    "input": None,  # replay file, one file; None: gs://BUCKET/history/history.jsonl
    "model_dir": None,  # None: gs://BUCKET/models
    "work_dir": None,  # None: gs://BUCKET/train-work
    "examples_root": None,  # each run writes gs://.../RUN/; None: gs://BUCKET/retrain
    "bigtable_instance": "rtml-features",  # required by the backfill template; not written to with no_state
    "service_account": None,  # worker account; None: rtml-dataflow@PROJECT.iam.gserviceaccount.com
    "backfill_max_workers": 10,
    "train_machine_type": "n2-highmem-4",  # train holds the window in memory on one worker
    "gcp_conn_id": "google_cloud_default",
}
CONFIG = {**DEFAULTS, **Variable.get("rtml_retrain", default_var={}, deserialize_json=True)}

BUCKET = "gs://" + CONFIG["bucket"].removeprefix("gs://").rstrip("/")
DAYS = int(CONFIG["days"])
if DAYS < 3:
    raise ValueError(f"rtml_retrain: days must be at least 3 (train holds out the last 2 days), got {DAYS}")
LABEL_DELAY_DAYS = CONFIG["label_delay_days"]
if type(LABEL_DELAY_DAYS) is not int or LABEL_DELAY_DAYS < 0:
    raise ValueError(
        f"rtml_retrain: label_delay_days must be a whole number of days, 0 or more, got {LABEL_DELAY_DAYS!r}"
    )
INPUT = CONFIG["input"] or f"{BUCKET}/history/history.jsonl"
MODEL_DIR = CONFIG["model_dir"] or f"{BUCKET}/models"
WORK_DIR = CONFIG["work_dir"] or f"{BUCKET}/train-work"
EXAMPLES_ROOT = CONFIG["examples_root"] or f"{BUCKET}/retrain"
SERVICE_ACCOUNT = CONFIG["service_account"] or f"rtml-dataflow@{CONFIG['project']}.iam.gserviceaccount.com"

# Jinja, rendered per run. The last day of data is the day before the data interval's end (with a
# cron schedule Airflow 2 starts a run when its interval ends, so that is the day before the run);
# the window ends LABEL_DELAY_DAYS days before it and holds DAYS days, both ends included:
# train_end = end - (1 + LABEL_DELAY_DAYS) days, train_start = train_end - (DAYS - 1) days.
TRAIN_END = "{{ macros.ds_add(data_interval_end | ds, -" + str(1 + LABEL_DELAY_DAYS) + ") }}"
TRAIN_START = "{{ macros.ds_add(data_interval_end | ds, -" + str(LABEL_DELAY_DAYS + DAYS) + ") }}"
RUN = "{{ data_interval_end | ds_nodash }}"
EXAMPLES = f"{EXAMPLES_ROOT}/{RUN}"  # written by backfill, read by train

ENVIRONMENT = {
    "serviceAccountEmail": SERVICE_ACCOUNT,
    "tempLocation": f"{BUCKET}/tmp",
    "stagingLocation": f"{BUCKET}/staging",
}

with DAG(
    dag_id="rtml_retrain",
    description="beam-rtml retraining: backfill (no_state) then train (publish_guard=average_precision)",
    schedule=CONFIG["schedule"],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 0, "execution_timeout": timedelta(hours=12)},
    tags=["rtml"],
) as dag:
    backfill = DataflowStartFlexTemplateOperator(
        task_id="backfill",
        project_id=CONFIG["project"],
        location=CONFIG["region"],
        gcp_conn_id=CONFIG["gcp_conn_id"],
        wait_until_finished=True,
        deferrable=False,  # waiting in the task; deferrable=True cannot be combined with it
        body={
            "launchParameter": {
                "jobName": f"rtml-retrain-backfill-{RUN}",  # the operator appends a unique suffix
                "containerSpecGcsPath": f"{BUCKET}/templates/backfill.json",
                "parameters": {
                    "input": INPUT,
                    "examples_out": EXAMPLES,
                    "bigtable_instance": CONFIG["bigtable_instance"],
                    "no_state": "true",
                },
                "environment": {**ENVIRONMENT, "maxWorkers": int(CONFIG["backfill_max_workers"])},
            }
        },
    )

    train = DataflowStartFlexTemplateOperator(
        task_id="train",
        project_id=CONFIG["project"],
        location=CONFIG["region"],
        gcp_conn_id=CONFIG["gcp_conn_id"],
        wait_until_finished=True,
        deferrable=False,
        body={
            "launchParameter": {
                "jobName": f"rtml-retrain-train-{RUN}",
                "containerSpecGcsPath": f"{BUCKET}/templates/train.json",
                "parameters": {
                    "examples": EXAMPLES,
                    "train_start": TRAIN_START,
                    "train_end": TRAIN_END,
                    "model_dir": MODEL_DIR,
                    "work_dir": WORK_DIR,
                    "publish_guard": "average_precision",
                },
                "environment": {**ENVIRONMENT, "machineType": CONFIG["train_machine_type"]},
            }
        },
    )

    backfill >> train

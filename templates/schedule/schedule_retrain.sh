#!/usr/bin/env bash
# Deploy the retraining workflow (retrain.workflow.yaml: backfill without feature state, then
# train with publish_guard=average_precision) and a Cloud Scheduler job that runs it on a cron
# schedule. Safe to run again: the workflow is redeployed and the scheduler job updated.
# See "Scheduled retraining" in templates/README.md.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shell_line, log and run, shared with setup_gcp.sh.
# shellcheck source-path=SCRIPTDIR
source "$SCRIPT_DIR/../common.sh"
WORKFLOW_SOURCE="$SCRIPT_DIR/retrain.workflow.yaml"
SERVICES=(workflows.googleapis.com workflowexecutions.googleapis.com cloudscheduler.googleapis.com dataflow.googleapis.com)
TOKEN_SCOPE="https://www.googleapis.com/auth/cloud-platform"

PROJECT=""
REGION=""
BUCKET=""
SCHEDULE="0 3 * * 1"
TIME_ZONE="Etc/UTC"
DAYS=30
LABEL_DELAY_DAYS=7
INPUT=""
MODEL_DIR=""
INSTANCE="rtml-features"
WORKFLOW="rtml-retrain"
JOB="rtml-retrain"
SA_NAME="rtml-retrain"
WORKER_SA_NAME="rtml-dataflow"
GRANT_ROLES=0
DRY_RUN=0

usage() {
    cat <<'EOF'
Usage: templates/schedule/schedule_retrain.sh --project PROJECT --region REGION --bucket BUCKET [options]

Deploys the Cloud Workflows workflow templates/schedule/retrain.workflow.yaml (backfill with
no_state into a per-run examples folder, then train with publish_guard=average_precision on the
`days` days, both ends included, that end `label-delay-days` days before yesterday, UTC: fraud
reports arrive up to about a week after the transaction, so the latest days are left out until
their labels are in) and creates or updates a Cloud Scheduler job that starts it on a cron
schedule, with the arguments below as the execution's JSON argument. The workflow runs as, and
the scheduler job authenticates as, one service account (created if missing); the script prints
the roles it needs and grants them with --grant-roles.
The templates, the bucket and the worker account come from templates/setup_gcp.sh and
templates/cloudbuild.yaml.

Required:
  --project PROJECT            Google Cloud project id
  --region REGION              region of the workflow, the scheduler job and the Dataflow jobs
  --bucket BUCKET              bucket of setup_gcp.sh (gs:// prefix optional): template specs, examples, models
Options:
  --schedule CRON              unix-cron schedule (default: "0 3 * * 1", Mondays 03:00)
  --time-zone TZ               time zone of the schedule (default: Etc/UTC)
  --days N                     training window in days, both ends included, at least 3 (default: 30)
  --label-delay-days N         the window ends N days before yesterday (UTC), so that the fraud reports
                               of its transactions have arrived; a whole number, 0 or more (default: 7)
  --input GCS_FILE             replay file for backfill (default: gs://BUCKET/history/history.jsonl)
  --model-dir GCS_DIR          model folder the scorer watches (default: gs://BUCKET/models)
  --bigtable-instance ID       required by the backfill template, not written to with no_state (default: rtml-features)
  --workflow NAME              workflow name (default: rtml-retrain)
  --job NAME                   Cloud Scheduler job name (default: rtml-retrain)
  --service-account NAME       account the workflow runs as and the scheduler job uses (default: rtml-retrain)
  --worker-service-account NAME  Dataflow worker account of setup_gcp.sh (default: rtml-dataflow)
  --grant-roles                also grant the service account the roles it needs
  --dry-run                    print every command, one per line, prefixed with "[dry-run] ", and run none
  -h, --help                   this help
Needs the gcloud CLI unless --dry-run.
EOF
}

die() {
    echo "schedule_retrain.sh: $*" >&2
    echo "Run templates/schedule/schedule_retrain.sh --help for usage." >&2
    exit 2
}

set_option() {
    case "$1" in
        --project) PROJECT="$2" ;;
        --region) REGION="$2" ;;
        --bucket) BUCKET="$2" ;;
        --schedule) SCHEDULE="$2" ;;
        --time-zone) TIME_ZONE="$2" ;;
        --days) DAYS="$2" ;;
        --label-delay-days) LABEL_DELAY_DAYS="$2" ;;
        --input) INPUT="$2" ;;
        --model-dir) MODEL_DIR="$2" ;;
        --bigtable-instance) INSTANCE="$2" ;;
        --workflow) WORKFLOW="$2" ;;
        --job) JOB="$2" ;;
        --service-account) SA_NAME="$2" ;;
        --worker-service-account) WORKER_SA_NAME="$2" ;;
    esac
}

VALUE_OPTIONS="--project --region --bucket --schedule --time-zone --days --label-delay-days --input --model-dir --bigtable-instance --workflow --job --service-account --worker-service-account"

while (($#)); do
    case "$1" in
        --dry-run)
            DRY_RUN=1
            shift
            ;;
        --grant-roles)
            GRANT_ROLES=1
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        --*=*)
            [[ " $VALUE_OPTIONS " == *" ${1%%=*} "* ]] || die "unknown option: ${1%%=*}"
            set_option "${1%%=*}" "${1#*=}"
            shift
            ;;
        --*)
            [[ " $VALUE_OPTIONS " == *" $1 "* ]] || die "unknown option: $1"
            (($# >= 2)) || die "$1 needs a value"
            set_option "$1" "$2"
            shift 2
            ;;
        *) die "unknown argument: $1" ;;
    esac
done

[[ -n $PROJECT ]] || die "--project is required"
[[ -n $REGION ]] || die "--region is required"
[[ -n $BUCKET ]] || die "--bucket is required"
BUCKET="${BUCKET#gs://}"
BUCKET="${BUCKET%/}"
[[ $BUCKET != */* ]] || die "--bucket takes a bucket name, not a path: $BUCKET"
[[ $DAYS =~ ^[0-9]+$ ]] && ((10#$DAYS >= 3)) || die "--days must be a whole number of days, at least 3: $DAYS"
DAYS=$((10#$DAYS))
[[ $LABEL_DELAY_DAYS =~ ^[0-9]+$ ]] || die "--label-delay-days must be a whole number of days, 0 or more: $LABEL_DELAY_DAYS"
LABEL_DELAY_DAYS=$((10#$LABEL_DELAY_DAYS))
[[ $(wc -w <<<"$SCHEDULE") -eq 5 ]] || die "--schedule must be a unix-cron expression with 5 fields: $SCHEDULE"
INPUT="${INPUT:-gs://$BUCKET/history/history.jsonl}"
MODEL_DIR="${MODEL_DIR:-gs://$BUCKET/models}"
[[ $INPUT == gs://* ]] || die "--input must be a gs:// path: $INPUT"
[[ $MODEL_DIR == gs://* ]] || die "--model-dir must be a gs:// path: $MODEL_DIR"
SA_EMAIL="$SA_NAME@$PROJECT.iam.gserviceaccount.com"
WORKER_SA_EMAIL="$WORKER_SA_NAME@$PROJECT.iam.gserviceaccount.com"
MEMBER="serviceAccount:$SA_EMAIL"

if ((!DRY_RUN)); then
    command -v gcloud >/dev/null || die "gcloud not found; install the Google Cloud CLI"
fi

# A JSON string literal: quotes and backslashes escaped; control characters refused.
json_string() {
    local text="$1"
    [[ $text != *[[:cntrl:]]* ]] || die "control characters are not allowed in: $text"
    text="${text//\\/\\\\}"
    text="${text//\"/\\\"}"
    printf '"%s"' "$text"
}

# The workflow's argument (see the top of retrain.workflow.yaml), and the Workflow Executions API
# request that Cloud Scheduler posts: the argument goes in as a JSON-encoded string.
ARGUMENT="{\"project\": $(json_string "$PROJECT"), \"region\": $(json_string "$REGION"), \"bucket\": $(json_string "$BUCKET"), \"days\": $DAYS, \"label_delay_days\": $LABEL_DELAY_DAYS, \"input\": $(json_string "$INPUT"), \"model_dir\": $(json_string "$MODEL_DIR"), \"bigtable_instance\": $(json_string "$INSTANCE"), \"service_account\": $(json_string "$WORKER_SA_EMAIL")}"
REQUEST="{\"argument\": $(json_string "$ARGUMENT"), \"callLogLevel\": \"LOG_ERRORS_ONLY\"}"
EXECUTIONS_URI="https://workflowexecutions.googleapis.com/v1/projects/$PROJECT/locations/$REGION/workflows/$WORKFLOW/executions"

log "APIs"
run gcloud services enable "${SERVICES[@]}" "--project=$PROJECT"

log "Service account $SA_EMAIL"
describe_sa=(gcloud iam service-accounts describe "$SA_EMAIL" "--project=$PROJECT")
create_sa=(gcloud iam service-accounts create "$SA_NAME" "--project=$PROJECT" "--display-name=beam-rtml scheduled retraining")
if ((DRY_RUN)); then
    printf '[dry-run] %s >/dev/null 2>&1 || %s\n' "$(shell_line "${describe_sa[@]}")" "$(shell_line "${create_sa[@]}")"
elif "${describe_sa[@]}" >/dev/null 2>&1; then
    log "exists: $SA_EMAIL"
else
    "${create_sa[@]}"
fi

# Roles of the account: "ROLE|command that grants it|why".
ROLES=(
    "roles/workflows.invoker|gcloud projects add-iam-policy-binding $PROJECT --member=$MEMBER --role=roles/workflows.invoker --condition=None|Cloud Scheduler starts executions of the workflow as this account"
    "roles/dataflow.developer|gcloud projects add-iam-policy-binding $PROJECT --member=$MEMBER --role=roles/dataflow.developer --condition=None|the workflow launches the Flex Templates and polls their jobs"
    "roles/iam.serviceAccountUser|gcloud iam service-accounts add-iam-policy-binding $WORKER_SA_EMAIL --project=$PROJECT --member=$MEMBER --role=roles/iam.serviceAccountUser|on the worker account $WORKER_SA_EMAIL only: the jobs run as it"
    "roles/storage.objectViewer|gcloud storage buckets add-iam-policy-binding gs://$BUCKET --member=$MEMBER --role=roles/storage.objectViewer|on gs://$BUCKET only: read the template specs (the jobs themselves write as the worker account)"
    "roles/logging.logWriter|gcloud projects add-iam-policy-binding $PROJECT --member=$MEMBER --role=roles/logging.logWriter --condition=None|the workflow's sys.log lines and call logs"
)

if ((GRANT_ROLES)); then
    log "Roles of $SA_EMAIL"
    for entry in "${ROLES[@]}"; do
        IFS='|' read -r _ command _ <<<"$entry"
        read -r -a words <<<"$command"
        run "${words[@]}"
    done
fi

log "Workflow $WORKFLOW"
run gcloud workflows deploy "$WORKFLOW" "--location=$REGION" "--project=$PROJECT" "--source=$WORKFLOW_SOURCE" \
    "--service-account=$SA_EMAIL" "--description=beam-rtml retraining: backfill (no_state) then train (publish_guard=average_precision)"

log "Cloud Scheduler job $JOB ($SCHEDULE, $TIME_ZONE)"
job_flags=("--location=$REGION" "--project=$PROJECT" "--schedule=$SCHEDULE" "--time-zone=$TIME_ZONE"
    "--uri=$EXECUTIONS_URI" --http-method=POST "--message-body=$REQUEST"
    "--oauth-service-account-email=$SA_EMAIL" "--oauth-token-scope=$TOKEN_SCOPE"
    "--description=Runs the $WORKFLOW workflow: scheduled retraining of beam-rtml")
describe_job=(gcloud scheduler jobs describe "$JOB" "--location=$REGION" "--project=$PROJECT")
update_job=(gcloud scheduler jobs update http "$JOB" "${job_flags[@]}" "--update-headers=Content-Type=application/json")
create_job=(gcloud scheduler jobs create http "$JOB" "${job_flags[@]}" "--headers=Content-Type=application/json")
if ((DRY_RUN)); then
    printf '[dry-run] if %s >/dev/null 2>&1; then %s; else %s; fi\n' "$(shell_line "${describe_job[@]}")" \
        "$(shell_line "${update_job[@]}")" "$(shell_line "${create_job[@]}")"
elif "${describe_job[@]}" >/dev/null 2>&1; then
    "${update_job[@]}"
else
    "${create_job[@]}"
fi

echo
echo "The service account $SA_EMAIL needs these roles$( ((GRANT_ROLES)) && echo " (granted above)" || echo "; grant them with --grant-roles or these commands"):"
for entry in "${ROLES[@]}"; do
    IFS='|' read -r role command why <<<"$entry"
    printf '  %-28s %s\n' "$role" "$why"
    ((GRANT_ROLES)) || printf '      %s\n' "$command"
done
echo "Whoever runs this script needs roles/workflows.editor, roles/cloudscheduler.admin and"
echo "roles/iam.serviceAccountUser on $SA_EMAIL. Run the workflow once now with:"
echo "  gcloud scheduler jobs run $JOB --location=$REGION --project=$PROJECT"

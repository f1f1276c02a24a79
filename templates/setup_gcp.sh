#!/usr/bin/env bash
# Create the Google Cloud resources the beam-rtml Flex Templates use, and a worker service
# account that may touch only those. Safe to run again: whatever exists is left as it is, and
# IAM bindings are added only once. See templates/README.md for what each role is for.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shell_line, log and run, shared with schedule/schedule_retrain.sh.
# shellcheck source-path=SCRIPTDIR
source "$SCRIPT_DIR/common.sh"

# Names fixed by the public contract and rtml/config.py (tests/test_templates.py checks them).
TOPICS=(transactions fraud-feedback fraud-insights dead-letter model-health)
INPUT_TOPICS=(transactions fraud-feedback)
OUTPUT_TOPICS=(fraud-insights dead-letter model-health)
TABLE=features
FAMILIES=(tx fb)
GC_MAX_AGE=38d
ACK_DEADLINE_S=60
SERVICES=(dataflow.googleapis.com pubsub.googleapis.com bigtable.googleapis.com bigtableadmin.googleapis.com
    storage.googleapis.com artifactregistry.googleapis.com cloudbuild.googleapis.com)

PROJECT=""
REGION=""
BUCKET=""
INSTANCE=""
ZONE=""
REPOSITORY="rtml"
SA_NAME="rtml-dataflow"
DRY_RUN=0

usage() {
    cat <<'EOF'
Usage: templates/setup_gcp.sh --project PROJECT --region REGION --bucket BUCKET
                              --bigtable-instance INSTANCE [options]

Creates, unless they exist: the Pub/Sub topics transactions, fraud-feedback, fraud-insights,
dead-letter and model-health, each with a subscription <topic>-sub; the Bigtable instance and its table "features"
(column families tx and fb, garbage collection after 38 days); a Cloud Storage bucket for models,
templates, staging and temp files; an Artifact Registry Docker repository for the template image;
and a worker service account with least-privilege roles on exactly these resources.

Required:
  --project PROJECT            Google Cloud project id
  --region REGION              region of the bucket, the repository and the Dataflow jobs (e.g. us-central1)
  --bucket BUCKET              bucket name (gs:// prefix optional)
  --bigtable-instance ID       Bigtable instance id (6 to 33 characters: a-z, 0-9, -)
Options:
  --bigtable-zone ZONE         zone of the instance's single cluster (default: REGION-b)
  --repository NAME            Artifact Registry repository (default: rtml)
  --service-account NAME       worker service account name (default: rtml-dataflow)
  --dry-run                    print every command, one per line, prefixed with "[dry-run] ", and run none
  -h, --help                   this help
Needs the gcloud CLI and cbt (gcloud components install cbt) unless --dry-run.
EOF
}

die() {
    echo "setup_gcp.sh: $*" >&2
    echo "Run templates/setup_gcp.sh --help for usage." >&2
    exit 2
}

set_option() {
    case "$1" in
        --project) PROJECT="$2" ;;
        --region) REGION="$2" ;;
        --bucket) BUCKET="$2" ;;
        --bigtable-instance) INSTANCE="$2" ;;
        --bigtable-zone) ZONE="$2" ;;
        --repository) REPOSITORY="$2" ;;
        --service-account) SA_NAME="$2" ;;
    esac
}

while (($#)); do
    case "$1" in
        --project | --region | --bucket | --bigtable-instance | --bigtable-zone | --repository | --service-account)
            (($# >= 2)) || die "$1 needs a value"
            set_option "$1" "$2"
            shift 2
            ;;
        --project=* | --region=* | --bucket=* | --bigtable-instance=* | --bigtable-zone=* | --repository=* | --service-account=*)
            set_option "${1%%=*}" "${1#*=}"
            shift
            ;;
        --dry-run)
            DRY_RUN=1
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "unknown option: $1" ;;
    esac
done

[[ -n $PROJECT ]] || die "--project is required"
[[ -n $REGION ]] || die "--region is required"
[[ -n $BUCKET ]] || die "--bucket is required"
[[ -n $INSTANCE ]] || die "--bigtable-instance is required"
BUCKET="${BUCKET#gs://}"
BUCKET="${BUCKET%/}"
[[ $BUCKET != */* ]] || die "--bucket takes a bucket name, not a path: $BUCKET"
[[ $INSTANCE =~ ^[a-z][-a-z0-9]{4,31}[a-z0-9]$ ]] || die "--bigtable-instance must be 6 to 33 characters of a-z, 0-9 and -, starting with a letter: $INSTANCE"
ZONE="${ZONE:-$REGION-b}"
CLUSTER="${INSTANCE:0:27}-c1"
SA_EMAIL="$SA_NAME@$PROJECT.iam.gserviceaccount.com"
MEMBER="serviceAccount:$SA_EMAIL"

if ((!DRY_RUN)); then
    for tool in gcloud cbt; do
        command -v "$tool" >/dev/null || die "$tool not found; install the Google Cloud CLI and its cbt component"
    done
fi

# ensure DESCRIBE... -- CREATE...: run CREATE unless DESCRIBE finds the resource.
ensure() {
    local describe=() create=()
    while [[ $1 != -- ]]; do
        describe+=("$1")
        shift
    done
    shift
    create=("$@")
    if ((DRY_RUN)); then
        printf '[dry-run] %s >/dev/null 2>&1 || %s\n' "$(shell_line "${describe[@]}")" "$(shell_line "${create[@]}")"
    elif "${describe[@]}" >/dev/null 2>&1; then
        log "exists: ${describe[*]}"
    else
        "${create[@]}"
    fi
}

# The table's families and GC rule, also on a table that existed before (cbt is idempotent here
# except createfamily, which runs only for a missing family).
ensure_family() {
    local family="$1" cbt=(cbt "-project=$PROJECT" "-instance=$INSTANCE")
    # `cbt ls TABLE` prints two header lines, then one line per family: name, GC policy.
    local has_family="NR > 2 && \$1 == \"$family\" {found = 1} END {exit !found}"
    if ((DRY_RUN)); then
        printf "[dry-run] %s | awk '%s' || %s\n" "$(shell_line "${cbt[@]}" ls "$TABLE")" "$has_family" \
            "$(shell_line "${cbt[@]}" createfamily "$TABLE" "$family")"
    elif ! "${cbt[@]}" ls "$TABLE" | awk "$has_family"; then
        "${cbt[@]}" createfamily "$TABLE" "$family"
    fi
    run "${cbt[@]}" setgcpolicy "$TABLE" "$family" "maxage=$GC_MAX_AGE"
}

log "APIs"
run gcloud services enable "${SERVICES[@]}" "--project=$PROJECT"

log "Pub/Sub topics and subscriptions"
for topic in "${TOPICS[@]}"; do
    ensure gcloud pubsub topics describe "$topic" "--project=$PROJECT" -- \
        gcloud pubsub topics create "$topic" "--project=$PROJECT"
    retain=()
    if [[ " ${INPUT_TOPICS[*]} " == *" $topic "* ]]; then
        retain=(--retain-acked-messages)  # replayable from a point in time: `rtml seek`
    fi
    ensure gcloud pubsub subscriptions describe "$topic-sub" "--project=$PROJECT" -- \
        gcloud pubsub subscriptions create "$topic-sub" "--topic=$topic" "--ack-deadline=$ACK_DEADLINE_S" \
        "${retain[@]}" "--project=$PROJECT"
done

log "Cloud Storage bucket gs://$BUCKET"
ensure gcloud storage buckets describe "gs://$BUCKET" "--project=$PROJECT" -- \
    gcloud storage buckets create "gs://$BUCKET" "--project=$PROJECT" "--location=$REGION" --uniform-bucket-level-access

log "Bigtable instance $INSTANCE and table $TABLE"
ensure gcloud bigtable instances describe "$INSTANCE" "--project=$PROJECT" -- \
    gcloud bigtable instances create "$INSTANCE" "--project=$PROJECT" "--display-name=${INSTANCE:0:30}" \
    "--cluster-config=id=$CLUSTER,zone=$ZONE,nodes=1" --cluster-storage-type=ssd
gc_families=()
for family in "${FAMILIES[@]}"; do
    gc_families+=("$family:maxage=$GC_MAX_AGE")
done
ensure gcloud bigtable instances tables describe "$TABLE" "--instance=$INSTANCE" "--project=$PROJECT" -- \
    gcloud bigtable instances tables create "$TABLE" "--instance=$INSTANCE" "--project=$PROJECT" \
    "--column-families=$(IFS=,; echo "${gc_families[*]}")"
for family in "${FAMILIES[@]}"; do
    ensure_family "$family"
done

log "Artifact Registry repository $REPOSITORY"
ensure gcloud artifacts repositories describe "$REPOSITORY" "--location=$REGION" "--project=$PROJECT" -- \
    gcloud artifacts repositories create "$REPOSITORY" --repository-format=docker "--location=$REGION" \
    "--project=$PROJECT" "--description=beam-rtml Flex Template image"

log "Worker service account $SA_EMAIL and its roles"
ensure gcloud iam service-accounts describe "$SA_EMAIL" "--project=$PROJECT" -- \
    gcloud iam service-accounts create "$SA_NAME" "--project=$PROJECT" "--display-name=beam-rtml Dataflow launcher and workers"
run gcloud projects add-iam-policy-binding "$PROJECT" "--member=$MEMBER" --role=roles/dataflow.worker --condition=None
for topic in "${INPUT_TOPICS[@]}"; do
    for role in roles/pubsub.subscriber roles/pubsub.viewer; do
        run gcloud pubsub subscriptions add-iam-policy-binding "$topic-sub" "--project=$PROJECT" "--member=$MEMBER" "--role=$role"
    done
done
for topic in "${OUTPUT_TOPICS[@]}"; do
    run gcloud pubsub topics add-iam-policy-binding "$topic" "--project=$PROJECT" "--member=$MEMBER" --role=roles/pubsub.publisher
done
run gcloud bigtable instances add-iam-policy-binding "$INSTANCE" "--project=$PROJECT" "--member=$MEMBER" --role=roles/bigtable.user
run gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" "--member=$MEMBER" --role=roles/storage.objectAdmin
run gcloud artifacts repositories add-iam-policy-binding "$REPOSITORY" "--location=$REGION" "--project=$PROJECT" \
    "--member=$MEMBER" --role=roles/artifactregistry.reader

log "done: run jobs with --service-account-email=$SA_EMAIL (see templates/README.md)"

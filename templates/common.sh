# shellcheck shell=bash
# Shell helpers shared by templates/setup_gcp.sh and templates/schedule/schedule_retrain.sh, which
# both source this file (by a path relative to their own location); not a script of its own.
# `run` reads the sourcing script's DRY_RUN (0, or 1 under --dry-run), which must be set.

# A command as one shell line: arguments quoted only where the shell needs it.
shell_line() {
    local arg out=()
    for arg in "$@"; do
        if [[ $arg =~ ^[-A-Za-z0-9_./:=@,+%]+$ ]]; then
            out+=("$arg")
        else
            out+=("'${arg//\'/\'\\\'\'}'")
        fi
    done
    printf '%s' "${out[*]}"
}

log() { echo "== $*" >&2; }

# Run a command, or print it under --dry-run.
run() {
    if ((DRY_RUN)); then
        printf '[dry-run] %s\n' "$(shell_line "$@")"
    else
        "$@"
    fi
}

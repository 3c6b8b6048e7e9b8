#!/usr/bin/env bash
# Submit `rise serve` as a Ray job: the driver runs on the head node, joins the cluster and keeps
# the Serve app up until `ray job stop <id>` (SIGTERM: the app is deleted).
#
#   export RAY_ADDRESS=http://127.0.0.1:8266   # the cluster's dashboard address
#   export RISE_SERVE_TOKEN=...                # optional: the bearer token the app will require
#   jobs/serve.sh /shared/runs/default/iter_2/checkpoint [--port 8000] [key=value ...]
#
# Ray 2.60 answers `ray job submit` with 401 unless the client sends the cluster's token:
# RAY_AUTH_MODE=token makes the client read ~/.ray/auth_token (copy it from the head node when
# submitting from another machine). See jobs/serve.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 ]]; then
    echo "usage: $0 CHECKPOINT [rise serve options and key=value overrides]" >&2
    exit 2
fi
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8266}"

# jobs/runtime_env.yaml plus the token, written to a private temporary file for --runtime-env: a
# token on a command line is readable by every local user (ps, /proc). The token then shows in
# the job's runtime env in the dashboard (see jobs/serve.md).
umask 077
runtime_env_file=$(mktemp "${TMPDIR:-/tmp}/rise-serve-env.XXXXXX")
trap 'rm -f "$runtime_env_file"' EXIT
python - "$runtime_env_file" <<'PY'
import json, os, sys, yaml
env = yaml.safe_load(open("jobs/runtime_env.yaml")) or {}
if os.environ.get("RISE_SERVE_TOKEN"):
    env.setdefault("env_vars", {})["RISE_SERVE_TOKEN"] = os.environ["RISE_SERVE_TOKEN"].strip()
with open(sys.argv[1], "w") as f:
    json.dump(env, f)  # JSON is YAML: `ray job submit --runtime-env` reads it
PY
# The uploaded working dir comes first on the job's PYTHONPATH, so no `pip install` is needed (one
# would repoint a shared venv's editable install at the job's temporary directory).
ray job submit --no-wait --working-dir . --runtime-env "$runtime_env_file" -- \
    python -m rise_ray.cli serve "$@"

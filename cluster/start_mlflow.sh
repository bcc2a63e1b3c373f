#!/usr/bin/env bash
# Start (or restart) the MLflow tracking server on the Ray head node. The cluster configs run it as
# the last of `head_start_ray_commands`, after `ray start --head`:
#
#   bash ~/entropy-search/cluster/start_mlflow.sh [--host 0.0.0.0] [--port 5000] [--dir ~/mlflow]
#                                                  [--workers 2] [-- <more `mlflow server` options>]
#
# - Runs are stored in <dir>/mlflow.db (SQLite); artifacts under <dir>/artifacts, proxied by the server
#   (`--serve-artifacts`), so workers upload them over HTTP and need no shared disk. For a durable
#   store pass e.g. `-- --backend-store-uri postgresql://... --artifacts-destination s3://bucket/mlflow`
#   (later options win).
# - The server runs detached (own session; log in <dir>/server.log) and stops by itself when Ray stops
#   on this node (`ray stop`, `ray down`, or the `ray stop` that `ray up` runs before restarting Ray):
#   a supervisor polls Ray's address file every 2 s and then stops the server's whole process group.
# - Running it again replaces the running server. It returns once /health answers (exit 1 otherwise).
set -euo pipefail

host=0.0.0.0
port=5000
dir="$HOME/mlflow"
workers=2
mode=start
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --host) host=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --dir) dir=$2; shift 2 ;;
        --workers) workers=$2; shift 2 ;;
        --supervise) mode=supervise; shift ;;
        --) shift; extra=("$@"); break ;;
        *) echo "start_mlflow.sh: unknown option: $1" >&2; exit 2 ;;
    esac
done

# Where `ray start` writes the address of the node's cluster and `ray stop` removes it
# (ray._common.utils.get_ray_address_file: $RAY_TMPDIR, else $TMPDIR, else /tmp).
ray_address_file="${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray/ray_current_cluster"
pidfile="$dir/server.pid"
logfile="$dir/server.log"

if [ "$mode" = supervise ]; then
    # We are the leader of a new session and process group (setsid): the server and everything it
    # starts (uvicorn workers, ...) are in our group, so one signal to the group stops them all.
    echo $$ >"$pidfile"
    # MLflow's job runner (huey consumers, for GenAI features) is not needed for sweeps and costs
    # several processes; set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to keep it.
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
    mlflow server \
        --backend-store-uri "sqlite:///$dir/mlflow.db" \
        --artifacts-destination "$dir/artifacts" \
        --serve-artifacts \
        --host "$host" --port "$port" --workers "$workers" \
        "${extra[@]}" &
    server=$!
    while kill -0 "$server" 2>/dev/null && [ -e "$ray_address_file" ]; do
        sleep 2
    done
    echo "start_mlflow.sh: Ray stopped on this node (or the server exited): stopping MLflow"
    trap '' TERM
    kill -TERM 0 2>/dev/null || true
    for _ in $(seq 20); do
        kill -0 "$server" 2>/dev/null || break
        sleep 0.5
    done
    # Our pid is in the pidfile only while we run; a newer supervisor may have replaced it already.
    [ "$(cat "$pidfile" 2>/dev/null)" = "$$" ] && rm -f "$pidfile"
    kill -KILL 0
fi

health_host=$host
case "$host" in 0.0.0.0 | "::" | "") health_host=127.0.0.1 ;; esac
health_url="http://$health_host:$port/health"

answers() {
    python - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=2).read()
EOF
}

if [ ! -e "$ray_address_file" ]; then
    echo "start_mlflow.sh: Ray is not running on this node ($ray_address_file is missing):" \
        "run it after \`ray start --head\`" >&2
    exit 1
fi
mkdir -p "$dir"

# Replace a server started earlier by this script.
if [ -s "$pidfile" ]; then
    old=$(cat "$pidfile")
    kill -TERM -- "-$old" 2>/dev/null || true
    for _ in $(seq 40); do
        kill -0 -- "-$old" 2>/dev/null || break
        sleep 0.25
    done
    kill -KILL -- "-$old" 2>/dev/null || true
    rm -f "$pidfile"
fi
if answers "$health_url"; then
    echo "start_mlflow.sh: something else already answers on $health_url" >&2
    exit 1
fi

echo "--- $(date -Is) starting mlflow server on $host:$port (store: $dir)" >>"$logfile"
setsid bash "$0" --supervise --host "$host" --port "$port" --dir "$dir" --workers "$workers" \
    -- "${extra[@]}" </dev/null >>"$logfile" 2>&1 &

for _ in $(seq 240); do
    if answers "$health_url"; then
        echo "MLflow tracking server: http://$host:$port (health: $health_url; log: $logfile)"
        exit 0
    fi
    sleep 0.5
done
echo "start_mlflow.sh: MLflow did not answer on $health_url within 120 s; end of $logfile:" >&2
tail -n 40 "$logfile" >&2
exit 1

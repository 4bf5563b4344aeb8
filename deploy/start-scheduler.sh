#!/usr/bin/env bash
# Start the Dask scheduler that cqsa jobs are submitted to.
#
#   deploy/start-scheduler.sh [extra `dask scheduler` options]
#
# Environment:
#   CQSA_SCHEDULER_HOST  interface to listen on (default: all)
#   CQSA_SCHEDULER_PORT  scheduler port (default 8786)
#   CQSA_DASHBOARD_PORT  dashboard port (default 8787)
#
# When cqsa_dask is installed here, the scheduler preloads cqsa_dask.dashboard
# (the /cqsa monitoring page).  Then start workers on each machine
# (deploy/start-worker.sh) and submit with
#   cqsa run STORE --scheduler tcp://HOST:8786
set -euo pipefail

host=${CQSA_SCHEDULER_HOST:-}
port=${CQSA_SCHEDULER_PORT:-8786}
dashboard=${CQSA_DASHBOARD_PORT:-8787}

args=(--port "$port" --dashboard-address "${host}:${dashboard}")
if [ -n "$host" ]; then
    args+=(--host "$host")
fi
has_dashboard='import importlib.util as u, os, sys
s = u.find_spec("cqsa_dask")  # finds the package without importing it (and torch)
sys.exit(not (s and any(os.path.isdir(os.path.join(p, "dashboard")) for p in s.submodule_search_locations)))'
if python3 -c "$has_dashboard" 2> /dev/null; then
    args+=(--preload cqsa_dask.dashboard)
fi
exec dask scheduler "${args[@]}" "$@"

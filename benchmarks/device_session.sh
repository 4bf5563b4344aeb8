#!/bin/bash
# Run one benchmark (python3 -m benchmarks.bench) detached on the GPU machine, across several device calls.
#
# A device call may run 10 minutes; a benchmark of all the GPU targets runs
# longer.  The first call starts the benchmark in its own process session (so it
# outlives the call while the machine stays held), later calls find it
# running; each call waits up to WAIT seconds, then copies the result file
# and the log into $OUT.  Prints RUNNING or DONE, then the log's tail.
#
#   bash benchmarks/device_session.sh WAIT bench-arguments...   (no --out-dir: it is set here)
#   bash benchmarks/device_session.sh WAIT --script FILE        (a script of several steps, run with
#                                                               STATE=the state directory, where its
#                                                               result files and logs go)
#
# On a machine that already ran one (a warm machine), `rm -rf /tmp/cqsa-device-session`
# first to start another.  To stop it: kill -- -$(cat /tmp/cqsa-device-session/pid)
# (its process group), never `pkill -f bench.py`, which matches the calling shell too.
set -u
wait_s=$1; shift
state=/tmp/cqsa-device-session
mkdir -p "$state"
if [ ! -f "$state/pid" ]; then
  if [ "${1:-}" = "--script" ]; then
    STATE=$state setsid nohup bash "$2" > "$state/log" 2>&1 < /dev/null &
  else
    setsid nohup python3 -m benchmarks.bench "$@" --out-dir "$state" > "$state/log" 2>&1 < /dev/null &
  fi
  echo $! > "$state/pid"
  echo "started (pid $(cat "$state/pid")): $*"
fi
pid=$(cat "$state/pid")
end=$((SECONDS + wait_s))
while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$end" ]; do sleep 3; done
cp "$state"/*.json "$state"/*.log "$state"/*.png "$state/log" "${OUT:-/tmp}/" 2>/dev/null
if kill -0 "$pid" 2>/dev/null; then echo RUNNING; else echo DONE; fi
grep -v '^ \|^Traceback\|^distributed\.\|^tornado\.\|^$' "$state/log" | tail -60

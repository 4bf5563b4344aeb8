# Sourced by the GPU session scripts here, after they set S (where logs and results go):
#   step NAME SECONDS command...   runs one step under its own time limit, its output in $S/NAME.log,
#                                  then prints its exit status and the log's last lines
#   $BENCH                         the gpu-perf benchmark, its inputs under /tmp/cqsa-bench, its
#                                  result files in $S
BENCH="python3 -m benchmarks.bench --suite gpu-perf --workdir /tmp/cqsa-bench --out-dir $S"
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name: start $(date -u +%T)"
  timeout "$limit" "$@" > "$S/$name.log" 2>&1
  echo "== $name: rc=$? $(date -u +%T)"
  grep -v '^ \|^Traceback\|^distributed\.\|^tornado\.\|^$' "$S/$name.log" | tail -8
}

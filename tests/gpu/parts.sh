# Shared by run.sh and run_metal.sh (sourced after `cd` to the repository root): each part
# of a suite runs under its own time limit and its outcome is recorded for the report.
# Plain bash 3.2 (macOS): no associative arrays.

limit_to() {  # limit_to SECONDS CMD...: coreutils timeout, or perl's alarm (macOS has neither
  local limit=$1 rc=0; shift  # timeout nor gtimeout unless coreutils is installed)
  if command -v timeout >/dev/null; then timeout "$limit" "$@" || rc=$?
  elif command -v gtimeout >/dev/null; then gtimeout "$limit" "$@" || rc=$?
  else perl -e 'alarm shift; exec @ARGV' "$limit" "$@" || rc=$?; (( rc == 142 )) && rc=124
  fi
  return $rc
}

STATUS_LINES=""  # name<TAB>status per part
part() {  # part NAME TIMEOUT CMD...: run under a timeout, record ok / failed / timed out
  local name=$1 limit=$2; shift 2
  echo "== $name (timeout ${limit}s)"
  local t0=$(date +%s) rc=0
  limit_to "$limit" "$@" || rc=$?
  local took=$(( $(date +%s) - t0 ))
  local status
  case $rc in 0) status="ok ${took}s";; 124) status="timed out ${took}s";;
              *) status="failed rc=$rc ${took}s";; esac
  STATUS_LINES+="$name"$'\t'"$status"$'\n'
  echo "== $name: $status"
}

report() {  # gpu-results.json and gpu-results.md from the parts' outcomes and their outputs
  STATUS_JSON="$STATUS_LINES" python3 tests/gpu/report.py gpu-tests.xml gpu-bench.json \
    gpu-results.json gpu-results.md
  cat gpu-results.md
}

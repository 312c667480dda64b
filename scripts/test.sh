#!/usr/bin/env bash
# Runs the whole test suite: unit tests, integration tests against real etcd clusters that the
# harness starts and stops itself, and the benchmarks once each at tiny size (so they do not rot).
# Ends with one summary line of all the test binaries' counts, then the chaos suite's figures.
#
# The suite runs in a session of its own, which every process it starts inherits (etcd members,
# sidecar binaries, nginx and its workers, wrk), orphans included. When it ends, the session must
# be empty: anything left in it is a process the harness failed to stop, listed, killed, and a
# failure of the run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
figures=target/tmp/chaos-figures.txt
rm -f "$figures"

# Live processes (not zombies) of session $1, as "pid command line", from /proc (ps may be absent).
in_session() {
  local stat fields
  for stat in /proc/[0-9]*/stat; do
    stat=$(cat "$stat" 2>/dev/null) || continue
    # After "pid (name) ": state ppid pgrp session ...; the name may hold spaces and parentheses.
    read -ra fields <<<"${stat##*) }"
    if [ "${fields[3]}" = "$1" ] && [ "${fields[0]}" != Z ]; then
      echo "${stat%% *} $(tr '\0' ' ' <"/proc/${stat%% *}/cmdline" 2>/dev/null)"
    fi
  done
}

stop_session() {
  local pids
  pids=$(in_session "$session" | cut -d" " -f1)
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
}

# Not a process group leader (a script has no job control), setsid(1) calls setsid() in the process
# it then execs, so $! is the new session's id. wait is interrupted by a trapped signal, so Ctrl-C
# or a TERM to this script stops the whole suite rather than leaving it running unseen.
setsid bash -o pipefail -c 'cargo test --all-targets 2>&1 | tee "$0"' "$log" &
session=$!
trap 'stop_session; exit 130' INT TERM
wait "$session" || status=$?
trap - INT TERM

awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
# The chaos suite's figures (faults, reads and events checked, violations, convergence).
if [ -f "$figures" ]; then cat "$figures"; fi

# A process killed a moment ago may still be exiting: wait for the session to empty, up to 10 s.
for _ in $(seq 100); do
  [ -z "$(in_session "$session")" ] && break
  sleep 0.1
done
left=$(in_session "$session")
if [ -n "$left" ]; then
  echo "the test suite left processes running (now killed):" >&2
  echo "$left" >&2
  stop_session
  exit 1
fi
echo "processes: none left running"
exit "${status:-0}"

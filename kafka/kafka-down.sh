#!/usr/bin/env bash
# Stop the broker that kafka-up.sh started, by the PID it recorded; nothing else is touched.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
state="${EPCWATCH_KAFKA_HOME:-$here/../.cache/kafka}"
pidfile="$state/broker.pid"

if [ ! -f "$pidfile" ]; then
  echo "kafka: no broker started from here (no $pidfile)"
  exit 0
fi
pid="$(cat "$pidfile")"
if kill -0 "$pid" 2>/dev/null; then
  kill -TERM "$pid"
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "kafka: broker $pid did not stop in 30 s; killing it"
    kill -KILL "$pid"
  fi
  echo "kafka: broker $pid stopped"
else
  echo "kafka: broker $pid was not running"
fi
rm -f "$pidfile"

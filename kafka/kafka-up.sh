#!/usr/bin/env bash
# Start a single-node Apache Kafka broker (KRaft) on 127.0.0.1 from the official jars, resolved
# from Maven Central. Idempotent: a broker that already answers on the port is reused.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
state="${EPCWATCH_KAFKA_HOME:-$here/../.cache/kafka}"
port="${EPCWATCH_KAFKA_PORT:-9092}"
controller_port="${EPCWATCH_KAFKA_CONTROLLER_PORT:-9093}"
libs="$state/libs"
data="$state/data"
pidfile="$state/broker.pid"
log="$state/broker.log"
mkdir -p "$state"

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

if answers; then
  echo "kafka: a broker already answers on 127.0.0.1:$port; reusing it"
  exit 0
fi

if [ ! -f "$libs/.complete" ]; then
  echo "kafka: resolving broker jars from Maven Central into $libs"
  rm -rf "$libs"
  mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies -DoutputDirectory="$libs"
  touch "$libs/.complete"
fi

cat > "$state/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$data
num.partitions=4
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
message.max.bytes=1048588
log.retention.hours=168
PROPS

classpath="$libs/*"
java_opts=(-Xms256m -Xmx1g -XX:+UseG1GC -Djava.awt.headless=true
  "-Dlog4j2.configurationFile=$here/log4j2.properties" "-Dkafka.logs.dir=$state/logs")

if [ ! -f "$data/meta.properties" ]; then
  echo "kafka: formatting KRaft storage in $data"
  cluster_id="$(java -cp "$classpath" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)"
  java "${java_opts[@]}" -cp "$classpath" kafka.tools.StorageTool format \
    -t "$cluster_id" -c "$state/server.properties"
fi

echo "kafka: starting broker on 127.0.0.1:$port (log: $log)"
nohup java "${java_opts[@]}" -cp "$classpath" kafka.Kafka "$state/server.properties" \
  >"$log" 2>&1 </dev/null &
echo $! > "$pidfile"

for _ in $(seq 1 120); do
  if answers; then
    echo "kafka: broker is up (pid $(cat "$pidfile"))"
    exit 0
  fi
  if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "kafka: broker exited during start; last lines of $log:" >&2
    tail -30 "$log" >&2
    exit 1
  fi
  sleep 0.5
done
echo "kafka: broker did not answer on 127.0.0.1:$port within 60 s; see $log" >&2
exit 1

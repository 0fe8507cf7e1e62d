# Shared settings of the local Kafka and Redis scripts. Sourced, not run.
# Every value can be overridden from the environment.
set -euo pipefail

LOCAL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LOCAL_DIR/../.." && pwd)"

STATE_DIR="${GUARDSTREAM_LOCAL_STATE:-$LOCAL_DIR/.state}"
KAFKA_HOST="${GUARDSTREAM_LOCAL_KAFKA_HOST:-127.0.0.1}"
KAFKA_PORT="${GUARDSTREAM_LOCAL_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${GUARDSTREAM_LOCAL_KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_HEAP="${GUARDSTREAM_LOCAL_KAFKA_HEAP:-512m}"
KAFKA_DIR="${GUARDSTREAM_LOCAL_KAFKA_DIR:-$STATE_DIR/kafka}"
KAFKA_LIBS="${GUARDSTREAM_LOCAL_KAFKA_LIBS:-$STATE_DIR/kafka-libs}"
REDIS_HOST="${GUARDSTREAM_LOCAL_REDIS_HOST:-127.0.0.1}"
REDIS_PORT="${GUARDSTREAM_LOCAL_REDIS_PORT:-6379}"
REDIS_DIR="${GUARDSTREAM_LOCAL_REDIS_DIR:-$STATE_DIR/redis}"
START_TIMEOUT="${GUARDSTREAM_LOCAL_START_TIMEOUT:-120}"

KAFKA_PID="$KAFKA_DIR/kafka.pid"
REDIS_PID="$REDIS_DIR/redis.pid"

# The Python that runs the readiness probe: the project's venv when there is one.
if [[ -z "${GUARDSTREAM_LOCAL_PYTHON:-}" ]]; then
  if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
    GUARDSTREAM_LOCAL_PYTHON="$REPO_ROOT/.venv/bin/python"
  else
    GUARDSTREAM_LOCAL_PYTHON="python3"
  fi
fi

log() { printf '[deploy/local] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# alive PIDFILE: true when the pid file names a running process.
alive() {
  local pidfile=$1 pid
  [[ -f "$pidfile" ]] || return 1
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null
}

# port_busy HOST PORT: true when something accepts connections there.
port_busy() {
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

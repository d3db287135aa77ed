#!/usr/bin/env bash
# Make sure a Redis answers on 127.0.0.1:${MDLORA_TEST_REDIS_PORT:-6379}; start one if not.
set -euo pipefail
PORT=${MDLORA_TEST_REDIS_PORT:-6379}
ping() { (exec 3<>/dev/tcp/127.0.0.1/"$PORT" && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG) 2>/dev/null; }
if ping; then
  exit 0
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "[redis] nothing answers on port $PORT and redis-server is not installed;" \
       "tests that need Redis will be skipped (apt-get install redis-server)" >&2
  exit 0
fi
echo "[redis] starting redis-server on 127.0.0.1:$PORT"
redis-server --daemonize yes --bind 127.0.0.1 --port "$PORT" --save "" --appendonly no \
  --dir /tmp --logfile "/tmp/mdlora-redis-$PORT.log"
for _ in $(seq 50); do ping && exit 0; sleep 0.1; done
echo "[redis] redis-server did not answer on port $PORT" >&2
exit 1

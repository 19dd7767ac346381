#!/usr/bin/env bash
# `make run`: two mock providers and the router on :8080 from envoy/examples/config.yaml, or
# `make run CONFIG=path` for a user's config (real providers, no mocks). Ctrl-C stops everything.
set -uo pipefail
cd "$(dirname "$0")/.."
CLI=target/debug/auto-ai-router
MOCK=target/debug/mock-provider
CONFIG="${1:-}"
LOGS=.run
mkdir -p "$LOGS"

pids=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  echo "stopped."
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_of() { # config port (server.port), default 8080
  local p
  p=$(sed -n 's/^[[:space:]]*port:[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$1" | head -n 1)
  echo "${p:-8080}"
}

start_mock() { # name port key models
  "$MOCK" --name "$1" --port "$2" --key "$3" --models "$4" --chunks 8 --chunk-delay-ms 40 >"$LOGS/$1.log" 2>&1 &
  pids+=($!)
}

demo=0
if [ -z "$CONFIG" ]; then
  demo=1
  CONFIG=envoy/examples/config.yaml
  start_mock mock_a 18301 sk-mock-a-key gpt-4o,gpt-4o-mini
  start_mock mock_b 18302 sk-mock-b-key gpt-4o-mini,text-embedding-3-small,gpt-3.5-turbo
  for _ in $(seq 50); do
    grep -q listening "$LOGS/mock_a.log" && grep -q listening "$LOGS/mock_b.log" && break
    sleep 0.1
  done
  for m in mock_a mock_b; do
    if ! grep -q listening "$LOGS/$m.log"; then
      echo "mock provider $m did not start (port busy?):"; cat "$LOGS/$m.log"; exit 1
    fi
  done
  echo "mock providers: mock_a on 127.0.0.1:18301 (gpt-4o, gpt-4o-mini), mock_b on 127.0.0.1:18302 (gpt-4o-mini, text-embedding-3-small, gpt-3.5-turbo)"
fi

"$CLI" validate --config "$CONFIG" || exit 1
PORT=$(port_of "$CONFIG")
"$CLI" run --config "$CONFIG" &
pids+=($!)
router=$!

up=0
for _ in $(seq 100); do
  kill -0 "$router" 2>/dev/null || break
  if curl -s -o /dev/null "http://127.0.0.1:$PORT/health"; then up=1; break; fi
  sleep 0.1
done
if [ "$up" != 1 ]; then
  echo "the router did not come up on :$PORT (see the messages above)"; exit 1
fi

if [ "$demo" = 1 ]; then
cat <<TRY

Auto AI Router is up on http://localhost:$PORT (master key sk-your-secret-key). Try:

  curl -s localhost:$PORT/health
  curl -s localhost:$PORT/v1/models -H 'Authorization: Bearer sk-your-secret-key'
  curl -s localhost:$PORT/v1/chat/completions -H 'Authorization: Bearer sk-your-secret-key' \\
       -H 'Content-Type: application/json' -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello!"}]}'
  curl -sN localhost:$PORT/v1/chat/completions -H 'Authorization: Bearer sk-your-secret-key' \\
       -d '{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Hello!"}]}'
  curl -s localhost:$PORT/metrics | grep auto_ai_router_
  curl -s localhost:18301/_stats        # what mock_a received (per key, per model)

  .venv/bin/python -c 'from openai import OpenAI; c = OpenAI(api_key="sk-your-secret-key", base_url="http://localhost:$PORT/v1"); print(c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}]).choices[0].message.content)'

Failure injection: curl -s localhost:18301/_control -d '{"fail_next":3,"fail_status":503}'  (then watch fail2ban in /health)
Ctrl-C stops the router and the mocks.
TRY
else
  echo "Auto AI Router is up on http://localhost:$PORT with $CONFIG. Ctrl-C stops it."
fi
wait "$router"

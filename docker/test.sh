#!/usr/bin/env bash
# End-to-end check of the Docker packaging, CPU variant (not run by CI: it needs a Docker engine).
#   make docker-test            # or: bash docker/test.sh
# Builds the images, brings the compose stack up under its own project name, then checks: the real digit
# scans in examples/ through POST /predict (multipart and raw body), the API container's health (healthy)
# and user (non-root), and Prometheus reporting the API target as up. Tears everything down on exit.
# Published on 127.0.0.1 only. Every wait is bounded. Settings (environment):
#   DOCKER                          docker CLI with the compose v2 plugin (default: docker)
#   RESNET_DOCKER_WHEELS_DIR        local wheels for the builder, e.g. an offline CPU torch
#                                   (default: /opt/wheels when it exists; else torch from the PyTorch CPU index)
#   RESNET_DOCKER_API_PORT          host port for the API (default 18000, away from a dev server on 8000)
#   RESNET_DOCKER_PROMETHEUS_PORT   host port for Prometheus (default 19090)
#   BUILD_TIMEOUT_S / UP_TIMEOUT_S  bounds for the build (default 3600: first build trains the model) and start-up
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
BUILD_TIMEOUT_S=${BUILD_TIMEOUT_S:-3600}
UP_TIMEOUT_S=${UP_TIMEOUT_S:-300}
export RESNET_DOCKER_PUBLISH_ADDR=127.0.0.1
export RESNET_DOCKER_API_PORT=${RESNET_DOCKER_API_PORT:-18000}
export RESNET_DOCKER_PROMETHEUS_PORT=${RESNET_DOCKER_PROMETHEUS_PORT:-19090}
export DOCKER_BUILDKIT=1
compose=("$DOCKER" compose --project-name resnet-serve-test -f docker-compose.yml -f docker-compose.cpu.yml)
api=http://127.0.0.1:$RESNET_DOCKER_API_PORT
prometheus=http://127.0.0.1:$RESNET_DOCKER_PROMETHEUS_PORT
tmp=$(mktemp -d)

step() { printf '==> %s\n' "$*"; }
fail() {
  printf 'FAIL: %s\n' "$*" >&2
  exit 1
}
cleanup() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    "${compose[@]}" ps -a >&2 || true
    "${compose[@]}" logs --no-color --tail 40 >&2 || true
  fi
  step "tearing down"
  "${compose[@]}" down --volumes --remove-orphans --timeout 30 >/dev/null 2>&1 || true
  rm -rf "$tmp"
  exit "$status"
}
trap cleanup EXIT

# Poll COMMAND until it succeeds, for at most SECONDS.
wait_for() {
  local seconds=$1 what=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "$what: not within ${seconds}s"
    sleep 2
  done
}

wheels=${RESNET_DOCKER_WHEELS_DIR:-}
if [ -z "$wheels" ] && [ -d /opt/wheels ]; then
  wheels=/opt/wheels
fi
if [ -n "$wheels" ]; then
  step "local wheels from $wheels (image resnet-serve-wheels:local)"
  "$DOCKER" build --quiet --tag resnet-serve-wheels:local --file docker/wheels.Dockerfile "$wheels" >/dev/null
  export RESNET_DOCKER_WHEELS_IMAGE=resnet-serve-wheels:local
fi

# One service at a time: the builds share stages, and the machine's cores.
for service in model api prometheus; do
  step "building $service"
  start=$SECONDS
  timeout "$BUILD_TIMEOUT_S" "${compose[@]}" build "$service" >"$tmp/build-$service.log" 2>&1 ||
    { tail -n 30 "$tmp/build-$service.log" >&2; fail "docker compose build $service"; }
  echo "    $((SECONDS - start))s"
done
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' |
  grep -E '^resnet-serve(-builder|-prometheus)?:(cpu|gpu|latest) ' | sed 's/^/    /' || true

step "starting the stack (model one-shot, api, prometheus)"
timeout "$UP_TIMEOUT_S" "${compose[@]}" up --detach --no-build --quiet-pull

api_id=$("${compose[@]}" ps --quiet api)
[ -n "$api_id" ] || fail "the api container did not start"
health() { "$DOCKER" inspect --format '{{.State.Health.Status}}' "$api_id"; }
healthy() { [ "$(health)" = healthy ]; }
wait_for "$UP_TIMEOUT_S" "api container healthy" healthy
model_exit=$("$DOCKER" inspect --format '{{.State.ExitCode}}' "$("${compose[@]}" ps --all --quiet model)")
echo "    model one-shot exit code: $model_exit; api health: $(health); api uid: $("$DOCKER" exec "$api_id" id -u)"
[ "$("$DOCKER" exec "$api_id" id -u)" != 0 ] || fail "the api runs as root"

step "POST /predict with the shipped digit scans (examples/, from the validation split)"
pngs=(examples/digit-*.png)
files=()
for png in "${pngs[@]}"; do
  files+=(-F "files=@$png;type=image/png")
done
curl --silent --show-error --fail-with-body --max-time 30 "${files[@]}" "$api/predict?top_k=3" >"$tmp/multipart.json" ||
  fail "multipart /predict: $(cat "$tmp/multipart.json")"
first=${pngs[0]}
curl --silent --show-error --fail-with-body --max-time 30 -H 'Content-Type: image/png' \
  --data-binary "@$first" "$api/predict" >"$tmp/raw.json" || fail "raw-body /predict: $(cat "$tmp/raw.json")"
python3 - "$tmp/multipart.json" "$tmp/raw.json" "$(basename "$first")" <<'EOF'
import json
import sys

multipart, raw = (json.load(open(path)) for path in sys.argv[1:3])
print(f"    model {multipart['model_name']} {multipart['model_version']}")
correct = 0
for result in multipart["results"]:
    expected = result["filename"].removeprefix("digit-").removesuffix(".png")
    top = result["predictions"][0]
    correct += top["label"] == expected
    print(f"    {result['filename']}: top-1 {top['label']} ({top['score']:.3f}), expected {expected}")
top = raw["results"][0]["predictions"][0]
print(f"    raw body {sys.argv[3]}: top-1 {top['label']} ({top['score']:.3f})")
# The demo model is ~98% accurate on held-out digits: allow one miss, not more.
if correct < len(multipart["results"]) - 1:
    sys.exit(f"FAIL: only {correct}/{len(multipart['results'])} digits classified correctly")
EOF

step "Prometheus scrapes the API"
target_up() {
  curl --silent --max-time 5 "$prometheus/api/v1/targets" >"$tmp/targets.json" &&
    python3 -c '
import json, sys
targets = json.load(open(sys.argv[1]))["data"]["activeTargets"]
sys.exit(not any(t["labels"]["job"] == "resnet-serve" and t["health"] == "up" for t in targets))
' "$tmp/targets.json"
}
wait_for 60 "Prometheus target resnet-serve up" target_up
python3 - "$tmp/targets.json" <<'EOF'
import json
import sys

for target in json.load(open(sys.argv[1]))["data"]["activeTargets"]:
    job, url = target["labels"]["job"], target["scrapeUrl"]
    print(f"    {job} {url}: {target['health']} (last scrape {target['lastScrape']})")
EOF
curl --silent --max-time 5 "$api/metrics" | grep -E '^resnet_serve_[a-z_]+_total' | head -n 5 | sed 's/^/    /'

step "docker packaging OK"

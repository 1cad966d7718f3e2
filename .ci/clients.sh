#!/usr/bin/env bash
# Check the service the way its clients see it: validate openapi.json and generate the mobile
# clients from it, then start the service as the README does (gunicorn, a free loopback port, a
# known key, a fresh uploads folder), run the Postman collection with a pinned newman and fuzz
# the contract with schemathesis.
# Needs .venv (requirements-dev.txt), Java and Node.js with npx. Fails if any of them fails.
set -euo pipefail
cd "$(dirname "$0")/.."

key=ci-key-0123456789abcdefghijklmnopqrstuv
metrics_token=ci-metrics-0123456789abcdefghijklmnopqrs
work=$(mktemp -d)
port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
trap 'rm -rf "$work"' EXIT

.venv/bin/openapi-spec-validator openapi.json

# Mobile teams generate their clients from the document with OpenAPI Generator: the Kotlin and
# Swift ones must come out without an error, and without a warning about the document. The
# warnings let through are about the generator itself (its 3.1 support, swift5 giving way to
# swift6) and Swift's renaming of the enum of Problem's `type`, a reserved word there (the JSON
# member keeps its name).
known_warnings='OpenAPI 3.1 support is still in beta|This generator has been deprecated'
known_warnings+="|Generator 'swift5' is considered deprecated"
known_warnings+='|Type \(reserved word\) cannot be used as model name'
for generator in kotlin swift5; do
    if ! .venv/bin/openapi-generator-cli generate --input-spec openapi.json --generator-name "$generator" \
        --output "$work/clients/$generator" >"$work/$generator.log" 2>&1 </dev/null; then
        cat "$work/$generator.log" >&2
        exit 1
    fi
    if grep -w WARN "$work/$generator.log" | grep -Ev "$known_warnings" >&2; then
        echo "OpenAPI Generator ($generator) warns about openapi.json" >&2
        exit 1
    fi
    files=$(find "$work/clients/$generator" -type f | wc -l)
    echo "OpenAPI Generator made the $generator client ($files files)"
done

# Settings given explicitly, so a developer's .env cannot change what the clients see (no rate
# limits: schemathesis sends thousands of requests; metrics on, so that /metrics is fuzzed too).
env -u PORT API_KEY="$key" UPLOAD_DIR="$work/uploads" LOG_LEVEL=WARNING CORS_ORIGINS= STORAGE_URL= \
    METRICS_TOKEN="$metrics_token" RATE_LIMIT_UPLOAD= RATE_LIMIT_ANALYZE= RATE_LIMIT_AUTH_FAILURES= \
    .venv/bin/gunicorn --config gunicorn.conf.py --bind "127.0.0.1:$port" </dev/null >"$work/server.log" 2>&1 &
server=$!
stop() {
    status=$?
    kill -TERM "$server" 2>/dev/null && wait "$server" 2>/dev/null
    ((status == 0)) || tail -n 50 "$work/server.log" >&2
    rm -rf "$work"
}
trap stop EXIT

for _ in $(seq 100); do
    curl -fsS "$url/health" >/dev/null 2>&1 && break
    kill -0 "$server" || { echo "the service did not start" >&2; exit 1; }
    sleep 0.2
done

# Collection variables are overridden by environment variables (--env-var), not by globals.
npx --yes newman@6.2.2 run postman/skin-analysis.postman_collection.json --working-dir postman \
    --env-var "baseUrl=$url" --env-var "apiKey=$key" --env-var "metricsToken=$metrics_token" </dev/null

# Every check on every operation but one: positive_data_acceptance is off for upload, whose file
# a schema cannot require to be an image, so the schema-valid files schemathesis makes are
# refused (and schemathesis may warn that upload mostly rejected its data: the same fact).
# schemathesis runs all checks by default; `--checks all` would override this file. /metrics
# takes its bearer token, not the API key.
cat >"$work/schemathesis.toml" <<TOML
[[operations]]
include-operation-id = "uploadImage"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-operation-id = "getMetrics"
headers = { Authorization = "Bearer $metrics_token" }
TOML
fuzz() {
    .venv/bin/schemathesis --config-file "$work/schemathesis.toml" run openapi.json -H "X-API-Key: $key" \
        --max-examples 30 --seed 20261122 --continue-on-failure "$@" </dev/null
}
# The document describes each route once, with /api/v1 as its second server: fuzz both. The
# paths that name their own servers (/openapi.json, /docs, /metrics) are served at the root only.
mapfile -t root_only < <(.venv/bin/python -c 'import json
for path, item in json.load(open("openapi.json"))["paths"].items():
    if "servers" in item:
        print(f"--exclude-path={path}")')
fuzz --url "$url" --max-time 240
fuzz --url "$url/api/v1" "${root_only[@]}" --max-time 120

#!/usr/bin/env bash
# Runs every test of mxq: unit, end-to-end with real peers, fault and
# cluster tests. Installs the Debian packages the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
# MXQ_E2E=require: a test whose peer program is missing fails instead of
# skipping, so a green run means everything really ran.
export MXQ_E2E=require
go vet ./...
go test -count=1 -timeout 25m -skip '^(TestScenario|TestScaleSmall)' ./...
# The drain scenarios assert the drain time against the test store's
# capacity (≤ 1.2 × optimal), and the scale benchmark's small run compares
# rates at two backlogs, so they run alone: with the other packages beside
# them on two cores, they would be measuring those packages' CPU use.
go test -count=1 -timeout 10m -run '^TestScenario' ./queue/drain
go test -count=1 -timeout 15m -run '^TestScaleSmall$' ./bench/scale
for f in ./queue/envelope:FuzzDecode ./relay:FuzzSession ./internal/mailaddr:FuzzParse; do go test -run '^$' -fuzz="^${f#*:}\$" -fuzztime=10s "${f%%:*}"; done
(cd deploy/helm/test && go test -mod=mod -count=1 ./...)

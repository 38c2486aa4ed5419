#!/usr/bin/env bash
# The main job on a fresh machine, in one command: installs Debian's
# docker-registry, curl and python3 if missing, starts a sample registry on
# loopback with sample function images, runs `fn-image-resolver serve` with
# the webhook on https://127.0.0.1:8443, sends it the AdmissionReview of a
# function pod exactly as the Porch function runner makes it, and prints
# the answer, the JSON Patch and the patched pod.
set -euo pipefail
cd "$(dirname "$0")/.."
FNIR_QUICKSTART=1 scripts/install-test-deps.sh
exec scripts/demo-webhook.sh

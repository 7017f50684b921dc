#!/usr/bin/env bash
# Debian packages the end-to-end tier (`make test-all`) needs, installed when missing (one apt run):
# - chromium: tests/test_browser.py and tests/test_approval.py drive Debian's chromium with Playwright
#   (its own browser download cannot work without network)
# - podman, runc, debootstrap: tests/test_containers.py builds and runs the stage image (runc: crun cannot
#   set rlimits in some sandboxes; debootstrap: the base image when no registry is reachable)
set -euo pipefail
missing=()
for cmd in chromium podman runc debootstrap; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
if ((${#missing[@]})); then
  SUDO=$([[ $(id -u) == 0 ]] || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

#!/usr/bin/env bash
# System packages the tests drive for real: Debian chromium + chromedriver (web page end-to-end)
# and Orthanc with its DICOMweb plugin (PACS source). Installs them only when missing.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
# nginx in front of medrag serve, for the slow-client tests (tests/test_slow_clients.py)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing ${missing[*]} (Debian packages the tests use)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
# the orthanc package may start a system service on port 8042; the tests run their own instance
$SUDO service orthanc stop >/dev/null 2>&1 || true
# the nginx package may start a system service on port 80; the tests run their own instance
$SUDO service nginx stop >/dev/null 2>&1 || true

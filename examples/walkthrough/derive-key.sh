#!/usr/bin/env bash
# The walkthrough's group-key derivation: HMAC-SHA256 of the registration id under the
# base64-decoded group key, base64-encoded.
# Usage: derive-key.sh GROUP_KEY REGISTRATION_ID
set -euo pipefail
KEY=$1
REG_ID=$2
keybytes=$(echo "$KEY" | base64 --decode | xxd -p -u -c 1000)
echo -n "$REG_ID" | openssl sha256 -mac HMAC -macopt hexkey:"$keybytes" -binary | base64

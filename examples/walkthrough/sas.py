#!/usr/bin/env python3
"""SAS token generator from the DPS REST walkthrough (its Python 2 script, ported to
Python 3 without changing the algorithm): sign quote_plus(uri) + "\n" + expiry with the
base64-decoded key, then urlencode the fields.

Usage: sas.py URI KEY [POLICY] [EXPIRY_SECONDS]
  device token:  sas.py "$SCOPE/registrations/$REG_ID" "$DEVICE_KEY" registration
  service token: sas.py "$HOST" "$POLICY_KEY" provisioningserviceowner
"""
import sys
from base64 import b64decode, b64encode
from hashlib import sha256
from hmac import HMAC
from time import time
from urllib.parse import quote_plus, urlencode


def generate_sas_token(uri, key, policy_name, expiry=3600):
    ttl = time() + expiry
    sign_key = "%s\n%d" % ((quote_plus(uri)), int(ttl))
    signature = b64encode(HMAC(b64decode(key), sign_key.encode("utf-8"), sha256).digest())

    rawtoken = {"sr": uri, "sig": signature, "se": str(int(ttl))}

    if policy_name is not None:
        rawtoken["skn"] = policy_name

    return "SharedAccessSignature " + urlencode(rawtoken)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    policy = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
    expiry = int(sys.argv[4]) if len(sys.argv) > 4 else 3600
    print(generate_sas_token(sys.argv[1], sys.argv[2], policy, expiry))

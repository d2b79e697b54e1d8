#!/usr/bin/env python3
# Interop harness: registers one device against a DPS-compatible endpoint with the STOCK
# Azure IoT Python device SDK (azure-iot-device, pinned in requirements.txt) and prints one
# line of JSON on stdout describing the outcome.
#
# Environment:
#   PROVISIO_HOST    host name of the endpoint (the SDK uses port 8883 for MQTT, 443 for
#                    MQTT over WebSockets).
#   ID_SCOPE, REGISTRATION_ID
#   WEBSOCKETS       "1": MQTT over WebSockets (wss://host:443/$iothub/websocket).
#   SYMMETRIC_KEY    base64 device key; or CERT_FILE and KEY_FILE (PEM) for X.509.
#   CA_FILE          PEM CA certificate to trust (server_verification_cert).
#   PAYLOAD          optional JSON text sent as the registration payload.
#
# Output: {"ok": true, "result": {...}} with exit code 0, or {"ok": false, "error": {...}}
# with exit code 1.
import json
import os
import sys


def main():
    from azure.iot.device import X509, ProvisioningDeviceClient

    env = os.environ
    common = dict(
        provisioning_host=env["PROVISIO_HOST"],
        registration_id=env["REGISTRATION_ID"],
        id_scope=env["ID_SCOPE"],
        websockets=env.get("WEBSOCKETS") == "1",
        server_verification_cert=open(env["CA_FILE"]).read(),
    )
    if "SYMMETRIC_KEY" in env:
        client = ProvisioningDeviceClient.create_from_symmetric_key(symmetric_key=env["SYMMETRIC_KEY"], **common)
    else:
        x509 = X509(cert_file=env["CERT_FILE"], key_file=env["KEY_FILE"])
        client = ProvisioningDeviceClient.create_from_x509_certificate(x509=x509, **common)
    if "PAYLOAD" in env:
        client.provisioning_payload = json.loads(env["PAYLOAD"])
    result = client.register()
    state = result.registration_state
    return {
        "status": result.status,
        "operationId": result.operation_id,
        "assignedHub": state.assigned_hub if state else None,
        "deviceId": state.device_id if state else None,
        "substatus": state.sub_status if state else None,
        "payload": json.loads(state.response_payload) if state else None,
    }


if __name__ == "__main__":
    try:
        out, code = {"ok": True, "result": main()}, 0
    except Exception as e:  # the SDK's errors, reported to the test
        cause = getattr(e, "__cause__", None)
        out = {"ok": False, "error": {"name": type(e).__name__, "message": str(e), "cause": repr(cause)}}
        code = 1
    print(json.dumps(out), flush=True)
    sys.exit(code)

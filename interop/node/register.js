#!/usr/bin/env node
// Copyright (c) Provisio contributors.
//
// Interop harness: registers one device against a DPS-compatible endpoint
// using the STOCK Azure IoT Node.js device SDK from npm, and prints exactly one
// line of JSON on stdout describing the outcome.
//
// Environment contract (see README.md):
//   PROVISIO_HOST   host name of the DPS endpoint (required), e.g. "localhost".
//                   HTTP always uses port 443; MQTT defaults to 8883 and AMQP
//                   to 5671 (those two also accept "host:port").
//   ID_SCOPE        ID scope (required).
//   REGISTRATION_ID registration id (required).
//   TRANSPORT       "http" (default) | "mqtt" | "amqp" | "mqtt-ws" | "amqp-ws"
//                   (the last two: MQTT or AMQP over WebSockets, which the SDK
//                   always sends to wss://PROVISIO_HOST:443/$iothub/websocket).
//   ATTESTATION     "symmetricKey" (default) | "x509" | "tpm".
//   SYMMETRIC_KEY   base64 device key (required for symmetricKey).
//   CERT_FILE       PEM device certificate (chain allowed), for x509.
//   KEY_FILE        PEM private key, for x509.
//   KEY_PASSPHRASE  optional passphrase of KEY_FILE.
//   SWTPM_PORT      for tpm: the command port of a swtpm (`swtpm socket --server
//                   type=tcp,...`). tss.js speaks the Microsoft simulator's TCP
//                   framing, swtpm raw TPM commands; this harness puts a small
//                   framing proxy between them (the TPM commands pass unchanged).
//   TPM_PRINT_EK    for tpm: print {"ok":true,"endorsementKey":...,"registrationId":...}
//                   from the SDK's TpmSecurityClient and exit, without registering.
//   PAYLOAD         optional JSON text; passed to setProvisioningPayload().
//   REGISTER_TIMEOUT_MS optional override of the 60000 ms overall timeout.
//   CA_FILE         optional PEM CA bundle to trust, passed explicitly to the
//                   transport. Normally not needed: NODE_EXTRA_CA_CERTS works
//                   for all three transports.
//
// Output (stdout, one line):
//   {"ok":true,"result":<registrationState returned by the SDK>}   exit 0
//   {"ok":false,"error":{...}}                                     exit 1
//   {"ok":false,"error":{"name":"HarnessTimeout",...}}             exit 2 (60 s)
// SDK debug logs (DEBUG=azure-iot*) and rhea's own console noise go to stderr.
'use strict';

const fs = require('fs');
const path = require('path');

// Hard overall limit; REGISTER_TIMEOUT_MS may lower (or raise) it for tests.
const OVERALL_TIMEOUT_MS = (() => {
  const v = Number(process.env.REGISTER_TIMEOUT_MS);
  return Number.isFinite(v) && v > 0 ? v : 60 * 1000;
})();

let finished = false;

function finish(obj, code) {
  if (finished) {
    return;
  }
  finished = true;
  let line;
  try {
    line = JSON.stringify(obj);
  } catch (e) {
    line = JSON.stringify({ ok: false, error: { name: 'HarnessError', message: 'could not serialize outcome: ' + e.message } });
    code = 1;
  }
  process.exitCode = code;
  process.stdout.write(line + '\n', () => process.exit(code));
}

// Plain-data copy of an arbitrary value: drops functions, sockets, streams and
// other heavy objects, cuts cycles and depth.
function plain(value, depth, seen) {
  depth = depth || 0;
  seen = seen || new Set();
  if (value === null || value === undefined) return value === undefined ? undefined : null;
  const t = typeof value;
  if (t === 'string' || t === 'number' || t === 'boolean') return value;
  if (t === 'bigint') return value.toString();
  if (t === 'function' || t === 'symbol') return undefined;
  if (Buffer.isBuffer(value)) return { type: 'Buffer', utf8: value.toString('utf8') };
  if (value instanceof Date) return value.toISOString();
  if (depth > 5 || seen.has(value)) return '[omitted]';
  if (value instanceof Error) return errorDetails(value, depth + 1, seen);
  const ctor = value.constructor && value.constructor.name;
  if (ctor && /Socket|Agent|Stream|Message|Request|Connection|Session|Link|Container/.test(ctor) && ctor !== 'Object') {
    return '[' + ctor + ']';
  }
  seen.add(value);
  let out;
  if (Array.isArray(value)) {
    out = value.slice(0, 50).map((v) => plain(v, depth + 1, seen));
  } else {
    out = {};
    const isPlainObject = !ctor || ctor === 'Object';
    for (const k of Object.keys(value)) {
      // Private fields of class instances are noise; plain JSON keeps them all.
      if (!isPlainObject && k.startsWith('_')) continue;
      const v = plain(value[k], depth + 1, seen);
      if (v !== undefined) out[k] = v;
    }
  }
  seen.delete(value);
  return out;
}

function tryJson(s) {
  if (typeof s !== 'string' || s.length === 0) return undefined;
  try {
    return JSON.parse(s);
  } catch (e) {
    return undefined;
  }
}

function errorDetails(err, depth, seen) {
  depth = depth || 0;
  seen = seen || new Set();
  if (!(err instanceof Error)) {
    return { name: 'NonError', message: String(err), value: plain(err, depth + 1, seen) };
  }
  seen.add(err);
  const out = {
    name: err.name || (err.constructor && err.constructor.name) || 'Error',
    message: typeof err.message === 'string' ? err.message : String(err.message),
  };
  if (err.constructor && err.constructor.name && err.constructor.name !== out.name) {
    out.type = err.constructor.name;
  }
  if (err.code !== undefined) out.code = plain(err.code, depth + 1, seen);

  // HTTP: azure-iot-http-base RestApiClient.translateError sets err.response
  // (http.IncomingMessage) and err.responseBody (string). The provisioning
  // translateError sets err.transportObject (IncomingMessage for HTTP,
  // {topic,payload} for MQTT) and err.result (parsed body).
  const response = err.response || err.transportObject;
  if (response && typeof response === 'object') {
    if (typeof response.statusCode === 'number') out.statusCode = response.statusCode;
    if (response.statusMessage) out.statusMessage = response.statusMessage;
    if (response.headers && typeof response.headers === 'object') out.headers = plain(response.headers, depth + 1, seen);
    if (typeof response.topic === 'string') {
      out.topic = response.topic;
      const m = response.topic.match(/^\$dps\/registrations\/res\/(\d+)\//);
      if (m && out.statusCode === undefined) out.statusCode = Number(m[1]);
    }
    if (response.payload !== undefined && err.result === undefined) out.result = plain(response.payload, depth + 1, seen);
  }
  if (err.result !== undefined) out.result = plain(err.result, depth + 1, seen);
  if (err.responseBody !== undefined) {
    out.responseBody = typeof err.responseBody === 'string' ? err.responseBody : plain(err.responseBody, depth + 1, seen);
    const parsed = tryJson(err.responseBody);
    if (parsed !== undefined) out.responseJson = parsed;
  }
  // AMQP errors (azure-iot-amqp-base translateError) carry the raw rhea error.
  if (err.amqpError !== undefined) out.amqpError = plain(err.amqpError, depth + 1, seen);
  if (err.transportError !== undefined) out.transportError = plain(err.transportError, depth + 1, seen);
  if (err.condition !== undefined) out.condition = plain(err.condition, depth + 1, seen);
  if (err.description !== undefined) out.description = plain(err.description, depth + 1, seen);
  if (err.info !== undefined) out.info = plain(err.info, depth + 1, seen);
  if (err.cause !== undefined) out.cause = plain(err.cause, depth + 1, seen);
  if (err.reason !== undefined) out.reason = plain(err.reason, depth + 1, seen);
  // Node system / TLS errors.
  for (const k of ['errno', 'syscall', 'address', 'port', 'host']) {
    if (err[k] !== undefined && out[k] === undefined) out[k] = plain(err[k], depth + 1, seen);
  }
  seen.delete(err);
  return out;
}

function fail(err, code) {
  finish({ ok: false, error: errorDetails(err) }, code === undefined ? 1 : code);
}

function usageError(message) {
  const e = new Error(message);
  e.name = 'HarnessUsageError';
  return e;
}

function env(name, dflt) {
  const v = process.env[name];
  return v === undefined || v === '' ? dflt : v;
}

function requireEnv(name) {
  const v = env(name);
  if (v === undefined) throw usageError('environment variable ' + name + ' is required');
  return v;
}

// Require a module exactly as the given SDK package resolves it, so that the
// injected base object is the same copy the transport would have created.
function requireFrom(pkg, dep) {
  const base = path.dirname(require.resolve(pkg + '/package.json'));
  return require(require.resolve(dep, { paths: [base] }));
}

function makeTransport(kind, ca) {
  switch (kind) {
    case 'http': {
      const { Http } = require('azure-iot-provisioning-device-http');
      if (!ca) return new Http();
      const HttpBase = requireFrom('azure-iot-provisioning-device-http', 'azure-iot-http-base').Http;
      const base = new HttpBase();
      base.setOptions({ ca: ca });
      return new Http(base);
    }
    case 'mqtt':
    case 'mqtt-ws': {
      const { Mqtt, MqttWs } = require('azure-iot-provisioning-device-mqtt');
      const Transport = kind === 'mqtt' ? Mqtt : MqttWs;
      if (!ca) return new Transport();
      const { MqttBase } = requireFrom('azure-iot-provisioning-device-mqtt', 'azure-iot-mqtt-base');
      const base = new MqttBase();
      base.setOptions({ ca: ca });
      return new Transport(base);
    }
    case 'amqp':
    case 'amqp-ws': {
      const { Amqp, AmqpWs } = require('azure-iot-provisioning-device-amqp');
      const Transport = kind === 'amqp' ? Amqp : AmqpWs;
      if (!ca) return new Transport();
      // The AMQP transport builds config.sslOptions from the X.509 auth object
      // (or {}), and amqp-base copies only cert/key/ca from it; there is no
      // public CA option, so wrap connect() of a stock base object.
      const AmqpBase = requireFrom('azure-iot-provisioning-device-amqp', 'azure-iot-amqp-base').Amqp;
      const base = new AmqpBase(true);
      const origConnect = base.connect.bind(base);
      base.connect = (config, done) => {
        config.sslOptions = Object.assign({}, config.sslOptions || {}, { ca: ca });
        return origConnect(config, done);
      };
      return new Transport(base);
    }
    default:
      throw usageError('TRANSPORT must be one of http, mqtt, amqp, mqtt-ws, amqp-ws (got ' + JSON.stringify(kind) + ')');
  }
}

function makeSecurityClient(attestation, registrationId) {
  switch (attestation) {
    case 'symmetricKey': {
      const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
      return new SymmetricKeySecurityClient(registrationId, requireEnv('SYMMETRIC_KEY'));
    }
    case 'x509': {
      const { X509Security } = require('azure-iot-security-x509');
      const cert = {
        cert: fs.readFileSync(requireEnv('CERT_FILE'), 'utf8'),
        key: fs.readFileSync(requireEnv('KEY_FILE'), 'utf8'),
      };
      const pass = env('KEY_PASSPHRASE');
      if (pass !== undefined) cert.passphrase = pass;
      return new X509Security(registrationId, cert);
    }
    case 'tpm': {
      const { TpmSecurityClient } = require('azure-iot-security-tpm');
      const { Tpm } = requireFrom('azure-iot-security-tpm', 'tss.js');
      return new TpmSecurityClient(registrationId, new Tpm(true, '127.0.0.1', tpmProxyPort));
    }
    default:
      throw usageError('ATTESTATION must be symmetricKey, x509 or tpm (got ' + JSON.stringify(attestation) + ')');
  }
}

// The Microsoft TPM simulator's TCP framing (what tss.js speaks) in front of swtpm's raw
// command socket. Command port: HandShake(15) -> [version, tpmInfo, 0]; SendCommand(8),
// locality byte, size, command -> [size, response, 0]; SessionEnd(20) / Stop(21) close.
// Platform port (command port + 1): every 4-byte signal (power on, NV on) is acknowledged.
let tpmProxyPort;

function startTpmProxy(swtpmPort, done) {
  const net = require('net');
  function reader(sock) {
    let buf = Buffer.alloc(0);
    let waiting = null;
    const pump = () => {
      if (waiting && buf.length >= waiting.n) {
        const w = waiting;
        waiting = null;
        const out = buf.subarray(0, w.n);
        buf = buf.subarray(w.n);
        w.resolve(out);
      }
    };
    sock.on('data', (d) => { buf = Buffer.concat([buf, d]); pump(); });
    sock.on('close', () => { if (waiting) { const w = waiting; waiting = null; w.resolve(null); } });
    return (n) => new Promise((resolve) => { waiting = { n, resolve }; pump(); });
  }
  const u32 = (v) => { const b = Buffer.alloc(4); b.writeUInt32BE(v >>> 0); return b; };
  async function onCommand(sock) {
    const read = reader(sock);
    const tpm = net.connect(swtpmPort, '127.0.0.1');
    const readTpm = reader(tpm);
    sock.on('error', () => tpm.destroy());
    tpm.on('error', () => sock.destroy());
    for (;;) {
      const code = await read(4);
      if (!code) break;
      const op = code.readUInt32BE(0);
      if (op === 15) {
        await read(4);
        sock.write(Buffer.concat([u32(1), u32(0), u32(0)]));
      } else if (op === 8) {
        await read(1);
        const len = await read(4);
        const cmd = await read(len.readUInt32BE(0));
        tpm.write(cmd);
        const head = await readTpm(10);
        if (!head) break;
        const rest = await readTpm(head.readUInt32BE(2) - 10);
        const resp = Buffer.concat([head, rest]);
        sock.write(Buffer.concat([u32(resp.length), resp, u32(0)]));
      } else if (op === 20 || op === 21) {
        break;
      } else {
        sock.write(u32(0));
      }
    }
    sock.destroy();
    tpm.destroy();
  }
  function onPlatform(sock) {
    const read = reader(sock);
    sock.on('error', () => {});
    (async () => { while (await read(4)) sock.write(u32(0)); })();
  }
  (function attempt(n) {
    const cmd = net.createServer((s) => { onCommand(s).catch(() => s.destroy()); });
    cmd.listen(0, '127.0.0.1', () => {
      const port = cmd.address().port;
      const plat = net.createServer(onPlatform);
      plat.once('error', () => {
        cmd.close();
        if (n < 20) attempt(n + 1); else done(new Error('no two adjacent free ports for the TPM proxy'));
      });
      plat.listen(port + 1, '127.0.0.1', () => {
        cmd.unref();
        plat.unref();
        done(null, port);
      });
    });
  })(0);
}

function main() {
  const timer = setTimeout(() => {
    const e = new Error('registration did not complete within ' + OVERALL_TIMEOUT_MS / 1000 + ' s');
    e.name = 'HarnessTimeout';
    fail(e, 2);
  }, OVERALL_TIMEOUT_MS);

  process.on('uncaughtException', (err) => fail(err, 1));
  process.on('unhandledRejection', (err) => fail(err, 1));

  const host = requireEnv('PROVISIO_HOST');
  const idScope = requireEnv('ID_SCOPE');
  const registrationId = requireEnv('REGISTRATION_ID');
  const transportKind = env('TRANSPORT', 'http').toLowerCase();
  const attestation = env('ATTESTATION', 'symmetricKey');
  const caFile = env('CA_FILE');
  const ca = caFile ? fs.readFileSync(caFile, 'utf8') : undefined;

  let payload;
  const payloadText = env('PAYLOAD');
  if (payloadText !== undefined) {
    try {
      payload = JSON.parse(payloadText);
    } catch (e) {
      throw usageError('PAYLOAD is not valid JSON: ' + e.message);
    }
  }

  const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
  const transport = makeTransport(transportKind, ca);
  // The MQTT/AMQP transports emit 'error' when a connection drops with no
  // operation pending; without a listener that would crash the process.
  transport.on('error', (err) => {
    if (process.env.DEBUG) process.stderr.write('transport error event: ' + (err && err.stack) + '\n');
  });
  const securityClient = makeSecurityClient(attestation, registrationId);
  const client = ProvisioningDeviceClient.create(host, idScope, transport, securityClient);
  if (payload !== undefined) {
    // Note: the SDK only sends the payload if it is truthy.
    client.setProvisioningPayload(payload);
  }

  client.register((err, result) => {
    clearTimeout(timer);
    if (err) {
      fail(err, 1);
    } else {
      finish({ ok: true, result: result === undefined ? null : result }, 0);
    }
  });
}

function printEndorsementKey() {
  const securityClient = makeSecurityClient('tpm', env('REGISTRATION_ID'));
  securityClient.getEndorsementKey((err, ek) => {
    if (err) return fail(err, 1);
    securityClient.getRegistrationId((err2, id) => {
      if (err2) return fail(err2, 1);
      finish({ ok: true, endorsementKey: Buffer.from(ek).toString('base64'), registrationId: id }, 0);
    });
  });
}

function start() {
  if (env('ATTESTATION') !== 'tpm') return main();
  startTpmProxy(Number(requireEnv('SWTPM_PORT')), (err, port) => {
    if (err) return fail(err, 1);
    tpmProxyPort = port;
    try {
      if (env('TPM_PRINT_EK')) printEndorsementKey(); else main();
    } catch (e) {
      fail(e, 1);
    }
  });
}

try {
  start();
} catch (err) {
  fail(err, 1);
}

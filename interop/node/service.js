#!/usr/bin/env node
// Copyright (c) Provisio contributors.
//
// Interop harness: runs ONE operation of the STOCK Azure IoT DPS *service* SDK
// (npm `azure-iot-provisioning-service`, ProvisioningServiceClient created with
// fromConnectionString) against a DPS-compatible endpoint and prints exactly one
// line of JSON on stdout describing the outcome.
//
// Usage:  node service.js <operation> '<json-args>'
//
// Environment:
//   PROVISIO_CONNECTION_STRING  HostName=localhost;SharedAccessKeyName=...;SharedAccessKey=...
//                               (required). The SDK always talks HTTPS on port 443.
//   NODE_EXTRA_CA_CERTS         PEM CA bundle to trust (read by Node at start-up).
//   SERVICE_TIMEOUT_MS          optional override of the 30000 ms overall timeout.
//
// Operations and their JSON arguments (SDK method called; promise form unless noted):
//   createOrUpdateIndividualEnrollment {enrollment}   createOrUpdateIndividualEnrollment(enrollment)
//   getIndividualEnrollment            {id}           getIndividualEnrollment(id)
//   deleteIndividualEnrollment         {id, etag?, form?}
//                                        form "args" (default): deleteIndividualEnrollment(id[, etag])
//                                        form "object": deleteIndividualEnrollment({registrationId:id, etag})
//   createOrUpdateEnrollmentGroup      {group}        createOrUpdateEnrollmentGroup(group)
//   getEnrollmentGroup                 {id}           getEnrollmentGroup(id)
//   deleteEnrollmentGroup              {id, etag?, form?}   (object form: {enrollmentGroupId:id, etag})
//   runBulkEnrollmentOperation         {mode, enrollments}  runBulkEnrollmentOperation({mode, enrollments}, callback)
//                                        (callback form: the promise form never settles in 1.11.2)
//   queryIndividualEnrollments         {pageSize?, query?}  createIndividualEnrollmentQuery({query}, pageSize)
//   queryEnrollmentGroups              {pageSize?, query?}  createEnrollmentGroupQuery({query}, pageSize)
//   queryDeviceRegistrationStates      {groupId, pageSize?, query?}
//                                        createEnrollmentGroupDeviceRegistrationStateQuery({query}, groupId, pageSize)
//   getDeviceRegistrationState         {id}           getDeviceRegistrationState(id)
//   deleteDeviceRegistrationState      {id, etag?, form?}   (object form: {registrationId:id, etag})
//   getIndividualEnrollmentAttestationMechanism {id}  getIndividualEnrollmentAttestationMechanism(id)
//   getEnrollmentGroupAttestationMechanism      {id}  getEnrollmentGroupAttestationMechanism(id)
// Queries default to "SELECT * FROM enrollments" / "SELECT * FROM enrollmentGroups" /
// "SELECT *" and call query.next(callback) until hasMoreResults is false (args
// "nextForm" = "callback" | "promise" | "promiseWithToken", "maxPages" = 100).
//
// Output (stdout, one line):
//   {"ok":true,"result":<parsed response body>,"requests":[...]}                  exit 0
//     (queries: "result":{"pages":[[...],[...]]}; deletes: "result":null)
//   {"ok":false,"error":{name,message,statusCode?,statusMessage?,headers?,
//                        responseBody?,responseJson?,code?,...},"requests":[...]} exit 1
//   {"ok":false,"error":{"name":"HarnessUsageError",...}}                          exit 2
//   {"ok":false,"error":{"name":"HarnessTimeout",...},"requests":[...]}            exit 3
// "requests" lists every HTTPS request the SDK made, in order:
//   {method, path, ifMatch?, headers (Authorization value replaced by "<redacted>"),
//    auth {scheme, fields, sr, skn, se} (no sig), body? (parsed JSON request
//    body, symmetric keys redacted), status?, responseHeaders?}
// No key, signature or Authorization value is ever printed.
'use strict';

const https = require('https');

const OVERALL_TIMEOUT_MS = (() => {
  const v = Number(process.env.SERVICE_TIMEOUT_MS);
  return Number.isFinite(v) && v > 0 ? v : 30 * 1000;
})();

// Upper bound on query pages, so a server that keeps sending x-ms-continuation
// (or sends an empty one, which the SDK treats as "more results" but then does
// not resend) cannot loop forever.
const MAX_QUERY_PAGES = 100;
// Cap on the recorded request list (a paging loop would otherwise print
// hundreds of entries); the overflow is counted in "requestsOmitted".
const MAX_RECORDED_REQUESTS = 50;

const requests = [];
let finished = false;

function finish(obj, code) {
  if (finished) return;
  finished = true;
  obj.requests = requests.slice(0, MAX_RECORDED_REQUESTS);
  if (requests.length > MAX_RECORDED_REQUESTS) obj.requestsOmitted = requests.length - MAX_RECORDED_REQUESTS;
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

// ---------------------------------------------------------------------------
// Request recording (wraps https.request; azure-iot-http-base calls
// `https.request(options, callback)` through the module object at call time).

const SECRET_FIELDS = new Set(['primaryKey', 'secondaryKey', 'sharedAccessKey', 'SharedAccessKey']);

function redact(value) {
  if (Array.isArray(value)) return value.map(redact);
  if (value && typeof value === 'object') {
    const out = {};
    for (const k of Object.keys(value)) {
      out[k] = SECRET_FIELDS.has(k) && value[k] ? '<redacted>' : redact(value[k]);
    }
    return out;
  }
  return value;
}

// Summary of a SAS Authorization header without the signature.
function authSummary(value) {
  if (typeof value !== 'string') return { scheme: typeof value };
  const sp = value.indexOf(' ');
  const scheme = sp >= 0 ? value.slice(0, sp) : value;
  if (scheme !== 'SharedAccessSignature') return { scheme: scheme };
  const out = { scheme: scheme, fields: [] };
  for (const part of value.slice(sp + 1).split('&')) {
    const eq = part.indexOf('=');
    const k = eq >= 0 ? part.slice(0, eq) : part;
    out.fields.push(k);
    if (k === 'sr' || k === 'skn' || k === 'se') out[k] = part.slice(eq + 1);
  }
  return out;
}

function headerLookup(headers, name) {
  if (!headers) return undefined;
  for (const k of Object.keys(headers)) {
    if (k.toLowerCase() === name) return headers[k];
  }
  return undefined;
}

const RESPONSE_HEADERS_KEPT = ['content-type', 'content-length', 'etag', 'x-ms-continuation', 'x-ms-item-type', 'x-ms-max-item-count', 'x-ms-error-code', 'x-ms-request-id', 'location', 'retry-after'];

const origRequest = https.request;
https.request = function recordingRequest(...args) {
  const opts = args.find((a) => a && typeof a === 'object' && !(a instanceof URL)) || {};
  const entry = { method: opts.method || 'GET', path: opts.path };
  const headers = {};
  for (const k of Object.keys(opts.headers || {})) {
    headers[k] = k.toLowerCase() === 'authorization' ? '<redacted>' : opts.headers[k];
  }
  const ifMatch = headerLookup(opts.headers, 'if-match');
  if (ifMatch !== undefined) entry.ifMatch = ifMatch;
  entry.headers = headers;
  const auth = headerLookup(opts.headers, 'authorization');
  if (auth !== undefined) entry.auth = authSummary(auth);
  requests.push(entry);

  const req = origRequest.apply(this, args);
  const chunks = [];
  const origWrite = req.write;
  req.write = function (chunk, ...rest) {
    if (chunk !== undefined && chunk !== null && typeof chunk !== 'function') chunks.push(Buffer.from(chunk));
    return origWrite.call(this, chunk, ...rest);
  };
  const origEnd = req.end;
  req.end = function (chunk, ...rest) {
    if (chunk !== undefined && chunk !== null && typeof chunk !== 'function') chunks.push(Buffer.from(chunk));
    if (chunks.length) {
      const text = Buffer.concat(chunks).toString('utf8');
      try {
        entry.body = redact(JSON.parse(text));
      } catch (e) {
        entry.bodyText = text.length > 2000 ? text.slice(0, 2000) + '...' : text;
      }
    }
    return origEnd.call(this, chunk, ...rest);
  };
  req.on('response', (res) => {
    entry.status = res.statusCode;
    const rh = {};
    for (const k of RESPONSE_HEADERS_KEPT) {
      if (res.headers[k] !== undefined) rh[k] = res.headers[k];
    }
    entry.responseHeaders = rh;
  });
  return req;
};

// ---------------------------------------------------------------------------
// Errors.

function tryJson(s) {
  if (typeof s !== 'string' || s.length === 0) return undefined;
  try {
    return JSON.parse(s);
  } catch (e) {
    return undefined;
  }
}

function errorDetails(err) {
  if (!(err instanceof Error)) {
    let value;
    try {
      value = JSON.parse(JSON.stringify(err));
    } catch (e) {
      value = String(err);
    }
    return { name: 'NonError', message: String(err), value: value };
  }
  const out = {
    name: err.name || (err.constructor && err.constructor.name) || 'Error',
    message: typeof err.message === 'string' ? err.message : String(err.message),
  };
  if (err.constructor && err.constructor.name && err.constructor.name !== out.name) out.type = err.constructor.name;
  // azure-iot-http-base RestApiClient.translateError sets err.response
  // (http.IncomingMessage) and err.responseBody (raw string).
  const response = err.response;
  if (response && typeof response === 'object') {
    if (typeof response.statusCode === 'number') out.statusCode = response.statusCode;
    if (response.statusMessage) out.statusMessage = response.statusMessage;
    if (response.headers && typeof response.headers === 'object') out.headers = Object.assign({}, response.headers);
  }
  if (err.responseBody !== undefined) {
    out.responseBody = typeof err.responseBody === 'string' ? err.responseBody : String(err.responseBody);
    const parsed = tryJson(err.responseBody);
    if (parsed !== undefined) out.responseJson = parsed;
  }
  for (const k of ['code', 'errno', 'syscall', 'address', 'port', 'host', 'reason']) {
    if (err[k] !== undefined && typeof err[k] !== 'object' && typeof err[k] !== 'function') out[k] = err[k];
  }
  if (typeof err.pages === 'number') out.pages = err.pages;
  if (err.cause instanceof Error) out.cause = { name: err.cause.name, message: err.cause.message };
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

// ---------------------------------------------------------------------------
// Operations. Each returns a promise of the "result" value.

// httpCallbackToPromise resolves with {responseBody, httpResponse}; the body is
// the parsed JSON (or '' when the response had no JSON content-type / no body).
function body(p) {
  return Promise.resolve(p).then((r) => (r && typeof r === 'object' && 'responseBody' in r ? r.responseBody : r));
}

function need(args, key, type) {
  const v = args[key];
  if (v === undefined || v === null || (type && typeof v !== type)) {
    throw usageError('argument "' + key + '" is required' + (type ? ' (' + type + ')' : ''));
  }
  return v;
}

function optPageSize(args) {
  if (args.pageSize === undefined || args.pageSize === null) return undefined;
  if (typeof args.pageSize !== 'number') throw usageError('argument "pageSize" must be a number');
  return args.pageSize;
}

// How the next page is fetched. "callback" (default) is the pattern of the SDK
// samples: query.next(callback). "promise" is query.next() with no argument,
// which in SDK 1.11.2 NEVER sends x-ms-continuation (next() treats the missing
// argument as an explicit undefined token), so it refetches page 1 forever
// against a server that pages. "promiseWithToken" is
// query.next(query.continuationToken).
function nextPage(query, form) {
  switch (form) {
    case 'callback':
      return new Promise((resolve, reject) => {
        query.next((err, result) => (err ? reject(err) : resolve(result)));
      });
    case 'promise':
      return query.next().then((r) => r.responseBody);
    case 'promiseWithToken':
      return query.next(query.continuationToken).then((r) => r.responseBody);
    default:
      throw usageError('argument "nextForm" must be "callback", "promise" or "promiseWithToken"');
  }
}

async function drain(query, args) {
  const form = args.nextForm || 'callback';
  const maxPages = args.maxPages === undefined ? MAX_QUERY_PAGES : args.maxPages;
  if (typeof maxPages !== 'number' || maxPages < 1) throw usageError('argument "maxPages" must be a positive number');
  const pages = [];
  while (query.hasMoreResults) {
    if (pages.length >= maxPages) {
      const e = new Error('query still had more results after ' + maxPages + ' pages (continuation loop?)');
      e.name = 'HarnessPagingLoop';
      e.pages = pages.length;
      throw e;
    }
    const result = await nextPage(query, form);
    pages.push(result === undefined ? null : result);
  }
  return { pages: pages };
}

function deleteCall(method, idField) {
  return (client, args) => {
    const id = need(args, 'id', 'string');
    const etag = args.etag;
    if (etag !== undefined && etag !== null && typeof etag !== 'string') throw usageError('argument "etag" must be a string');
    const form = args.form || 'args';
    let p;
    if (form === 'args') {
      p = etag ? client[method](id, etag) : client[method](id);
    } else if (form === 'object') {
      const obj = { [idField]: id };
      if (etag) obj.etag = etag;
      p = client[method](obj);
    } else {
      throw usageError('argument "form" must be "args" or "object"');
    }
    // errorCallbackToPromise resolves with undefined.
    return Promise.resolve(p).then(() => null);
  };
}

const OPERATIONS = {
  createOrUpdateIndividualEnrollment: (c, a) => body(c.createOrUpdateIndividualEnrollment(need(a, 'enrollment', 'object'))),
  getIndividualEnrollment: (c, a) => body(c.getIndividualEnrollment(need(a, 'id', 'string'))),
  deleteIndividualEnrollment: deleteCall('deleteIndividualEnrollment', 'registrationId'),
  createOrUpdateEnrollmentGroup: (c, a) => body(c.createOrUpdateEnrollmentGroup(need(a, 'group', 'object'))),
  getEnrollmentGroup: (c, a) => body(c.getEnrollmentGroup(need(a, 'id', 'string'))),
  deleteEnrollmentGroup: deleteCall('deleteEnrollmentGroup', 'enrollmentGroupId'),
  // Callback form on purpose: in SDK 1.11.2 the promise form of
  // runBulkEnrollmentOperation never settles (its inner callback tests the
  // caller's `callback` argument, which is undefined in promise mode).
  runBulkEnrollmentOperation: (c, a) => {
    const op = { mode: need(a, 'mode', 'string'), enrollments: need(a, 'enrollments', 'object') };
    return new Promise((resolve, reject) => {
      c.runBulkEnrollmentOperation(op, (err, result) => (err ? reject(err) : resolve(result === undefined ? null : result)));
    });
  },
  queryIndividualEnrollments: (c, a) =>
    drain(c.createIndividualEnrollmentQuery({ query: a.query || 'SELECT * FROM enrollments' }, optPageSize(a)), a),
  queryEnrollmentGroups: (c, a) =>
    drain(c.createEnrollmentGroupQuery({ query: a.query || 'SELECT * FROM enrollmentGroups' }, optPageSize(a)), a),
  queryDeviceRegistrationStates: (c, a) =>
    drain(c.createEnrollmentGroupDeviceRegistrationStateQuery({ query: a.query || 'SELECT *' }, need(a, 'groupId', 'string'), optPageSize(a)), a),
  getDeviceRegistrationState: (c, a) => body(c.getDeviceRegistrationState(need(a, 'id', 'string'))),
  deleteDeviceRegistrationState: deleteCall('deleteDeviceRegistrationState', 'registrationId'),
  getIndividualEnrollmentAttestationMechanism: (c, a) => body(c.getIndividualEnrollmentAttestationMechanism(need(a, 'id', 'string'))),
  getEnrollmentGroupAttestationMechanism: (c, a) => body(c.getEnrollmentGroupAttestationMechanism(need(a, 'id', 'string'))),
};

function main() {
  const [op, argText] = process.argv.slice(2);
  let args;
  try {
    if (!op || !Object.prototype.hasOwnProperty.call(OPERATIONS, op)) {
      throw usageError('usage: node service.js <operation> \'<json-args>\'; operation must be one of: ' + Object.keys(OPERATIONS).join(', '));
    }
    try {
      args = argText === undefined || argText === '' ? {} : JSON.parse(argText);
    } catch (e) {
      throw usageError('json-args is not valid JSON: ' + e.message);
    }
    if (!args || typeof args !== 'object' || Array.isArray(args)) throw usageError('json-args must be a JSON object');
    if (!process.env.PROVISIO_CONNECTION_STRING) throw usageError('environment variable PROVISIO_CONNECTION_STRING is required');
  } catch (e) {
    return fail(e, 2);
  }

  const timer = setTimeout(() => {
    const e = new Error(op + ' did not complete within ' + OVERALL_TIMEOUT_MS / 1000 + ' s');
    e.name = 'HarnessTimeout';
    fail(e, 3);
  }, OVERALL_TIMEOUT_MS);

  process.on('uncaughtException', (err) => fail(err, 1));
  process.on('unhandledRejection', (err) => fail(err, 1));

  let promise;
  try {
    const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
    const client = ProvisioningServiceClient.fromConnectionString(process.env.PROVISIO_CONNECTION_STRING);
    promise = Promise.resolve(OPERATIONS[op](client, args));
  } catch (e) {
    clearTimeout(timer);
    return fail(e, e && e.name === 'HarnessUsageError' ? 2 : 1);
  }
  promise.then(
    (result) => {
      clearTimeout(timer);
      finish({ ok: true, result: result === undefined ? null : result }, 0);
    },
    (err) => {
      clearTimeout(timer);
      fail(err, err && err.name === 'HarnessUsageError' ? 2 : 1);
    }
  );
}

main();

// Follows the DPS walkthrough in Provisio's web console with a real browser (Debian's
// chromium, driven by playwright-core), as an operator would: sign in, add a symmetric-key
// enrollment, copy its key, register the device with `provisio device register`, see it
// assigned; add a root CA certificate, prove possession, add a group on it, register a
// device certificate, see it assigned. Then the negative cases. Saves a screenshot of
// every page into $SHOTS. Exits non-zero (with the reason) on the first failure.
//
// Environment: BASE (https://localhost:PORT), SCOPE, OWNER_CS, READER_CS (a policy with
// EnrollmentRead and RegistrationStatusRead only), READER (its name), PROVISIO (the
// binary), CA (the server's CA file), WORK (a scratch directory), SHOTS (screenshots),
// CHROMIUM (default /usr/bin/chromium).
"use strict";
const assert = require("node:assert/strict");
const { execFileSync } = require("node:child_process");
const path = require("node:path");
const fs = require("node:fs");
const { chromium } = require("playwright-core");

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const BASE = env("BASE"), SCOPE = env("SCOPE"), OWNER_CS = env("OWNER_CS");
const READER_CS = env("READER_CS"), READER = env("READER");
const PROVISIO = env("PROVISIO"), CA = env("CA"), WORK = env("WORK"), SHOTS = env("SHOTS");
const endpoint = new URL(BASE).host;

function provisio(...args) {
  return execFileSync(PROVISIO, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

function register(...args) {
  const out = provisio("device", "register", "--scope", SCOPE, "--endpoint", endpoint, "--ca", CA, "--json", ...args);
  return JSON.parse(out);
}

const steps = [];
// The pages open, for a failure's evidence.
const open = [];
function step(name) {
  steps.push(name);
  console.error(`-- ${name}`);
}

async function shot(page, name) {
  fs.mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: true });
}

async function signIn(page, cs) {
  await page.goto(`${BASE}/console`);
  await page.getByLabel("Connection string").fill(cs);
  await page.getByRole("button", { name: "Sign in" }).click();
}

// The session's CSRF token, as a page's forms carry it.
async function csrfOf(page) {
  return page.locator('input[name="_csrf"]').first().inputValue();
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
  });
  // The server's certificate is issued by the instance's own CA; the browser is told to
  // accept it (TLS is still real: the console sets Secure cookies and checks Origin).
  const owner = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 800 } });
  const page = await owner.newPage();
  open.push(page);
  const problems = [];
  page.on("dialog", (d) => {
    problems.push(`a dialog opened: ${d.message()}`);
    d.dismiss();
  });
  page.on("console", (m) => {
    // An error answer (the refused sign-in's 401, a form's 400) is logged as a failed load:
    // expected. Anything else (a CSP violation, a script error) is a problem.
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) problems.push(`console error: ${m.text()}`);
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  if (process.env.TRACE) page.on("response", async (r) => console.error(`   ${r.status()} ${r.request().method()} ${r.url()} sent=${(await r.request().headerValue("cookie") || "").replace(/=[^;]{20,}/g, "=…")} set=${JSON.stringify(await r.headersArray())}`));

  step("a wrong key does not sign in");
  await page.goto(`${BASE}/console`);
  assert.match(page.url(), /\/console\/sign-in$/);
  await shot(page, "01-sign-in");
  await signIn(page, OWNER_CS.replace(/SharedAccessKey=.*/, "SharedAccessKey=" + Buffer.alloc(32, 7).toString("base64")));
  await page.getByRole("alert").waitFor();
  assert.match(await page.getByRole("alert").innerText(), /Unauthorized/);
  assert.match(await page.getByRole("alert").innerText(), /Error code 401002|401\d{3}/);
  assert.match(page.url(), /\/console\/sign-in$/);
  await shot(page, "01b-sign-in-refused");

  step("sign in with the owner connection string");
  await signIn(page, OWNER_CS);
  await page.getByRole("heading", { name: "Overview" }).waitFor();
  assert.equal(await page.locator("#scope").innerText(), SCOPE);
  await shot(page, "02-overview");

  step("keyboard: the first Tab reaches the skip link");
  await page.keyboard.press("Tab");
  assert.equal(await page.evaluate(() => document.activeElement.textContent), "Skip to content");

  step("add an individual enrollment with a symmetric key");
  await page.getByRole("link", { name: "Manage enrollments", exact: true }).click();
  await page.getByRole("link", { name: "Individual enrollments" }).waitFor();
  await page.getByRole("link", { name: "Add individual enrollment" }).click();
  await page.getByLabel("Symmetric Key").check();
  // Only the chosen mechanism's fields show (the script hides the others).
  assert.equal(await page.getByLabel("Primary Certificate").isVisible(), false);
  await page.getByLabel("Registration ID").fill("console-sym-1");
  await page.getByLabel("Initial twin (JSON)").fill('{"tags": {"note": "<script>alert(1)</script>"}');
  await page.getByRole("button", { name: "Save" }).click();
  // Not JSON: the form says so, and keeps what was typed.
  await page.getByRole("alert").waitFor();
  assert.match(await page.getByRole("alert").innerText(), /initial twin is not valid JSON/);
  assert.match(await page.getByRole("alert").innerText(), /Error code 400\d{3}/);
  assert.equal(await page.getByLabel("Registration ID").inputValue(), "console-sym-1");
  await shot(page, "03-add-individual-enrollment-error");
  await page.getByLabel("Initial twin (JSON)").fill('{"tags": {"note": "<script>alert(1)</script>"}}');
  await shot(page, "03-add-individual-enrollment");
  await page.getByRole("button", { name: "Save" }).click();
  await page.getByRole("heading", { name: "Enrollment console-sym-1" }).waitFor();

  step("the initial twin shows as text; keys are hidden until asked");
  assert.match(await page.locator("pre").first().innerText(), /<script>alert\(1\)<\/script>/);
  assert.equal(await page.getByLabel("Primary Key", { exact: true }).count(), 0);
  await page.getByRole("link", { name: "Show keys" }).click();
  const key = await page.getByLabel("Primary Key", { exact: true }).inputValue();
  assert.match(key, /^[A-Za-z0-9+/]{40,}={0,2}$/);
  await page.getByRole("button", { name: "Copy" }).first().click();
  await shot(page, "04-enrollment");

  step("register it with `provisio device register` and see it assigned");
  const sym = register("--registration-id", "console-sym-1", "--key", key);
  assert.equal(sym.status, "assigned", JSON.stringify(sym));
  await page.getByRole("link", { name: "Registration records", exact: true }).click();
  await page.getByLabel("Registration ID starts with").fill("console-sym");
  await page.getByRole("button", { name: "Search" }).click();
  await page.getByRole("link", { name: "console-sym-1" }).click();
  const record = page.getByLabel("Registration record");
  assert.match(await record.innerText(), /assigned/);
  assert.ok((await record.innerText()).includes(sym.assignedHub), "the hub is shown");
  assert.match(await page.locator("table").innerText(), /assigned/, "the attempt is listed");
  await shot(page, "05-registration-record");

  step("add the root certificate, generate the code, verify");
  provisio("cert", "root", "console-root", "--out-dir", WORK, "--force");
  await page.getByRole("link", { name: "Certificates", exact: true }).click();
  await page.getByLabel("Name").fill("console-root");
  await page.getByLabel("Certificate .pem or .cer file").setInputFiles(path.join(WORK, "console-root_cert.pem"));
  await page.getByRole("button", { name: "Add" }).click();
  await page.getByRole("heading", { name: "Certificate console-root" }).waitFor();
  assert.equal(await page.locator("#cert-status").innerText(), "Unverified");
  await page.getByRole("button", { name: "Generate verification code" }).click();
  const code = await page.getByLabel("Verification code").inputValue();
  assert.match(code, /^[0-9A-F]{48}$/);
  await shot(page, "06-certificate-verification-code");
  provisio("cert", "verification", "--ca", path.join(WORK, "console-root_cert.pem"),
    "--key", path.join(WORK, "console-root_key.pem"), "--nonce", code, "--out-dir", WORK, "--force");
  await page.getByLabel("Verification certificate .pem or .cer file").setInputFiles(path.join(WORK, "verification_cert.pem"));
  await page.getByRole("button", { name: "Verify" }).click();
  await page.getByRole("status").waitFor();
  assert.equal(await page.locator("#cert-status").innerText(), "Verified");
  await shot(page, "07-certificate-verified");
  await page.getByRole("link", { name: "Certificates", exact: true }).click();
  assert.match(await page.locator("table").innerText(), /console-root[\s\S]*Verified/);
  await shot(page, "07b-certificates");

  step("add an enrollment group on the verified CA certificate");
  await page.getByRole("link", { name: "Manage enrollments", exact: true }).click();
  await page.getByRole("link", { name: "Enrollment groups" }).click();
  await page.getByRole("link", { name: "Add enrollment group" }).click();
  await page.getByLabel("Group name").fill("console-x509-group");
  await page.getByLabel("Certificate", { exact: true }).check();
  await page.getByLabel("CA Certificate", { exact: true }).check();
  await page.getByLabel("Primary CA certificate").selectOption("console-root");
  await shot(page, "08-add-enrollment-group");
  await page.getByRole("button", { name: "Save" }).click();
  await page.getByRole("heading", { name: "Enrollment group console-x509-group" }).waitFor();

  step("register a device certificate and see it assigned");
  provisio("cert", "device", "console-x509-dev-1", "--ca", "console-root", "--out-dir", WORK, "--force");
  const x = register("--cert", path.join(WORK, "console-x509-dev-1_fullchain.pem"),
    "--cert-key", path.join(WORK, "console-x509-dev-1_key.pem"));
  assert.equal(x.status, "assigned", JSON.stringify(x));
  await page.reload();
  const rows = await page.locator("table").last().innerText();
  assert.match(rows, /console-x509-dev-1\s+assigned/);
  await shot(page, "09-enrollment-group");

  step("the other pages");
  await page.getByRole("link", { name: "Manage enrollments", exact: true }).click();
  await shot(page, "10-manage-enrollments");
  await page.getByRole("link", { name: "Registration records", exact: true }).click();
  await shot(page, "11-registration-records");
  await page.getByRole("link", { name: "Linked IoT hubs", exact: true }).click();
  await shot(page, "12-linked-iot-hubs");
  await page.getByRole("link", { name: "Shared access policies", exact: true }).click();
  await page.getByRole("link", { name: `Show connection strings of ${READER}` }).click();
  assert.match(await page.getByLabel("Primary connection string").inputValue(), new RegExp(`SharedAccessKeyName=${READER};`));
  await shot(page, "13-shared-access-policies");
  await page.getByRole("link", { name: "Audit log", exact: true }).click();
  await page.getByLabel("Kind").selectOption("service");
  await page.getByRole("button", { name: "Search" }).click();
  assert.match(await page.locator("table").innerText(), /PUT \/enrollments\/console-sym-1/);
  await shot(page, "14-audit-log");
  await page.getByRole("link", { name: "Overview", exact: true }).click();
  await page.waitForLoadState("networkidle");
  await shot(page, "02b-overview-after");

  step("a read-only policy sees no Add or Delete, and a hand-made POST gets 403");
  const readerCtx = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 800 } });
  const reader = await readerCtx.newPage();
  open.push(reader);
  await signIn(reader, READER_CS);
  await reader.getByRole("heading", { name: "Overview" }).waitFor();
  assert.equal(await reader.getByRole("link", { name: "Certificates", exact: true }).count(), 0);
  await reader.getByRole("link", { name: "Manage enrollments", exact: true }).click();
  assert.equal(await reader.getByRole("link", { name: "Add individual enrollment" }).count(), 0);
  await reader.getByRole("link", { name: "console-sym-1" }).click();
  assert.equal(await reader.getByRole("button", { name: "Delete" }).count(), 0);
  assert.equal(await reader.getByRole("button", { name: "Disable" }).count(), 0);
  assert.equal(await reader.getByRole("link", { name: "Show keys" }).count(), 0);
  await shot(reader, "15-read-only");
  const token = await csrfOf(reader);
  const forged = await reader.request.post(`${BASE}/console/enrollments/new`, {
    headers: { Origin: BASE },
    form: { _csrf: token, id: "read-only-made", mechanism: "symmetricKey", auto_keys: "1" },
    maxRedirects: 0,
  });
  assert.equal(forged.status(), 403);
  assert.match(await forged.text(), /lacks the EnrollmentWrite right/);
  const del = await reader.request.post(`${BASE}/console/enrollments/console-sym-1/action`, {
    headers: { Origin: BASE },
    form: { _csrf: token, action: "delete", confirm: "yes", etag: "*" },
    maxRedirects: 0,
  });
  assert.equal(del.status(), 403);

  step("a cross-site POST, or one without the CSRF token, is refused");
  const ownerToken = await csrfOf(page);
  const noToken = await page.request.post(`${BASE}/console/enrollments/new`, {
    headers: { Origin: BASE },
    form: { id: "csrf-made", mechanism: "symmetricKey", auto_keys: "1" },
    maxRedirects: 0,
  });
  assert.equal(noToken.status(), 403);
  const crossSite = await page.request.post(`${BASE}/console/enrollments/new`, {
    headers: { Origin: "https://attacker.example" },
    form: { _csrf: ownerToken, id: "csrf-made", mechanism: "symmetricKey", auto_keys: "1" },
    maxRedirects: 0,
  });
  assert.equal(crossSite.status(), 403);
  // A page of another origin that posts a form to the console: the browser sends no
  // session cookie (SameSite=Strict), and the console refuses the Origin.
  const attacker = await owner.newPage();
  await attacker.setContent(
    `<form id="f" method="post" action="${BASE}/console/enrollments/new">` +
    `<input name="id" value="csrf-made"><input name="mechanism" value="symmetricKey"></form>`);
  const [answer] = await Promise.all([
    attacker.waitForResponse((r) => r.url().startsWith(`${BASE}/console/enrollments/new`)),
    attacker.evaluate(() => document.getElementById("f").submit()),
  ]);
  assert.equal(answer.status(), 403);
  await attacker.close();
  await page.goto(`${BASE}/console/enrollments?q=csrf-made`);
  assert.match(await page.locator("table").innerText(), /None match/);

  step("the session ends when its policy's key is regenerated");
  await page.goto(`${BASE}/console/policies`);
  await page.getByRole("button", { name: `Regenerate primary key of ${READER}` }).click();
  await page.getByRole("status").waitFor();
  await reader.goto(`${BASE}/console/overview`);
  assert.match(reader.url(), /\/console\/sign-in$/);
  await readerCtx.close();

  step("without JavaScript, the forms still work");
  const plainCtx = await browser.newContext({ ignoreHTTPSErrors: true, javaScriptEnabled: false });
  const plain = await plainCtx.newPage();
  await signIn(plain, OWNER_CS);
  await plain.goto(`${BASE}/console/enrollments/new`);
  await plain.getByLabel("Registration ID").fill("console-no-script");
  await plain.getByRole("button", { name: "Save" }).click();
  await plain.getByRole("heading", { name: "Enrollment console-no-script" }).waitFor();
  await plainCtx.close();

  step("on a phone");
  const phoneCtx = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 390, height: 844 }, isMobile: true });
  const phone = await phoneCtx.newPage();
  await signIn(phone, OWNER_CS);
  await phone.getByRole("heading", { name: "Overview" }).waitFor();
  const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 1, `the overview fits a phone's width (overflows by ${overflow}px)`);
  await shot(phone, "16-phone-overview");
  await phone.goto(`${BASE}/console/enrollments/console-sym-1`);
  await shot(phone, "17-phone-enrollment");
  await phoneCtx.close();

  assert.deepEqual(problems, [], "no dialog, script error or CSP violation");
  await browser.close();
  console.log(JSON.stringify({ ok: true, steps }));
}

main().catch(async (e) => {
  console.error(`FAILED after: ${steps[steps.length - 1] || "start"}\n${e.stack || e}`);
  for (const [i, p] of open.entries()) {
    try {
      console.error(`--- page ${i}: ${p.url()}\n${(await p.locator("main").innerText()).slice(0, 2000)}`);
      await p.screenshot({ path: path.join(WORK, `failure-${i}.png`), fullPage: true });
    } catch (_) { /* closed */ }
  }
  process.exit(1);
});

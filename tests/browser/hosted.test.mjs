// End-to-end tests of the hosted card-capture and CVV re-collect pages in a
// real browser: Debian's headless Chromium driven by playwright-core.
//
// The suite starts the real vault binary (target/debug/cardvault) in dev
// mode on 127.0.0.1 and a free port, provisions a merchant with the CLI,
// starts the demo merchant (examples/demo-merchant) and a small helper
// server (a bare parent page and a webhook receiver), all on 127.0.0.1, and
// drives them as a cardholder would. Screenshots go to target/screenshots/.
//
// Run: node --test --test-concurrency=1 tests/browser/hosted.test.mjs
// (tests/run.sh does, after `cargo test` built the binary). Environment:
// CARDVAULT_BIN (default target/debug/cardvault), CHROMIUM_PATH (default
// /usr/bin/chromium).

import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import https from "node:https";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

import { startDemoMerchant } from "../../examples/demo-merchant/server.mjs";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const BIN = process.env.CARDVAULT_BIN || path.join(ROOT, "target/debug/cardvault");
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const SHOTS = path.join(ROOT, "target/screenshots");

// Card numbers typed in this suite; none may show up in a URL, a message
// to the parent page or the vault's log.
const VISA = "4242424242424242";
const CVC_CARD = "4000000000000101"; // sandbox: stored-card charge needs the CVV
const BAD_LUHN = "4242424242424241";
const SECOND_VISA = "4111111111111111";
const ALL_PANS = [VISA, CVC_CARD, BAD_LUHN, SECOND_VISA];

const env = {
  dir: null,
  vault: null,
  vaultLog: null,
  vaultUrl: null,
  ca: null,
  sk: null,
  demo: null,
  helper: null,
  helperOrigin: null,
  browser: null,
  webhooks: [],
  expiring: null,
  sessionSecrets: [],
};

// ---------- plumbing ----------

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A call to the vault's API with the merchant's secret key. */
function api(method, apiPath, body) {
  const payload = body === undefined ? undefined : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = https.request(
      new URL(apiPath, env.vaultUrl),
      {
        method,
        ca: env.ca,
        headers: {
          Authorization: `Bearer ${env.sk}`,
          ...(payload ? { "Content-Type": "application/json" } : {}),
        },
        timeout: 20000,
      },
      (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (c) => (text += c));
        res.on("end", () => {
          let json = null;
          try {
            json = JSON.parse(text);
          } catch {
            json = null;
          }
          resolve({ status: res.statusCode, body: json, headers: res.headers });
        });
      },
    );
    req.on("timeout", () => req.destroy(new Error(`timeout: ${method} ${apiPath}`)));
    req.on("error", reject);
    if (payload) req.write(payload);
    req.end();
  });
}

/** Letters only: a run of digits in an email could read as a card number. */
function letters(n) {
  return Array.from(crypto.randomBytes(n), (b) => String.fromCharCode(97 + (b % 26))).join("");
}

async function newCustomer() {
  const r = await api("POST", "/v1/customers", { email: `e2e-${letters(10)}@example.com` });
  assert.equal(r.status, 201, JSON.stringify(r.body));
  return r.body.id;
}

async function cardsOf(customer) {
  const r = await api("GET", `/v1/customers/${customer}/cards`);
  assert.equal(r.status, 200, JSON.stringify(r.body));
  return r.body.data;
}

async function captureSession(customer, allowedOrigin, expiresIn) {
  const r = await api("POST", "/v1/capture_sessions", {
    customer,
    allowed_origin: allowedOrigin,
    ...(expiresIn ? { expires_in: expiresIn } : {}),
  });
  assert.equal(r.status, 201, JSON.stringify(r.body));
  env.sessionSecrets.push(new URL(r.body.url).hash.slice(1));
  return r.body;
}

function shot(name) {
  fs.mkdirSync(SHOTS, { recursive: true });
  return path.join(SHOTS, name);
}

async function saveShot(target, name, options = {}) {
  const file = shot(name);
  await target.screenshot({ path: file, ...options });
  const size = fs.statSync(file).size;
  assert.ok(size > 5000, `${file} looks empty (${size} bytes)`);
  console.log(`screenshot: ${path.relative(ROOT, file)}`);
  return file;
}

/** Records every request the page (and its frames) makes. */
function recordRequests(page) {
  const seen = [];
  page.on("request", (req) => {
    seen.push({ url: req.url(), method: req.method(), body: req.postData() || "" });
  });
  return seen;
}

function assertNoPanInUrls(requests) {
  for (const r of requests) {
    for (const pan of ALL_PANS) {
      assert.ok(!r.url.includes(pan), `a card number reached a URL: ${r.method} ${r.url}`);
    }
  }
}

/** The capture frame's document once its form is there. */
async function captureFrame(page, selector = "iframe") {
  const handle = await page.waitForSelector(selector, { timeout: 20000 }).catch(async (e) => {
    throw new Error(`${e.message}\npage was:\n${await page.content()}`);
  });
  const frame = await handle.contentFrame();
  await frame.waitForSelector("#card-number", { timeout: 20000 });
  return frame;
}

async function fillCard(frame, { number, expiry, cvc, name }) {
  if (number !== undefined) await frame.locator("#card-number").pressSequentially(number, { delay: 15 });
  if (expiry !== undefined) await frame.locator("#card-expiry").pressSequentially(expiry, { delay: 15 });
  if (cvc !== undefined) await frame.locator("#card-cvc").pressSequentially(cvc, { delay: 15 });
  if (name !== undefined) await frame.locator("#card-name").fill(name);
}

/** Allowed message shapes: nothing else may reach the parent page. */
function assertMessagesClean(messages) {
  for (const m of messages) {
    const keys = Object.keys(m).sort().join(",");
    switch (m.type) {
      case "cardvault:ready":
        assert.equal(keys, "type");
        break;
      case "cardvault:resize":
        assert.equal(keys, "height,type");
        assert.equal(typeof m.height, "number");
        break;
      case "cardvault:card_created":
        assert.equal(keys, "card,type");
        assert.deepEqual(Object.keys(m.card).sort(), ["brand", "id", "last4"]);
        assert.match(m.card.id, /^card_[A-Za-z0-9]+$/);
        assert.match(m.card.last4, /^\d{4}$/);
        break;
      case "cardvault:session_closed":
        assert.equal(keys, "reason,type");
        break;
      default:
        assert.fail(`unexpected message ${JSON.stringify(m)}`);
    }
    const text = JSON.stringify(m);
    for (const pan of ALL_PANS) {
      assert.ok(!text.includes(pan), "a card number reached the parent page");
    }
  }
}

// ---------- helper server: a bare parent page and a webhook receiver ----------

const PARENT_HTML = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>parent</title>
<script src="/parent.js" defer></script></head>
<body><div id="box"></div></body></html>`;

// Embeds the URL in the fragment and records what the frame posts, from
// the vault's origin only.
const PARENT_JS = `"use strict";
window.received = [];
var src = decodeURIComponent(location.hash.slice(1));
var origin = new URL(src).origin;
var f = document.createElement("iframe");
f.id = "frame";
f.src = src;
f.style.width = "460px";
f.style.height = "640px";
window.addEventListener("message", function (e) {
  if (e.origin === origin && e.source === f.contentWindow) window.received.push(e.data);
});
document.getElementById("box").appendChild(f);
`;

function startHelper() {
  const server = http.createServer((req, res) => {
    if (req.method === "GET" && req.url.startsWith("/parent.html")) {
      res.writeHead(200, { "Content-Type": "text/html; charset=utf-8" });
      return res.end(PARENT_HTML);
    }
    if (req.method === "GET" && req.url === "/parent.js") {
      res.writeHead(200, { "Content-Type": "text/javascript; charset=utf-8" });
      return res.end(PARENT_JS);
    }
    if (req.method === "POST" && req.url === "/webhook") {
      let body = "";
      req.setEncoding("utf8");
      req.on("data", (c) => (body += c));
      req.on("end", () => {
        env.webhooks.push({ signature: req.headers["cardvault-signature"] || "", body });
        res.writeHead(200);
        res.end("ok");
      });
      return;
    }
    res.writeHead(404);
    res.end();
  });
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => resolve({ server, port: server.address().port }));
  });
}

function parentUrl(origin, sessionUrl) {
  return `${origin}/parent.html#${encodeURIComponent(sessionUrl)}`;
}

// ---------- set-up and tear-down ----------

before(async () => {
  assert.ok(fs.existsSync(BIN), `${BIN} is missing: run cargo build first`);
  assert.ok(fs.existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install chromium`);
  env.dir = fs.mkdtempSync(path.join(os.tmpdir(), "cardvault-e2e-"));
  const config = path.join(env.dir, "cardvault.toml");
  const writeConfig = (port) =>
    fs.writeFileSync(
      config,
      [
        "dev = true",
        `listen = "127.0.0.1:${port}"`,
        "[payments.webhooks]",
        "poll_ms = 200",
        "backoff_base_ms = 500",
        "",
      ].join("\n"),
    );
  writeConfig(await freePort());
  const childEnv = { ...process.env, CARDVAULT_LOG: "info" };
  delete childEnv.SOFTHSM2_CONF;
  delete childEnv.CARDVAULT_CONFIG;
  const created = execFileSync(BIN, ["--config", config, "merchant", "create", "--name", "Northwind Outfitters", "--json"], {
    cwd: env.dir,
    env: { ...childEnv, CARDVAULT_LOG: "warn" },
    encoding: "utf8",
    timeout: 120000,
  });
  env.sk = JSON.parse(created).secret_key;
  assert.match(env.sk, /^sk_live_/);

  env.vaultLog = path.join(env.dir, "vault.log");
  const log = fs.openSync(env.vaultLog, "a");
  const certPath = path.join(env.dir, "data/tls/cert.pem");
  const deadline = Date.now() + 90000;
  let attempts = 0;
  const start = async () => {
    // A fresh free port each time: another process may take the one we
    // picked before the vault binds it.
    const port = await freePort();
    writeConfig(port);
    attempts += 1;
    env.vault = spawn(BIN, ["--config", config, "serve"], {
      cwd: env.dir,
      env: childEnv,
      stdio: ["ignore", log, log],
    });
    env.vaultExited = new Promise((resolve) => env.vault.once("exit", resolve));
    env.vaultUrl = `https://127.0.0.1:${port}`;
  };
  await start();
  for (;;) {
    if (env.vault.exitCode !== null) {
      const text = fs.readFileSync(env.vaultLog, "utf8");
      if (attempts < 3 && /bind/.test(text)) {
        await start();
        continue;
      }
      assert.fail(`the vault exited at start-up:\n${text}`);
    }
    if (fs.existsSync(certPath)) {
      env.ca = fs.readFileSync(certPath);
      try {
        const r = await api("GET", "/readyz");
        if (r.status === 200) break;
      } catch {
        // not listening yet
      }
    }
    assert.ok(Date.now() < deadline, "the vault did not become ready in 90 s");
    await sleep(250);
  }

  env.demo = await startDemoMerchant({ vaultUrl: env.vaultUrl, secretKey: env.sk, ca: env.ca, port: 0 });
  const helper = await startHelper();
  env.helper = helper.server;
  env.helperPort = helper.port;
  env.helperOrigin = `http://127.0.0.1:${helper.port}`;

  // Made first, so that it has expired by the time test 3 needs it.
  env.expiringCustomer = await newCustomer();
  env.expiring = await captureSession(env.expiringCustomer, env.helperOrigin, 60);

  env.browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  });
  console.log(`vault ${env.vaultUrl}, demo merchant ${env.demo.origin}, helper ${env.helperOrigin}`);
});

after(async () => {
  if (env.browser) await env.browser.close();
  if (env.demo) env.demo.server.close();
  if (env.helper) env.helper.close();
  if (env.vault && env.vault.exitCode === null) {
    env.vault.kill("SIGTERM");
    await Promise.race([env.vaultExited, sleep(20000)]);
    if (env.vault.exitCode === null) env.vault.kill("SIGKILL");
  }
  if (env.dir) fs.rmSync(env.dir, { recursive: true, force: true });
});

// Tall enough that full-page screenshots need no viewport change (which
// would re-flow the page while it is captured).
async function newPage(width = 1280, height = 1100) {
  const context = await env.browser.newContext({
    ignoreHTTPSErrors: true, // the dev certificate is self-signed
    viewport: { width, height },
    deviceScaleFactor: 1,
  });
  return context.newPage();
}

/** A phone: 375 CSS pixels wide, touch, mobile viewport rules. */
async function newPhonePage() {
  const context = await env.browser.newContext({
    ignoreHTTPSErrors: true,
    viewport: { width: 375, height: 812 },
    deviceScaleFactor: 2,
    isMobile: true,
    hasTouch: true,
  });
  return context.newPage();
}

// ---------- 1. the whole flow through the demo merchant ----------

test("1. the demo merchant page captures a card through the vault frame; the parent gets only id, brand and last4", { timeout: 120000 }, async () => {
  const page = await newPage();
  const requests = recordRequests(page);
  await page.goto(`${env.demo.origin}/`);
  const frame = await captureFrame(page, "#vault-frame");
  const iframe = page.locator("#vault-frame");
  const session = await iframe.getAttribute("data-session");
  const customer = await iframe.getAttribute("data-customer");
  env.sessionSecrets.push(new URL(await iframe.getAttribute("src")).hash.slice(1));

  // Live brand detection and formatting while typing.
  const number = frame.locator("#card-number");
  const badge = frame.locator("#card-brand");
  await number.pressSequentially("5555", { delay: 15 });
  assert.equal(await badge.getAttribute("data-brand"), "mastercard");
  await number.fill("");
  await number.pressSequentially("3782", { delay: 15 });
  assert.equal(await badge.getAttribute("data-brand"), "amex");
  assert.equal(await frame.locator("#card-cvc-hint").textContent(), "4 digits on the front");
  await number.fill("");
  await number.pressSequentially(VISA, { delay: 15 });
  assert.equal(await number.inputValue(), "4242 4242 4242 4242");
  assert.equal(await badge.getAttribute("data-brand"), "visa");
  assert.equal(await frame.locator("#card-brand-name").textContent(), "Visa");
  await fillCard(frame, { expiry: "1234", cvc: "123", name: "Ana Silva" });
  assert.equal(await frame.locator("#card-expiry").inputValue(), "12 / 34");
  for (const id of ["#card-number", "#card-expiry", "#card-cvc", "#card-name"]) {
    assert.equal(await frame.locator(id).getAttribute("aria-invalid"), "false", id);
  }
  // The field's description names its error element and the brand.
  assert.equal(await number.getAttribute("aria-describedby"), "card-number-error card-brand");
  await saveShot(page, "capture-desktop.png", { fullPage: true });
  await saveShot(iframe, "capture-frame-desktop.png");

  await frame.getByRole("button", { name: "Save card" }).click();
  await page.locator("#saved").waitFor({ state: "visible", timeout: 20000 });
  assert.equal(await page.locator("#saved-card").textContent(), "Visa ending in 4242");
  await frame.locator("#done").waitFor({ state: "visible" });
  await saveShot(page, "capture-saved-desktop.png", { fullPage: true });

  // What the parent received: only id, brand and last4 of the card.
  const messages = await page.evaluate(() => window.demoMessages);
  assertMessagesClean(messages);
  const created = messages.filter((m) => m.type === "cardvault:card_created");
  assert.equal(created.length, 1);
  assert.deepEqual(created[0].card.brand, "visa");
  assert.deepEqual(created[0].card.last4, "4242");

  // The customer has the card (checked through the API), and card.created fired.
  const cards = await cardsOf(customer);
  assert.equal(cards.length, 1);
  assert.equal(cards[0].id, created[0].card.id);
  assert.equal(cards[0].last4, "4242");
  assert.equal(cards[0].brand, "visa");
  assert.equal(cards[0].exp_month, 12);
  assert.equal(cards[0].exp_year, 2034);
  assert.equal(cards[0].holder_name, "Ana Silva");
  const events = await api("GET", "/v1/events?type=card.created&limit=100");
  assert.ok(
    events.body.data.some((e) => e.data.object.id === cards[0].id),
    "no card.created event for the captured card",
  );
  const s = await api("GET", `/v1/capture_sessions/${session}`);
  assert.equal(s.body.status, "used");
  assert.equal(s.body.card, cards[0].id);

  // Nothing kept in the frame: fields cleared, no storage, no cookie, and
  // the session secret is gone from the frame's address.
  // (A cross-site frame may be denied storage altogether; then nothing can
  // be in it either.)
  const leftovers = await frame.evaluate(() => {
    const count = (name) => {
      try {
        return window[name].length;
      } catch (e) {
        return e.name === "SecurityError" ? 0 : -1;
      }
    };
    return {
      values: ["card-number", "card-expiry", "card-cvc", "card-name"].map((id) => document.getElementById(id).value),
      local: count("localStorage"),
      session: count("sessionStorage"),
      cookie: document.cookie,
      hash: location.hash,
    };
  });
  assert.deepEqual(leftovers, { values: ["", "", "", ""], local: 0, session: 0, cookie: "", hash: "" });
  const state = await page.context().storageState();
  assert.deepEqual(state.cookies, []);
  for (const o of state.origins) {
    assert.deepEqual(o.localStorage, [], `${o.origin} has local storage`);
  }

  // The number went out once, in the body of a POST to the vault itself.
  assertNoPanInUrls(requests);
  const carrying = requests.filter((r) => r.body.includes(VISA));
  assert.equal(carrying.length, 1);
  assert.equal(carrying[0].method, "POST");
  assert.equal(carrying[0].url, `${env.vaultUrl}/hosted/capture/${session}/card`);
  env.firstSession = { session, customer, url: await iframe.getAttribute("src") };
  await page.context().close();

  // The same page at phone width (375 px), partly filled.
  const phone = await newPhonePage();
  await phone.goto(`${env.demo.origin}/`);
  const pframe = await captureFrame(phone, "#vault-frame");
  env.sessionSecrets.push(new URL(await phone.locator("#vault-frame").getAttribute("src")).hash.slice(1));
  await fillCard(pframe, { number: "378282246310005", expiry: "0931" });
  assert.equal(await pframe.locator("#card-number").inputValue(), "3782 822463 10005");
  const width = await pframe.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(width <= 375, `the form scrolls sideways at phone width (${width}px)`);
  await saveShot(phone, "capture-phone.png", { fullPage: true });
  await phone.context().close();
});

// ---------- 2. validation ----------

test("2. an invalid number, a past expiry and a missing CVC give inline errors and store nothing", { timeout: 120000 }, async () => {
  const page = await newPage();
  const requests = recordRequests(page);
  await page.goto(`${env.demo.origin}/`);
  const frame = await captureFrame(page, "#vault-frame");
  const iframe = page.locator("#vault-frame");
  const session = await iframe.getAttribute("data-session");
  const customer = await iframe.getAttribute("data-customer");
  const sessionUrl = await iframe.getAttribute("src");
  env.sessionSecrets.push(new URL(sessionUrl).hash.slice(1));

  // An incomplete number is flagged when the cardholder moves on.
  await fillCard(frame, { number: "42424242" });
  await frame.locator("#card-expiry").focus();
  assert.equal(await frame.locator("#card-number-error").textContent(), "This card number is incomplete.");
  await frame.locator("#card-number").fill("");

  await fillCard(frame, { number: BAD_LUHN, expiry: "0120", name: "Ana Silva" });
  // A wrong number is flagged as soon as it is complete.
  assert.match(await frame.locator("#card-number-error").textContent(), /not valid/);
  await frame.getByRole("button", { name: "Save card" }).click();

  const errors = {};
  for (const f of ["number", "expiry", "cvc", "name"]) {
    errors[f] = {
      text: await frame.locator(`#card-${f}-error`).textContent(),
      invalid: await frame.locator(`#card-${f}`).getAttribute("aria-invalid"),
    };
  }
  assert.deepEqual(errors, {
    number: { text: "This card number is not valid. Check it and try again.", invalid: "true" },
    expiry: { text: "This card has expired.", invalid: "true" },
    cvc: { text: "Enter the security code.", invalid: "true" },
    name: { text: "", invalid: "false" },
  });
  // Focus moves to the first field to fix; each error is tied to its field.
  assert.equal(await frame.evaluate(() => document.activeElement.id), "card-number");
  assert.match(await frame.locator("#card-cvc").getAttribute("aria-describedby"), /card-cvc-error/);
  await saveShot(iframe, "capture-errors.png");
  // Nothing was sent.
  assert.equal(requests.filter((r) => r.url.endsWith("/card")).length, 0);

  // The vault refuses the same mistakes when a script skips the page's
  // checks, naming the field; still nothing is stored.
  const secret = new URL(sessionUrl).hash.slice(1);
  const direct = await frame.evaluate(async ({ secret, pans }) => {
    const post = async (body) => {
      const r = await fetch(location.pathname + "/card", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ secret, ...body }),
      });
      const j = await r.json();
      return { status: r.status, code: j.error && j.error.code, param: j.error && j.error.param };
    };
    return [
      await post({ number: pans.bad, exp_month: 12, exp_year: 2034, cvc: "123" }),
      await post({ number: pans.good, exp_month: 1, exp_year: 2020, cvc: "123" }),
      await post({ number: pans.good, exp_month: 12, exp_year: 2034 }),
    ];
  }, { secret, pans: { bad: BAD_LUHN, good: VISA } });
  assert.deepEqual(direct, [
    { status: 400, code: "incorrect_number", param: "number" },
    { status: 400, code: "expired_card", param: "exp_year" },
    { status: 400, code: "parameter_missing", param: "cvc" },
  ]);
  assert.equal((await cardsOf(customer)).length, 0, "a rejected card was stored");
  assert.equal((await api("GET", `/v1/capture_sessions/${session}`)).body.status, "open");

  // The cardholder fixes the fields; the same form still works.
  await frame.locator("#card-number").fill("");
  await fillCard(frame, { number: SECOND_VISA });
  await frame.locator("#card-expiry").fill("");
  await fillCard(frame, { expiry: "1130", cvc: "321" });
  for (const f of ["number", "expiry", "cvc"]) {
    assert.equal(await frame.locator(`#card-${f}-error`).textContent(), "", f);
  }
  await frame.getByRole("button", { name: "Save card" }).click();
  await page.locator("#saved").waitFor({ state: "visible", timeout: 20000 });
  const cards = await cardsOf(customer);
  assert.equal(cards.length, 1);
  assert.equal(cards[0].last4, "1111");
  assertNoPanInUrls(requests);
  assertMessagesClean(await page.evaluate(() => window.demoMessages));
  await page.context().close();
});

// ---------- 3. closed sessions and foreign parents ----------

test("3. an expired or reused session, or a parent on another origin, gets nothing", { timeout: 150000 }, async () => {
  // (a) A parent on another origin: the demo page loaded as localhost
  // instead of 127.0.0.1. Its session names 127.0.0.1, so frame-ancestors
  // stops the browser from rendering the form in it.
  {
    const page = await newPage();
    const requests = recordRequests(page);
    const blocked = [];
    page.on("console", (m) => {
      if (/frame-ancestors|Refused to frame/i.test(m.text())) blocked.push(m.text());
    });
    await page.goto(`http://localhost:${env.demo.port}/`);
    const handle = await page.waitForSelector("#vault-frame", { timeout: 20000 });
    const customer = await handle.getAttribute("data-customer");
    const session = await handle.getAttribute("data-session");
    env.sessionSecrets.push(new URL(await handle.getAttribute("src")).hash.slice(1));
    await sleep(2500);
    const frame = await handle.contentFrame();
    const form = frame ? await frame.$("#card-number").catch(() => null) : null;
    assert.equal(form, null, "the card form rendered inside a parent on another origin");
    assert.ok(blocked.length > 0, "Chromium did not report the frame-ancestors block");
    assert.deepEqual(await page.evaluate(() => window.demoMessages), []);
    assert.equal(requests.filter((r) => r.url.endsWith("/card")).length, 0);
    assert.equal((await cardsOf(customer)).length, 0);
    assert.equal((await api("GET", `/v1/capture_sessions/${session}`)).body.status, "open");
    await saveShot(page, "capture-foreign-parent.png", { fullPage: true });
    await page.context().close();
  }

  // (b) The same with a bare parent page on another port: a session for
  // one origin cannot be shown by a page on another.
  {
    const customer = await newCustomer();
    const s = await captureSession(customer, env.demo.origin);
    const page = await newPage();
    const blocked = [];
    page.on("console", (m) => {
      if (/frame-ancestors/i.test(m.text())) blocked.push(m.text());
    });
    await page.goto(parentUrl(env.helperOrigin, s.url));
    const handle = await page.waitForSelector("#frame");
    await sleep(2000);
    const frame = await handle.contentFrame();
    assert.equal(frame ? await frame.$("#card-number").catch(() => null) : null, null);
    assert.ok(blocked.some((t) => t.includes(env.demo.origin)), `no frame-ancestors block reported: ${blocked}`);
    assert.deepEqual(await page.evaluate(() => window.received), []);
    assert.equal((await cardsOf(customer)).length, 0);
    await page.context().close();
  }

  // (c) A reused session: shown again after it saved a card, the frame says
  // so and tells the parent; sending the card again is refused.
  {
    const customer = await newCustomer();
    const s = await captureSession(customer, env.helperOrigin);
    const page = await newPage();
    await page.goto(parentUrl(env.helperOrigin, s.url));
    const frame = await captureFrame(page, "#frame");
    await fillCard(frame, { number: VISA, expiry: "1234", cvc: "123", name: "Ana Silva" });
    await frame.getByRole("button", { name: "Save card" }).click();
    await frame.locator("#done").waitFor({ state: "visible", timeout: 20000 });
    assert.equal((await cardsOf(customer)).length, 1);
    assertMessagesClean(await page.evaluate(() => window.received));

    await page.goto("about:blank");
    await page.goto(parentUrl(env.helperOrigin, s.url));
    const handle = await page.waitForSelector("#frame");
    const again = await handle.contentFrame();
    await again.waitForSelector("#closed", { timeout: 20000 });
    assert.equal(await again.locator("h1").textContent(), "This card form was already used");
    assert.equal(await again.$("#card-number"), null);
    await page.waitForFunction(() => window.received.some((m) => m.type === "cardvault:session_closed"));
    const received = await page.evaluate(() => window.received);
    assertMessagesClean(received);
    assert.deepEqual(received.filter((m) => m.type === "cardvault:session_closed"), [
      { type: "cardvault:session_closed", reason: "used" },
    ]);
    const replay = await again.evaluate(async ({ secret, pan }) => {
      const r = await fetch(location.pathname + "/card", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ secret, number: pan, exp_month: 11, exp_year: 2033, cvc: "456" }),
      });
      return { status: r.status, code: (await r.json()).error.code };
    }, { secret: new URL(s.url).hash.slice(1), pan: SECOND_VISA });
    assert.deepEqual(replay, { status: 409, code: "capture_session_used" });
    const cards = await cardsOf(customer);
    assert.equal(cards.length, 1);
    assert.equal(cards[0].last4, "4242");
    await saveShot(handle, "capture-used.png");
    await page.context().close();
  }

  // (d) An expired session: the form loaded while it was open, the
  // cardholder sends it after the session expired; then a fresh load.
  {
    const s = env.expiring;
    const page = await newPage();
    const remaining = s.expires_at * 1000 - Date.now();
    if (remaining > 0) {
      // Load while still open, then wait out the rest of its minute.
      await page.goto(parentUrl(env.helperOrigin, s.url));
      const frame = await captureFrame(page, "#frame");
      await fillCard(frame, { number: VISA, expiry: "1234", cvc: "123", name: "Ana Silva" });
      await sleep(s.expires_at * 1000 - Date.now() + 1500);
      await frame.getByRole("button", { name: "Save card" }).click();
      await frame.getByText("This card form has expired").waitFor({ timeout: 20000 });
      assert.equal(await frame.locator("#card-form").isHidden(), true);
      await page.waitForFunction(() => window.received.some((m) => m.type === "cardvault:session_closed"));
      const received = await page.evaluate(() => window.received);
      assertMessagesClean(received);
      assert.ok(received.some((m) => m.type === "cardvault:session_closed" && m.reason === "expired"));
    }
    await page.goto("about:blank");
    await page.goto(parentUrl(env.helperOrigin, s.url));
    const handle = await page.waitForSelector("#frame");
    const frame = await handle.contentFrame();
    await frame.waitForSelector("#closed", { timeout: 20000 });
    assert.equal(await frame.locator("h1").textContent(), "This card form has expired");
    assert.equal((await cardsOf(env.expiringCustomer)).length, 0, "an expired session saved a card");
    assert.equal((await api("GET", `/v1/capture_sessions/${s.id}`)).body.status, "expired");
    await saveShot(handle, "capture-expired.png");
    await page.context().close();
  }
});

// ---------- 4. CVV re-collect ----------

test("4. a charge waiting for the CVV completes through the re-collect page and its webhook fires", { timeout: 120000 }, async () => {
  const hook = await api("POST", "/v1/webhook_endpoints", {
    url: `${env.helperOrigin}/webhook`,
    events: ["charge.pending", "charge.succeeded"],
  });
  assert.equal(hook.status, 201, JSON.stringify(hook.body));
  const hookSecret = hook.body.secret;
  assert.ok(hookSecret, "the webhook endpoint has no signing secret");

  // The shopper saves the sandbox card that needs a CVV for stored-card
  // charges, then pays on the demo page.
  const page = await newPage();
  const requests = recordRequests(page);
  await page.goto(`${env.demo.origin}/`);
  const frame = await captureFrame(page, "#vault-frame");
  env.sessionSecrets.push(new URL(await page.locator("#vault-frame").getAttribute("src")).hash.slice(1));
  await fillCard(frame, { number: CVC_CARD, expiry: "1030", cvc: "123", name: "Ana Silva" });
  await frame.getByRole("button", { name: "Save card" }).click();
  await page.locator("#saved").waitFor({ state: "visible", timeout: 20000 });
  await page.getByRole("button", { name: "Pay $49.99" }).click();
  const link = page.locator("#cvc-link");
  await link.waitFor({ state: "visible", timeout: 20000 });
  const chargeId = await link.getAttribute("data-charge");
  const hostedUrl = await link.getAttribute("href");
  assert.ok(hostedUrl.startsWith(`${env.vaultUrl}/hosted/cvc/${chargeId}#`), hostedUrl);
  const pending = await api("GET", `/v1/charges/${chargeId}`);
  assert.equal(pending.body.status, "pending");
  assert.equal(pending.body.next_action.type, "provide_cvc");
  assert.equal(pending.body.next_action.provide_cvc.confirm_url, `/v1/charges/${chargeId}/confirm`);

  // The cardholder follows the link (a new tab).
  const [cvcPage] = await Promise.all([page.context().waitForEvent("page"), link.click()]);
  const cvcRequests = recordRequests(cvcPage);
  await cvcPage.locator("#cvc-form").waitFor({ state: "visible", timeout: 20000 });
  assert.equal(await cvcPage.locator("#card-last4").textContent(), "0101");
  assert.equal(await cvcPage.locator("#card-brand").getAttribute("data-brand"), "visa");
  assert.equal(await cvcPage.locator("#amount").textContent(), "$49.99");
  assert.equal(await cvcPage.locator("#merchant-name").textContent(), "Northwind Outfitters");
  const html = await cvcPage.content();
  assert.ok(!html.includes(CVC_CARD) && !html.includes("00000000"), "the CVV page shows more than the last four digits");
  await saveShot(cvcPage, "cvc-desktop.png", { fullPage: true });

  // A wrong-length CVC is caught inline first.
  await cvcPage.locator("#card-cvc").pressSequentially("12", { delay: 15 });
  await cvcPage.getByRole("button", { name: "Pay $49.99" }).click();
  assert.equal(await cvcPage.locator("#card-cvc-error").textContent(), "Enter the 3-digit code on the back of your card.");
  assert.equal(await cvcPage.locator("#card-cvc").getAttribute("aria-invalid"), "true");
  await cvcPage.locator("#card-cvc").fill("");
  await cvcPage.locator("#card-cvc").pressSequentially("123", { delay: 15 });
  await cvcPage.getByRole("button", { name: "Pay $49.99" }).click();
  await cvcPage.getByRole("heading", { name: "Payment confirmed" }).waitFor({ timeout: 30000 });
  assert.equal(await cvcPage.locator("#card-cvc").inputValue(), "");
  await saveShot(cvcPage, "cvc-confirmed.png", { fullPage: true });

  // The charge succeeded (API) and the shop page saw it.
  const done = await api("GET", `/v1/charges/${chargeId}`);
  assert.equal(done.body.status, "succeeded");
  assert.equal(done.body.captured, true);
  assert.equal(done.body.next_action, null);
  await page.locator("#outcome").getByText("Payment received").waitFor({ timeout: 30000 });

  // The charge's webhooks fired, signed: pending (with the page's link),
  // then succeeded.
  const deadline = Date.now() + 30000;
  let succeeded = null;
  while (!succeeded && Date.now() < deadline) {
    succeeded = env.webhooks.find((w) => {
      const e = JSON.parse(w.body);
      return e.type === "charge.succeeded" && e.data.object.id === chargeId;
    });
    if (!succeeded) await sleep(200);
  }
  assert.ok(succeeded, "no charge.succeeded webhook");
  const verify = (w) => {
    const parts = Object.fromEntries(w.signature.split(",").map((kv) => kv.split("=")));
    const mac = crypto.createHmac("sha256", hookSecret).update(`${parts.t}.${w.body}`).digest("hex");
    return crypto.timingSafeEqual(Buffer.from(mac), Buffer.from(parts.v1 || ""));
  };
  assert.ok(verify(succeeded), "the webhook signature does not verify");
  const pendingHook = env.webhooks.find((w) => {
    const e = JSON.parse(w.body);
    return e.type === "charge.pending" && e.data.object.id === chargeId;
  });
  assert.ok(pendingHook, "no charge.pending webhook");
  assert.equal(JSON.parse(pendingHook.body).data.object.next_action.provide_cvc.hosted_url.split("#")[0], hostedUrl.split("#")[0]);

  // The link is spent: opened again it shows the outcome, not the form.
  const again = await page.context().newPage();
  await again.goto(hostedUrl);
  await again.getByRole("heading", { name: "Payment confirmed" }).waitFor({ timeout: 20000 });
  assert.equal(await again.locator("#cvc-form").isHidden(), true);
  // No card number, nor the CVC, in any URL any of these pages requested.
  for (const r of [...requests, ...cvcRequests]) {
    assert.ok(!r.url.includes(CVC_CARD));
  }
  // The CVC went out in one POST body to the vault's confirm route only.
  const withCvc = cvcRequests.filter((r) => r.body.includes('"cvc":"123"'));
  assert.deepEqual(withCvc.map((r) => [r.method, r.url]), [["POST", `${env.vaultUrl}/hosted/cvc/${chargeId}/confirm`]]);

  // And at phone width.
  const phone = await newPhonePage();
  const charge2 = await api("POST", "/v1/charges", {
    amount: 1250,
    currency: "EUR",
    customer: done.body.customer,
  });
  assert.equal(charge2.body.status, "pending");
  await phone.goto(charge2.body.next_action.provide_cvc.hosted_url);
  await phone.locator("#cvc-form").waitFor({ state: "visible", timeout: 20000 });
  const width = await phone.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(width <= 375, `the CVV page scrolls sideways at phone width (${width}px)`);
  await saveShot(phone, "cvc-phone.png", { fullPage: true });
  await phone.context().close();
  await page.context().close();
});

// ---------- 5. nothing leaked ----------

test("5. the vault's log holds no card number and no session secret; screenshots were saved", { timeout: 30000 }, async () => {
  const log = fs.readFileSync(env.vaultLog, "utf8");
  assert.ok(log.includes("request"), "the vault logged no requests at all");
  for (const pan of ALL_PANS) {
    const grouped = pan.match(/.{1,4}/g).join(" ");
    assert.ok(!log.includes(pan) && !log.includes(grouped), "a card number is in the vault's log");
  }
  assert.ok(env.sessionSecrets.length >= 5);
  for (const secret of env.sessionSecrets) {
    assert.ok(secret.startsWith("css_"), secret);
    assert.ok(!log.includes(secret), "a capture session secret is in the vault's log");
  }
  for (const name of [
    "capture-desktop.png",
    "capture-phone.png",
    "capture-errors.png",
    "capture-saved-desktop.png",
    "cvc-desktop.png",
    "cvc-phone.png",
  ]) {
    assert.ok(fs.statSync(shot(name)).size > 5000, name);
  }
});

// A tiny demo merchant: a checkout page that embeds the vault's hosted card
// form, and the few server-side calls a merchant makes with its secret key
// (create a customer and a capture session, list the customer's cards,
// charge the card). Node's standard library only.
//
// Run it next to a dev-mode vault (see README.md, "Hosted card capture"):
//
//   CARDVAULT_URL=https://127.0.0.1:8443 \
//   CARDVAULT_SECRET_KEY=sk_live_... \
//   CARDVAULT_CA=data/tls/cert.pem \
//   node examples/demo-merchant/server.mjs
//
// then open http://127.0.0.1:4242/. The secret key stays in this process:
// the browser only ever gets the capture session URL.

import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));

const STATIC = {
  "/": ["index.html", "text/html; charset=utf-8"],
  "/demo.js": ["demo.js", "text/javascript; charset=utf-8"],
  "/demo.css": ["demo.css", "text/css; charset=utf-8"],
};

/** Calls the vault's API with the merchant's secret key. */
function vaultCall(cfg, method, apiPath, body) {
  const url = new URL(apiPath, cfg.vaultUrl);
  const payload = body === undefined ? undefined : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = https.request(
      url,
      {
        method,
        ca: cfg.ca,
        headers: {
          Authorization: `Bearer ${cfg.secretKey}`,
          Accept: "application/json",
          ...(payload ? { "Content-Type": "application/json" } : {}),
        },
        timeout: 20000,
      },
      (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (chunk) => (text += chunk));
        res.on("end", () => {
          let json = null;
          try {
            json = JSON.parse(text);
          } catch {
            json = null;
          }
          resolve({ status: res.statusCode, body: json });
        });
      },
    );
    req.on("timeout", () => req.destroy(new Error("vault call timed out")));
    req.on("error", reject);
    if (payload) {
      req.write(payload);
    }
    req.end();
  });
}

function readJson(req) {
  return new Promise((resolve, reject) => {
    let text = "";
    req.setEncoding("utf8");
    req.on("data", (chunk) => {
      text += chunk;
      if (text.length > 10000) {
        reject(new Error("body too large"));
        req.destroy();
      }
    });
    req.on("end", () => {
      try {
        resolve(text ? JSON.parse(text) : {});
      } catch (e) {
        reject(e);
      }
    });
  });
}

function send(res, status, body, type = "application/json; charset=utf-8") {
  res.writeHead(status, {
    "Content-Type": type,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
  });
  res.end(typeof body === "string" ? body : JSON.stringify(body));
}

/** What the demo page may show of a charge. */
function chargeView(c) {
  const next = c.next_action && c.next_action.provide_cvc;
  return {
    id: c.id,
    status: c.status,
    amount: c.amount,
    currency: c.currency,
    failure_code: c.failure_code,
    cvc_url: next ? next.hosted_url : null,
  };
}

async function route(cfg, req, res) {
  const url = new URL(req.url, "http://demo.invalid");
  if (req.method === "GET" && STATIC[url.pathname]) {
    const [file, type] = STATIC[url.pathname];
    const headers = {
      "Content-Type": type,
      "Cache-Control": "no-store",
      "X-Content-Type-Options": "nosniff",
      "Referrer-Policy": "no-referrer",
      // The demo page itself follows the rules it asks of the vault page:
      // no inline code, and it may frame the vault only.
      "Content-Security-Policy":
        `default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; ` +
        `img-src 'self'; frame-src ${new URL(cfg.vaultUrl).origin}; base-uri 'none'; form-action 'self'`,
    };
    res.writeHead(200, headers);
    res.end(readFileSync(path.join(here, "public", file)));
    return;
  }
  if (req.method === "POST" && url.pathname === "/api/checkout") {
    // A new shopper and a fresh card form for them. A real shop would use
    // its logged-in customer instead of making one per visit.
    // Letters only in the made-up address: the vault refuses text with a
    // digit run that could be a card number.
    const tag = Array.from(randomBytes(10), (b) => String.fromCharCode(97 + (b % 26))).join("");
    const customer = await vaultCall(cfg, "POST", "/v1/customers", {
      email: `shopper-${tag}@example.com`,
      first_name: "Demo",
    });
    if (customer.status !== 201) {
      return send(res, 502, { error: "could not create the customer", vault: customer.body });
    }
    const session = await vaultCall(cfg, "POST", "/v1/capture_sessions", {
      customer: customer.body.id,
      allowed_origin: cfg.origin,
    });
    if (session.status !== 201) {
      return send(res, 502, { error: "could not create the capture session", vault: session.body });
    }
    return send(res, 200, {
      customer: customer.body.id,
      session: session.body.id,
      url: session.body.url,
      expires_at: session.body.expires_at,
    });
  }
  const cards = url.pathname.match(/^\/api\/customers\/(cus_[A-Za-z0-9]+)\/cards$/);
  if (req.method === "GET" && cards) {
    const list = await vaultCall(cfg, "GET", `/v1/customers/${cards[1]}/cards`);
    if (list.status !== 200) {
      return send(res, list.status, { error: "could not list cards" });
    }
    return send(res, 200, {
      cards: list.body.data.map((c) => ({ id: c.id, brand: c.brand, last4: c.last4 })),
    });
  }
  if (req.method === "POST" && url.pathname === "/api/charges") {
    const body = await readJson(req);
    const charge = await vaultCall(cfg, "POST", "/v1/charges", {
      amount: 4999,
      currency: "USD",
      customer: body.customer,
      description: "Trail backpack 40L",
    });
    if (charge.status !== 201) {
      return send(res, charge.status, { error: "could not charge the card", vault: charge.body });
    }
    return send(res, 200, chargeView(charge.body));
  }
  const charge = url.pathname.match(/^\/api\/charges\/(ch_[A-Za-z0-9]+)$/);
  if (req.method === "GET" && charge) {
    const got = await vaultCall(cfg, "GET", `/v1/charges/${charge[1]}`);
    if (got.status !== 200) {
      return send(res, got.status, { error: "could not read the charge" });
    }
    return send(res, 200, chargeView(got.body));
  }
  send(res, 404, { error: "not found" });
}

/**
 * Starts the demo merchant. `origin` is the origin shoppers load the page
 * from (it becomes the capture sessions' allowed_origin).
 */
export function startDemoMerchant({ vaultUrl, secretKey, ca, host = "127.0.0.1", port = 4242, origin }) {
  const server = http.createServer((req, res) => {
    route(cfg, req, res).catch((e) => {
      send(res, 500, { error: String(e && e.message ? e.message : e) });
    });
  });
  const cfg = { vaultUrl, secretKey, ca, origin };
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => {
      const bound = server.address().port;
      if (!cfg.origin) {
        cfg.origin = `http://${host}:${bound}`;
      }
      resolve({ server, port: bound, origin: cfg.origin });
    });
  });
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const need = (name) => {
    const v = process.env[name];
    if (!v) {
      console.error(`set ${name} (see the comment at the top of this file)`);
      process.exit(2);
    }
    return v;
  };
  const demo = await startDemoMerchant({
    vaultUrl: process.env.CARDVAULT_URL || "https://127.0.0.1:8443",
    secretKey: need("CARDVAULT_SECRET_KEY"),
    ca: readFileSync(process.env.CARDVAULT_CA || "data/tls/cert.pem"),
    port: Number(process.env.PORT || 4242),
  });
  console.log(`demo merchant on ${demo.origin}/ (open it in a browser)`);
}

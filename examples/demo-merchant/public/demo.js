// The demo shop's page: asks its own server for a capture session, embeds
// the vault's card form, and listens for the form's messages, accepting
// them only from the vault's origin.
"use strict";

(function () {
  var frameBox = document.getElementById("frame-box");
  var frameStatus = document.getElementById("frame-status");
  var saved = document.getElementById("saved");
  var savedCard = document.getElementById("saved-card");
  var payButton = document.getElementById("pay");
  var outcome = document.getElementById("outcome");
  var cvcBox = document.getElementById("cvc-box");
  var cvcLink = document.getElementById("cvc-link");
  var log = document.getElementById("messages");
  var customer = null;
  var vaultOrigin = null;
  var frame = null;

  // Kept for anyone curious (and for the browser tests): every message the
  // page accepted, exactly as received.
  window.demoMessages = [];

  var BRANDS = { visa: "Visa", mastercard: "Mastercard", amex: "American Express" };

  function showOutcome(text, isError) {
    outcome.textContent = text;
    outcome.classList.toggle("is-error", !!isError);
    outcome.hidden = false;
  }

  window.addEventListener("message", function (event) {
    // Only the vault frame speaks to this page.
    if (!frame || event.origin !== vaultOrigin || event.source !== frame.contentWindow) {
      return;
    }
    var msg = event.data;
    if (!msg || typeof msg !== "object") {
      return;
    }
    window.demoMessages.push(msg);
    log.textContent = window.demoMessages.map(function (m) { return JSON.stringify(m); }).join("\n");
    if (msg.type === "cardvault:resize" && typeof msg.height === "number") {
      frame.style.height = Math.min(Math.max(msg.height, 120), 1200) + "px";
    } else if (msg.type === "cardvault:card_created") {
      savedCard.textContent = (BRANDS[msg.card.brand] || msg.card.brand) + " ending in " + msg.card.last4;
      saved.hidden = false;
    } else if (msg.type === "cardvault:session_closed") {
      showOutcome("The card form closed (" + msg.reason + "). Reload the page for a new one.", true);
    }
  });

  function poll(id, tries) {
    fetch("/api/charges/" + id).then(function (r) { return r.json(); }).then(function (c) {
      if (c.status === "succeeded") {
        cvcBox.hidden = true;
        showOutcome("Payment received. Thank you!", false);
      } else if (c.status === "failed" || c.status === "canceled") {
        cvcBox.hidden = true;
        showOutcome("The payment did not go through (" + (c.failure_code || c.status) + ").", true);
      } else if (tries > 0) {
        setTimeout(function () { poll(id, tries - 1); }, 2000);
      }
    });
  }

  payButton.addEventListener("click", function () {
    payButton.disabled = true;
    fetch("/api/charges", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ customer: customer })
    }).then(function (r) { return r.json(); }).then(function (c) {
      if (c.status === "succeeded") {
        showOutcome("Payment received. Thank you!", false);
      } else if (c.status === "pending" && c.cvc_url) {
        cvcLink.href = c.cvc_url;
        cvcLink.setAttribute("data-charge", c.id);
        cvcBox.hidden = false;
        poll(c.id, 150);
      } else {
        showOutcome("The payment did not go through (" + (c.failure_code || c.status || "error") + ").", true);
        payButton.disabled = false;
      }
    }, function () {
      showOutcome("Could not reach the shop's server.", true);
      payButton.disabled = false;
    });
  });

  fetch("/api/checkout", { method: "POST" }).then(function (r) { return r.json(); }).then(function (s) {
    if (!s.url) {
      frameStatus.textContent = "The card form is not available right now.";
      return;
    }
    customer = s.customer;
    vaultOrigin = new URL(s.url).origin;
    frame = document.createElement("iframe");
    frame.title = "Secure card form";
    frame.id = "vault-frame";
    frame.src = s.url;
    frame.setAttribute("data-session", s.session);
    frame.setAttribute("data-customer", s.customer);
    frameStatus.remove();
    frameBox.appendChild(frame);
  }, function () {
    frameStatus.textContent = "Could not reach the shop's server.";
  });
})();

// cardvault CVV re-collect page: shows the payment and the card's brand
// and last four digits, takes the security code and completes the charge.
// The link's credential is in the URL fragment (never sent to a server by
// the browser); the page sends it in POST bodies to the vault only.
"use strict";

(function () {
  var C = window.Cardvault;
  var credential = window.location.hash.replace(/^#/, "");
  var base = window.location.pathname.replace(/\/+$/, "");

  var loading = document.getElementById("loading");
  var form = document.getElementById("cvc-form");
  var cvc = document.getElementById("card-cvc");
  var hint = document.getElementById("card-cvc-hint");
  var button = document.getElementById("submit");
  var formError = document.getElementById("form-error");
  var result = document.getElementById("result");
  var brand = C.unknownBrand;
  var payLabel = "Confirm payment";
  var merchant = "the merchant";
  var amount = "";
  var busy = false;

  function show(kind, title, text) {
    loading.hidden = true;
    form.hidden = true;
    cvc.value = "";
    result.classList.toggle("is-error", kind !== "ok");
    document.getElementById("result-title").textContent = title;
    document.getElementById("result-text").textContent = text;
    result.hidden = false;
    result.focus();
  }

  function showStatus(status) {
    if (status === "succeeded") {
      show("ok", "Payment confirmed", "Thank you. " + merchant + " has received your payment of " + amount + ". You can close this page.");
    } else if (status === "failed") {
      show("error", "Payment declined", "Your bank did not approve this payment. Contact " + merchant + " to pay another way.");
    } else if (status === "canceled") {
      show("error", "Payment canceled", merchant + " canceled this payment. Nothing was charged.");
    } else {
      show("error", "Payment in progress", "This payment is being processed. You can close this page; " + merchant + " will let you know.");
    }
  }

  function linkProblem(res) {
    var code = res.body && res.body.error && res.body.error.code;
    if (code === "payment_link_expired") {
      show("error", "This payment link has expired", "For your security, payment links work for a short time only. Ask " + merchant + " for a new one.");
    } else if (res.status === 404) {
      show("error", "This payment link is not valid", "Check that you opened the whole link, or ask the merchant for a new one.");
    } else {
      show("error", "We couldn't load this payment", "Please try again in a moment.");
    }
  }

  function cvcMessage(final) {
    if (!final && cvc.value.length < brand.cvc) {
      return "";
    }
    return C.cvcError(cvc.value, brand);
  }

  function render(details) {
    merchant = details.merchant || "the merchant";
    amount = C.formatAmount(details.amount, details.currency, details.exponent);
    if (details.status !== "awaiting_cvc") {
      showStatus(details.status);
      return;
    }
    var rules = (window.CardvaultBrands && window.CardvaultBrands.rules) || [];
    brand = rules.filter(function (r) { return r.brand === details.brand; })[0] || C.unknownBrand;
    document.getElementById("merchant-name").textContent = merchant;
    document.getElementById("amount").textContent = amount;
    document.getElementById("card-last4").textContent = details.last4;
    C.setBrandBadge(document.getElementById("card-brand"), brand);
    hint.textContent = C.cvcHint(brand);
    cvc.maxLength = brand.brand === "unknown" ? 4 : brand.cvc;
    payLabel = "Pay " + amount;
    document.getElementById("submit-label").textContent = payLabel;
    loading.hidden = true;
    form.hidden = false;
    cvc.focus();
  }

  cvc.addEventListener("input", function () {
    var d = C.digits(cvc.value);
    if (d !== cvc.value) {
      cvc.value = d;
    }
    C.setError(cvc, cvcMessage(false));
  });
  cvc.addEventListener("blur", function () {
    if (cvc.value) {
      C.setError(cvc, cvcMessage(true));
    }
  });

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (busy) {
      return;
    }
    formError.textContent = "";
    var message = cvcMessage(true);
    C.setError(cvc, message);
    if (message) {
      cvc.focus();
      return;
    }
    busy = true;
    C.setBusy(button, true, "Confirming…");
    C.postJSON(base + "/confirm", { credential: credential, cvc: cvc.value }).then(function (res) {
      if (res.status === 200 && res.body) {
        showStatus(res.body.status);
        return;
      }
      var error = res.body && res.body.error;
      if (res.status === 400 && error && error.param === "cvc") {
        C.setError(cvc, "Check the security code.");
        cvc.focus();
      } else if (error && error.code === "charge_not_awaiting_cvc") {
        show("error", "Nothing to confirm", "This payment no longer needs your security code.");
      } else if (res.status === 404 || (error && error.code === "payment_link_expired")) {
        linkProblem(res);
      } else if (res.status === 503) {
        formError.textContent = "The card vault is busy right now. Please try again in a moment.";
      } else {
        formError.textContent = "Something went wrong on our side. Please try again.";
      }
    }, function () {
      formError.textContent = "We couldn't reach the card vault. Check your connection and try again.";
    }).then(function () {
      busy = false;
      C.setBusy(button, false, payLabel);
    });
  });

  if (!credential) {
    show("error", "This payment link is incomplete", "Open the whole link you received, or ask the merchant for a new one.");
    return;
  }
  C.postJSON(base + "/details", { credential: credential }).then(function (res) {
    if (res.status === 200 && res.body) {
      render(res.body);
    } else {
      linkProblem(res);
    }
  }, function () {
    show("error", "We couldn't reach the card vault", "Check your connection and reload this page.");
  });
})();

// cardvault hosted card capture. Runs inside the merchant's iframe: checks
// the card as it is typed, sends it to the vault (same origin, POST body
// only) and tells the parent page the saved card's id, brand and last four
// digits, posting only to the origin the merchant registered.
"use strict";

(function () {
  var C = window.Cardvault;
  var root = document.documentElement;
  var parentOrigin = root.getAttribute("data-parent-origin") || "";
  var framed = window.parent !== window;

  function tellParent(message) {
    // Never "*": a page on any other origin gets nothing.
    if (framed && parentOrigin) {
      window.parent.postMessage(message, parentOrigin);
    }
  }

  function watchHeight() {
    if (!framed || typeof ResizeObserver === "undefined") {
      return;
    }
    var last = 0;
    new ResizeObserver(function () {
      var height = Math.ceil(document.documentElement.getBoundingClientRect().height);
      if (height !== last) {
        last = height;
        tellParent({ type: "cardvault:resize", height: height });
      }
    }).observe(document.body);
  }

  var form = document.getElementById("card-form");
  if (!form) {
    // The closed page: the session is used, expired or unknown.
    var state = root.getAttribute("data-state");
    if (state === "used" || state === "expired") {
      tellParent({ type: "cardvault:session_closed", reason: state });
    }
    watchHeight();
    return;
  }

  // The session secret rides in the fragment, which no server ever sees.
  // Keep it in memory only and take it out of the address and history.
  var secret = window.location.hash.replace(/^#/, "");
  if (secret) {
    history.replaceState(null, "", window.location.pathname);
  }
  var submitUrl = window.location.pathname.replace(/\/+$/, "") + "/card";

  var number = document.getElementById("card-number");
  var expiry = document.getElementById("card-expiry");
  var cvc = document.getElementById("card-cvc");
  var name = document.getElementById("card-name");
  var badge = document.getElementById("card-brand");
  var badgeLabel = document.getElementById("card-brand-label");
  var cvcHint = document.getElementById("card-cvc-hint");
  var formError = document.getElementById("form-error");
  var button = document.getElementById("submit");
  var done = document.getElementById("done");
  var busy = false;

  function brand() {
    return C.detect(number.value);
  }

  function numberError(final) {
    var d = C.digits(number.value);
    var b = brand();
    if (!d) {
      return final ? "Enter your card number." : "";
    }
    var complete = b.brand === "unknown" ? d.length >= 12 : b.lengths.indexOf(d.length) !== -1;
    var full = d.length >= C.maxLength(b);
    if (!complete) {
      return final || full ? "This card number is incomplete." : "";
    }
    if (!C.luhnValid(d)) {
      // Flag a wrong number once it has the usual 16 digits (or cannot
      // grow any more), or when the cardholder leaves the field.
      return final || full || d.length >= 16 ? "This card number is not valid. Check it and try again." : "";
    }
    return "";
  }

  function expiryError(final) {
    var d = C.digits(expiry.value);
    if (!final && d.length < 4) {
      return "";
    }
    var parsed = C.parseExpiry(expiry.value, new Date());
    return parsed.error || "";
  }

  function cvcError(final) {
    var b = brand();
    if (!final && cvc.value.length < b.cvc) {
      return "";
    }
    if (!cvc.value && !b.cvcRequired && b.brand !== "unknown") {
      return "";
    }
    return C.cvcError(cvc.value, b);
  }

  function nameError(final) {
    var v = name.value.trim();
    if (!v) {
      return final ? "Enter the name as it appears on the card." : "";
    }
    if (/\d/.test(v)) {
      return "The name can't contain numbers.";
    }
    return "";
  }

  var checks = [
    [number, numberError],
    [expiry, expiryError],
    [cvc, cvcError],
    [name, nameError]
  ];

  function check(input, final) {
    for (var i = 0; i < checks.length; i++) {
      if (checks[i][0] === input) {
        var message = checks[i][1](final);
        C.setError(input, message);
        return message;
      }
    }
    return "";
  }

  function updateBrand() {
    var b = brand();
    C.setBrandBadge(badge, b);
    badgeLabel.textContent = b.brand === "unknown" ? "Card type not recognised yet" : "Card type: " + b.name;
    cvcHint.textContent = C.cvcHint(b);
    cvc.maxLength = b.brand === "unknown" ? 4 : b.cvc;
  }

  // While typing, only mistakes that more typing cannot fix are shown (and
  // fixed ones cleared); a field left half typed is flagged on leaving it,
  // an empty one only when the form is sent.
  number.addEventListener("input", function () {
    C.reformat(number, C.formatNumber);
    updateBrand();
    check(number, false);
    if (cvc.value) {
      check(cvc, false);
    }
  });
  expiry.addEventListener("input", function () {
    C.reformat(expiry, C.formatExpiry);
    check(expiry, false);
  });
  cvc.addEventListener("input", function () {
    var d = C.digits(cvc.value);
    if (d !== cvc.value) {
      cvc.value = d;
    }
    check(cvc, false);
  });
  name.addEventListener("input", function () {
    check(name, false);
  });
  [number, expiry, cvc, name].forEach(function (input) {
    input.addEventListener("blur", function () {
      if (input.value) {
        check(input, true);
      }
    });
  });

  function showFormError(message) {
    formError.textContent = message;
  }

  // The session cannot be used any more: replace the form with the reason
  // and tell the parent, so the merchant can offer a fresh form.
  function closeSession(reason, title, text) {
    clearFields();
    form.hidden = true;
    var section = document.createElement("section");
    section.className = "done is-error";
    section.setAttribute("tabindex", "-1");
    section.setAttribute("role", "alert");
    var h = document.createElement("h2");
    h.textContent = title;
    var p = document.createElement("p");
    p.textContent = text;
    section.appendChild(h);
    section.appendChild(p);
    form.parentNode.insertBefore(section, form);
    section.focus();
    tellParent({ type: "cardvault:session_closed", reason: reason });
  }

  function clearFields() {
    number.value = "";
    expiry.value = "";
    cvc.value = "";
    name.value = "";
  }

  function serverFieldError(error) {
    var param = error && error.param;
    var code = error && error.code;
    if (param === "number") {
      C.setError(number, code === "parameter_missing" ? "Enter your card number." : "This card number is not valid. Check it and try again.");
      return number;
    }
    if (param === "exp_month" || param === "exp_year") {
      C.setError(expiry, code === "expired_card" ? "This card has expired." : "Check the expiry date.");
      return expiry;
    }
    if (param === "cvc") {
      C.setError(cvc, code === "parameter_missing" ? "Enter the security code." : "Check the security code.");
      return cvc;
    }
    if (param === "holder_name") {
      C.setError(name, "Check the name on the card.");
      return name;
    }
    return null;
  }

  function succeeded(result) {
    var card = result.card;
    clearFields();
    form.hidden = true;
    var b = C.detect("");
    var found = (window.CardvaultBrands && window.CardvaultBrands.rules || []).filter(function (r) {
      return r.brand === card.brand;
    })[0];
    C.setBrandBadge(document.getElementById("done-brand"), found || b);
    document.getElementById("done-last4").textContent = card.last4;
    done.hidden = false;
    done.focus();
    // Exactly these three fields leave the frame: never the number.
    tellParent({
      type: "cardvault:card_created",
      card: { id: card.id, brand: card.brand, last4: card.last4 }
    });
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (busy) {
      return;
    }
    showFormError("");
    var first = null;
    checks.forEach(function (pair) {
      var message = check(pair[0], true);
      if (message && !first) {
        first = pair[0];
      }
    });
    if (first) {
      first.focus();
      return;
    }
    if (!secret) {
      showFormError("This card form link is incomplete. Reload the page you came from.");
      return;
    }
    var exp = C.parseExpiry(expiry.value, new Date());
    var body = {
      secret: secret,
      number: C.digits(number.value),
      exp_month: exp.month,
      exp_year: exp.year,
      cvc: cvc.value || undefined,
      holder_name: name.value.trim()
    };
    busy = true;
    C.setBusy(button, true, "Saving…");
    form.setAttribute("aria-busy", "true");
    C.postJSON(submitUrl, body).then(function (res) {
      body = null;
      if (res.status === 200 || res.status === 201) {
        succeeded(res.body);
        return;
      }
      var error = res.body && res.body.error;
      var code = error && error.code;
      if (code === "capture_session_used") {
        closeSession("used", "This card form was already used", "Each card form saves one card. To add another card, reload the page you came from.");
      } else if (code === "capture_session_expired") {
        closeSession("expired", "This card form has expired", "For your security, card forms stay open for a few minutes only. Reload the page you came from to get a new one.");
      } else if (res.status === 404) {
        closeSession("invalid", "This card form is not valid", "Reload the page you came from and try again.");
      } else if (res.status === 400) {
        var field = serverFieldError(error);
        if (field) {
          field.focus();
        } else {
          showFormError("Check your card details and try again.");
        }
      } else if (res.status === 503) {
        showFormError("The card vault is busy right now. Please try again in a moment.");
      } else {
        showFormError("Something went wrong on our side. Please try again.");
      }
    }, function () {
      body = null;
      showFormError("We couldn't reach the card vault. Check your connection and try again.");
    }).then(function () {
      busy = false;
      C.setBusy(button, false, "Save card");
      form.removeAttribute("aria-busy");
    });
  });

  updateBrand();
  watchHeight();
  tellParent({ type: "cardvault:ready" });
})();

// cardvault hosted pages: helpers shared by the capture and CVV pages.
// Card data typed here lives only in the input fields and in the body of
// one same-origin POST; nothing is written to storage, cookies or URLs.
"use strict";

(function () {
  var table = window.CardvaultBrands || { rules: [], unknown: null };
  var unknown = table.unknown || {
    brand: "unknown", name: "Card", cvc: 3, cvcFront: false, cvcRequired: false,
    lengths: [12, 13, 14, 15, 16, 17, 18, 19]
  };

  // Short labels for the badge; the table carries the full names.
  var SHORT = { amex: "AMEX", diners: "Diners", mastercard: "Mastercard", unionpay: "UnionPay" };

  function digits(value) {
    return String(value || "").replace(/\D+/g, "");
  }

  // First matching rule wins, exactly like the vault's Brand::detect.
  function detect(number) {
    var d = digits(number);
    for (var i = 0; i < table.rules.length; i++) {
      var rule = table.rules[i];
      for (var j = 0; j < rule.ranges.length; j++) {
        var r = rule.ranges[j];
        if (d.length >= r[0]) {
          var v = Number(d.slice(0, r[0]));
          if (v >= r[1] && v <= r[2]) {
            return rule;
          }
        }
      }
    }
    return unknown;
  }

  function shortName(brand) {
    return SHORT[brand.brand] || brand.name;
  }

  function luhnValid(number) {
    var d = digits(number);
    if (d.length < 12 || d.length > 19) {
      return false;
    }
    var sum = 0;
    var double = false;
    for (var i = d.length - 1; i >= 0; i--) {
      var n = d.charCodeAt(i) - 48;
      if (double) {
        n *= 2;
        if (n > 9) {
          n -= 9;
        }
      }
      sum += n;
      double = !double;
    }
    return sum % 10 === 0;
  }

  function maxLength(brand) {
    return Math.max.apply(null, brand.lengths.length ? brand.lengths : [19]);
  }

  // Where the spaces go: 4-6-5 for 15-digit American Express and 14-digit
  // Diners cards, groups of four for everything else.
  function groups(brand, length) {
    if (brand.brand === "amex" || (brand.brand === "diners" && length === 14)) {
      return [4, 6, 5];
    }
    return [4, 4, 4, 4, 3];
  }

  function formatNumber(value) {
    var brand = detect(value);
    var d = digits(value).slice(0, maxLength(brand));
    var sizes = groups(brand, d.length);
    var parts = [];
    var at = 0;
    for (var i = 0; i < sizes.length && at < d.length; i++) {
      parts.push(d.slice(at, at + sizes[i]));
      at += sizes[i];
    }
    if (at < d.length) {
      parts.push(d.slice(at));
    }
    return parts.join(" ");
  }

  function formatExpiry(value) {
    var d = digits(value).slice(0, 6);
    // "4" can only be April: show it as 04 so the slash comes at once.
    if (d.length === 1 && d > "1") {
      d = "0" + d;
    }
    if (d.length <= 2) {
      return d;
    }
    return d.slice(0, 2) + " / " + d.slice(2);
  }

  // Returns {month, year} or {error}.
  function parseExpiry(value, now) {
    var d = digits(value);
    if (!d) {
      return { error: "Enter the expiry date." };
    }
    if (d.length !== 4 && d.length !== 6) {
      return { error: "Enter the expiry date as MM / YY." };
    }
    var month = Number(d.slice(0, 2));
    var year = Number(d.slice(2));
    if (d.length === 4) {
      year += 2000;
    }
    if (month < 1 || month > 12) {
      return { error: "The month must be between 01 and 12." };
    }
    var nowYear = now.getFullYear();
    var nowMonth = now.getMonth() + 1;
    if (year < nowYear || (year === nowYear && month < nowMonth)) {
      return { error: "This card has expired." };
    }
    if (year > nowYear + 50) {
      return { error: "Check the expiry year." };
    }
    return { month: month, year: year };
  }

  function cvcError(value, brand) {
    var d = String(value || "");
    var words = brand.cvcFront ? "on the front of your card" : "on the back of your card";
    if (!d) {
      return "Enter the security code.";
    }
    if (!/^\d+$/.test(d)) {
      return "The security code has digits only.";
    }
    var ok = brand.brand === "unknown" ? d.length === 3 || d.length === 4 : d.length === brand.cvc;
    if (!ok) {
      return "Enter the " + brand.cvc + "-digit code " + words + ".";
    }
    return "";
  }

  function cvcHint(brand) {
    return brand.cvcFront ? brand.cvc + " digits on the front" : brand.cvc + " digits on the back";
  }

  // Rewrites a field's value keeping the caret after the same number of
  // digits, so typing in the middle of a number works.
  function reformat(input, formatter) {
    var caret = input.selectionStart === null ? input.value.length : input.selectionStart;
    var digitsBefore = digits(input.value.slice(0, caret)).length;
    var formatted = formatter(input.value);
    if (formatted === input.value) {
      return;
    }
    input.value = formatted;
    var pos = 0;
    var seen = 0;
    while (pos < formatted.length && seen < digitsBefore) {
      if (formatted.charCodeAt(pos) >= 48 && formatted.charCodeAt(pos) <= 57) {
        seen++;
      }
      pos++;
    }
    if (document.activeElement === input) {
      input.setSelectionRange(pos, pos);
    }
  }

  // Shows (or clears, with "") a field's inline error.
  function setError(input, message) {
    var el = document.getElementById(input.id + "-error");
    if (el) {
      el.textContent = message || "";
    }
    input.setAttribute("aria-invalid", message ? "true" : "false");
  }

  function setBrandBadge(badge, brand) {
    badge.setAttribute("data-brand", brand.brand);
    var name = badge.querySelector(".brand-name");
    if (name) {
      name.textContent = brand.brand === "unknown" ? "" : shortName(brand);
    }
  }

  function setBusy(button, busy, label) {
    button.disabled = busy;
    button.setAttribute("aria-busy", busy ? "true" : "false");
    var text = button.querySelector(".label");
    if (text && label) {
      text.textContent = label;
    }
  }

  // One JSON POST to the vault itself. No cookies, no cache, no referrer,
  // no redirects: the body (the only place card data ever goes) reaches
  // this origin and nothing else.
  function postJSON(url, body) {
    return fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", "Accept": "application/json" },
      body: JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
      redirect: "error",
      referrerPolicy: "no-referrer"
    }).then(function (resp) {
      return resp.text().then(function (text) {
        var parsed = null;
        try {
          parsed = JSON.parse(text);
        } catch (e) {
          parsed = null;
        }
        return { status: resp.status, body: parsed };
      });
    });
  }

  function formatAmount(minor, currency, exponent) {
    var value = minor / Math.pow(10, exponent);
    try {
      return new Intl.NumberFormat(undefined, {
        style: "currency",
        currency: currency,
        minimumFractionDigits: exponent,
        maximumFractionDigits: exponent
      }).format(value);
    } catch (e) {
      return value.toFixed(exponent) + " " + currency;
    }
  }

  window.Cardvault = {
    digits: digits,
    detect: detect,
    shortName: shortName,
    luhnValid: luhnValid,
    maxLength: maxLength,
    formatNumber: formatNumber,
    formatExpiry: formatExpiry,
    parseExpiry: parseExpiry,
    cvcError: cvcError,
    cvcHint: cvcHint,
    reformat: reformat,
    setError: setError,
    setBrandBadge: setBrandBadge,
    setBusy: setBusy,
    postJSON: postJSON,
    formatAmount: formatAmount,
    unknownBrand: unknown
  };
})();

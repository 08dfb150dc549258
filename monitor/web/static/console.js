// The console's only script, served by the gateway (no CDN, no inline script:
// the CSP allows script from 'self' alone).  Progressive: every page works without it.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("input.select-all").forEach(function (box) {
    box.addEventListener("change", function () {
      var form = box.closest("form");
      form.querySelectorAll("input.pick").forEach(function (p) { p.checked = box.checked; });
    });
  });
  document.querySelectorAll("button[data-confirm]").forEach(function (b) {
    b.addEventListener("click", function (ev) {
      if (!window.confirm(b.getAttribute("data-confirm"))) { ev.preventDefault(); }
    });
  });
});

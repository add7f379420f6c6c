// The dashboard's only script (no inline script: the CSP forbids it). Reloads a live page every
// data-refresh seconds, unless the page is hidden, a field has focus, or the user paused it.
"use strict";
// Timeline bars: placed from data attributes (the CSP forbids inline style attributes).
document.querySelectorAll(".bar span[data-left]").forEach(function (bar) {
  bar.style.left = bar.dataset.left + "%";
  bar.style.width = bar.dataset.width + "%";
});
(function () {
  const seconds = parseInt(document.body.dataset.refresh || "0", 10);
  const status = document.getElementById("refresh-status");
  if (!seconds || !status) return;
  let left = seconds;
  let paused = sessionStorage.getItem("saga-refresh-paused") === "1";
  const button = document.createElement("button");
  button.type = "button";
  button.id = "refresh-toggle";
  const label = document.createElement("span");
  status.append(label, " ", button);
  function show() {
    label.textContent = paused ? "auto-refresh paused" : "refresh in " + left + " s";
    button.textContent = paused ? "Resume" : "Pause";
  }
  button.addEventListener("click", function () {
    paused = !paused;
    sessionStorage.setItem("saga-refresh-paused", paused ? "1" : "0");
    left = seconds;
    show();
  });
  show();
  setInterval(function () {
    const busy = document.activeElement && /^(INPUT|TEXTAREA|SELECT)$/.test(document.activeElement.tagName);
    if (paused || document.hidden || busy) return;
    left -= 1;
    if (left <= 0) {
      location.reload();
      return;
    }
    show();
  }, 1000);
})();

// A submission page follows its submission: poll its status, reload when it moves.
"use strict";
(function () {
  const summary = document.querySelector("[data-follow]");
  if (!summary) return;
  const url = summary.dataset.follow;
  const seen = summary.dataset.status;
  async function poll() {
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (!response.ok) return;
      const state = await response.json();
      if (state.status !== seen) { window.location.reload(); return; }
    } catch (error) { /* the server is restarting: try again at the next tick */ }
    window.setTimeout(poll, 3000);
  }
  window.setTimeout(poll, 3000);
})();

// A submission page follows its submission: poll its status, reload when it moves, and
// refresh the live log of each running job. Logs are set as text (textContent), never as
// markup: they are the participant's container's output.
"use strict";
(function () {
  const summary = document.querySelector("[data-follow]");
  if (!summary) return;
  const url = summary.dataset.follow;
  const seen = summary.dataset.status;

  function showLogs(logs) {
    document.querySelectorAll("pre[data-job]").forEach(function (pre) {
      const text = (logs || {})[pre.dataset.job];
      if (typeof text === "string" && pre.textContent !== text) pre.textContent = text;
    });
  }

  async function poll() {
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (!response.ok) return;
      const state = await response.json();
      if (state.status !== seen) { window.location.reload(); return; }
      showLogs(state.logs);
    } catch (error) { /* the server is restarting: try again at the next tick */ }
    window.setTimeout(poll, 3000);
  }
  window.setTimeout(poll, 3000);
})();

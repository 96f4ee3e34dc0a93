// The dashboard's live part: the running jobs and the queue counts, every few seconds.
// Every value is set as text (textContent), never as markup: team names and logs are hostile.
"use strict";
(function () {
  const queue = document.getElementById("queue");
  const running = document.querySelector("#running tbody");
  if (!queue || !running) return;
  const url = queue.dataset.live;

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    const mm = String(m).padStart(2, "0"), ss = String(s).padStart(2, "0");
    return h ? `${h}h ${mm}m ${ss}s` : `${m}m ${ss}s`;
  }

  function cell(text) {
    const td = document.createElement("td");
    td.textContent = text;
    return td;
  }

  function jobRow(job) {
    const tr = document.createElement("tr");
    tr.appendChild(cell(String(job.job)));
    const link = document.createElement("a");
    link.href = "/submissions/" + encodeURIComponent(job.submission);
    link.textContent = "#" + job.submission;
    const linkCell = document.createElement("td");
    linkCell.appendChild(link);
    tr.appendChild(linkCell);
    const team = cell(job.team);
    team.className = "team";
    tr.appendChild(team);
    tr.appendChild(cell(job.challenge + "/" + job.phase));
    tr.appendChild(cell(job.status));
    tr.appendChild(cell(job.worker));
    tr.appendChild(cell(duration(job.elapsed_seconds)));
    const pre = document.createElement("pre");
    pre.className = "log";
    pre.textContent = job.log_tail;
    const logCell = document.createElement("td");
    logCell.appendChild(pre);
    tr.appendChild(logCell);
    return tr;
  }

  function show(state) {
    const rows = state.running.map(jobRow);
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = cell("No job is running.");
      td.colSpan = 8;
      tr.appendChild(td);
      rows.push(tr);
    }
    running.replaceChildren(...rows);
    const body = queue.querySelector("tbody");
    state.queue.forEach(function (line, index) {
      const tr = body.rows[index];
      if (!tr) return;
      Object.entries(line.states).forEach(function ([name, count]) {
        const td = tr.querySelector(`[data-state="${name}"]`);
        if (td) td.textContent = String(count);
      });
    });
  }

  async function poll() {
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (response.ok) show(await response.json());
    } catch (error) { /* the server is restarting: try again at the next tick */ }
    window.setTimeout(poll, 4000);
  }
  window.setTimeout(poll, 4000);
})();

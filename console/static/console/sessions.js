// The sessions list, live: the tenant's event stream (api/stream.py) moves each row's status
// badge and task counts as they change. The page works without it. The stream starts at the
// position the page was rendered at (?after=), so nothing between the two is missed or repeated;
// the browser resumes after a drop with Last-Event-ID by itself.
(function () {
  const table = document.getElementById("sessions");
  const notice = document.getElementById("live");
  if (!table || !table.dataset.stream || !window.EventSource) return;

  function say(text) {
    notice.hidden = false;
    notice.textContent = text;
  }

  function rowOf(sessionId) {
    return table.querySelector(`tr[data-session="${CSS.escape(sessionId)}"]`);
  }

  function onSession(data) {
    const row = rowOf(data.session);
    if (!row) {
      if (data.from === null) say("New sessions were created: reload to see them.");
      return;
    }
    const badge = row.querySelector(".badge[data-status]");
    badge.className = `badge s-${data.to}`;
    badge.dataset.status = data.to;
    badge.textContent = data.to.replace(/_/g, " ");
  }

  // A task's move from one status to another changes the row's done and failed counts.
  function onTask(data) {
    const row = rowOf(data.session);
    if (!row || data.from === data.to) return;
    const bump = (cell, key, by) => {
      cell.dataset[key] = Number(cell.dataset[key]) + by;
    };
    const done = row.querySelector("[data-completed]");
    const failed = row.querySelector("[data-failed]");
    for (const [status, by] of [[data.from, -1], [data.to, 1]]) {
      if (status === "completed") bump(done, "completed", by);
      if (status === "failed") bump(failed, "failed", by);
    }
    done.textContent = `${done.dataset.completed}/${done.dataset.total}`;
    failed.textContent = failed.dataset.failed;
  }

  const stream = new EventSource(table.dataset.stream, { withCredentials: true });
  for (const [kind, handle] of [["session", onSession], ["task", onTask]]) {
    stream.addEventListener(kind, (message) => handle(JSON.parse(message.data)));
  }
  stream.addEventListener("end", () => {
    stream.close();
    say("Live updates stopped: reload the page.");
  });
  stream.addEventListener("error", () => {
    // EventSource reconnects by itself; CLOSED means it gave up (the stream refused us).
    if (stream.readyState === EventSource.CLOSED) say("Live updates are unavailable: reload to refresh.");
  });
})();

// The session page's live part. The page works without it (links, GET filters, forms that ask
// for confirmation on a page of their own); this file follows the event stream, opens the task
// panel in place, zooms, filters at once and confirms actions in a dialog.
//
// Plain JavaScript rather than htmx: the stream (api/stream.py) sends JSON events, and what
// they change is a drawing - a node's class, its status text and accessible name, the edges'
// classes - plus rows built from data. htmx's SSE extension swaps server-rendered HTML, which
// would need a second renderer in the stream process, and it would add a vendored library
// without saving much code. No build step, no CDN: one file, served as a static file.
"use strict";

(() => {
  const config = JSON.parse(document.getElementById("session-live").textContent);
  const page = document.querySelector(".session-page");
  const svg = document.getElementById("dag");
  const scroller = document.querySelector(".graph-scroll");
  const panel = document.getElementById("panel");
  const timeline = document.getElementById("timeline");
  const liveText = document.getElementById("live");
  const finished = new Set(config.finished);
  let retriesLeft = config.retries_left;
  let openTask = new URL(location.href).searchParams.get("task");

  const label = (status) => (status || "").replace(/_/g, " ");
  // The reader's own timezone (console.js; the timeline's rows are <time class="short">).
  const times = (root) => window.localTimes && window.localTimes(root);

  // --- the stream ------------------------------------------------------------------------------

  // The position of the last event applied: the snapshot's at first (the page rendered what
  // came before it), then each event's id. EventSource resends it by itself as Last-Event-ID
  // when it reconnects; only when it gives up (an answer other than 200) does connect() start
  // over, from the same position.
  let position = config.after;
  let source = null;
  let retryMs = 2000; // our own retries, after EventSource gave up: doubled each time, up to a minute

  function setLive(state, text) {
    liveText.dataset.state = state;
    liveText.textContent = text;
  }

  function connect() {
    const base = page.dataset.streamUrl || ""; // "": the stream is served on this origin
    const url = `${base}/api/v1/sessions/${config.session}/stream/?after=${encodeURIComponent(position)}`;
    source = new EventSource(url, { withCredentials: true });
    setLive("connecting", "connecting\u2026");
    source.onopen = () => {
      retryMs = 2000;
      setLive("live", "live");
    };
    source.onerror = () => {
      setLive("reconnecting", "reconnecting\u2026");
      if (source.readyState !== EventSource.CLOSED) return; // EventSource tries again by itself
      setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, 60000);
    };
    for (const kind of ["session", "task"]) {
      source.addEventListener(kind, (message) => {
        apply(JSON.parse(message.data));
        if (message.lastEventId) position = message.lastEventId;
      });
    }
    source.addEventListener("end", (message) => {
      source.close();
      let reason = "";
      try { reason = JSON.parse(message.data).reason || ""; } catch (_) { /* no reason given */ }
      setLive("ended", reason ? `ended: ${reason}` : "ended");
    });
  }

  function apply(event) {
    if (!addRow(event)) return; // shown already: a replay after a reconnection
    if (event.kind === "task") applyTask(event);
    else applySession(event);
  }

  // --- the timeline ----------------------------------------------------------------------------

  // The same words as console/session.py's row().
  function describe(event) {
    const before = label(event.from), after = label(event.to);
    if (event.kind === "task") {
      const details = [];
      if (event.attempt) details.push(`attempt ${event.attempt}`);
      if (event.agent) details.push(`agent ${event.agent}`);
      return { subject: `task ${event.key || ""}`, change: `${before} \u2192 ${after}`, details, error: event.error || "" };
    }
    let change, details;
    if (!before) {
      change = `created (${after})`;
      details = [];
    } else {
      change = before === after ? `note (${after})` : `${before} \u2192 ${after}`;
      details = [event.reason || ""];
    }
    if (event.actor) details.push(`by ${event.actor}`);
    return { subject: "session", change, details: details.filter(Boolean), error: "" };
  }

  function span(className, text) {
    const el = document.createElement("span");
    el.className = className;
    el.textContent = text; // text, never HTML: the event's strings stay strings
    return el;
  }

  function addRow(event) {
    if (timeline.querySelector(`li[data-id="${Number(event.id)}"]`)) return false;
    const what = describe(event);
    const li = document.createElement("li");
    li.className = `ev ev-${event.kind}`;
    li.dataset.id = String(event.id);
    if (event.task) li.dataset.task = event.task;
    const time = document.createElement("time");
    time.className = "short";
    time.setAttribute("datetime", event.at);
    time.textContent = event.at;
    li.append(time, " ", span("subject", what.subject), " ", span("change", what.change));
    if (what.details.length) li.append(" ", span("details", `(${what.details.join(", ")})`));
    if (what.error) li.append(" ", span("error-text", `error: ${what.error}`));
    timeline.prepend(li); // newest first, as the page renders them
    times(li);
    return true;
  }

  // --- tasks -----------------------------------------------------------------------------------

  function setStatusClass(el, prefix, status) {
    for (const name of [...el.classList]) if (name.startsWith(prefix)) el.classList.remove(name);
    el.classList.add(prefix + status);
  }

  function applyTask(event) {
    const node = document.getElementById(`task-${event.task}`);
    if (node) {
      setStatusClass(node, "s-", event.to);
      node.dataset.status = event.to;
      node.querySelector(".status-text").textContent = label(event.to);
      node.querySelector(".icon").textContent = config.icons[event.to] || "";
      const critical = node.classList.contains("critical") ? ", on the critical path" : "";
      node.querySelector("a").setAttribute("aria-label", `${node.dataset.key}: ${label(event.to)}${critical}`);
      for (const edge of svg.querySelectorAll(`[data-from="${event.task}"]`)) setStatusClass(edge, "f-", event.to);
      for (const edge of svg.querySelectorAll(`[data-to="${event.task}"]`)) setStatusClass(edge, "t-", event.to);
    }
    count(event.from, -1);
    count(event.to, +1);
    if (event.task === openTask) openPanel(event.task, { focus: false });
  }

  function count(status, delta) {
    const el = document.querySelector(`[data-count="${status}"]`);
    if (el) {
      el.textContent = String(Number(el.textContent) + delta);
      el.parentElement.classList.toggle("zero", el.textContent === "0");
    }
    if (finished.has(status)) {
      const done = document.querySelector("[data-finished]");
      done.textContent = String(Number(done.textContent) + delta);
      document.getElementById("progress").value = Number(done.textContent);
    }
  }

  // --- the session -----------------------------------------------------------------------------

  function applySession(event) {
    const badge = document.getElementById("session-status");
    setStatusClass(badge, "s-", event.to);
    badge.dataset.icon = config.icons[event.to] || "";
    badge.textContent = label(event.to);
    const retried = event.to === "queued" && config.retryable.includes(event.from);
    if (retried) retriesLeft -= 1;
    const allowed = (config.allowed[event.to] || []).filter((a) => a !== "retry" || retriesLeft > 0);
    document.getElementById("allowed-now").textContent = allowed.join(", ") || "none";
    for (const form of document.querySelectorAll("form[data-action]")) {
      form.hidden = !allowed.includes(form.dataset.action);
    }
    if (event.to === "running" && !document.querySelector("#session-started time")) setTime("session-started", event.at);
    if (config.settled.includes(event.to) && event.from !== event.to) setTime("session-finished", event.at);
    if (retried) document.getElementById("session-finished").textContent = "not yet";
  }

  function setTime(id, at) {
    const time = document.createElement("time");
    time.setAttribute("datetime", at);
    time.textContent = at;
    document.getElementById(id).replaceChildren(time);
    times(document.getElementById(id));
  }

  // --- the task panel --------------------------------------------------------------------------

  const placeholder = panel.innerHTML.includes("placeholder") ? panel.innerHTML : "";

  function markSelected(taskId) {
    for (const node of svg.querySelectorAll(".node.selected")) node.classList.remove("selected");
    const node = taskId && document.getElementById(`task-${taskId}`);
    if (node) node.classList.add("selected");
  }

  function setQuery(name, value) {
    const url = new URL(location.href);
    if (value) url.searchParams.set(name, value);
    else url.searchParams.delete(name);
    history.replaceState(null, "", url);
  }

  let panelRequest = 0; // only the latest request fills the panel, whichever answers last

  async function openPanel(taskId, { focus = true } = {}) {
    const request = ++panelRequest;
    const response = await fetch(config.task_url.replace(config.no_task, taskId), { credentials: "same-origin" });
    const html = response.ok ? await response.text() : "";
    if (request !== panelRequest) return;
    if (!response.ok) {
      panel.replaceChildren(span("error", `The task could not be read (HTTP ${response.status}).`));
      return;
    }
    // A fragment our own template rendered (console/task_panel.html): escaped there.
    panel.innerHTML = html;
    times(panel);
    openTask = taskId;
    markSelected(taskId);
    setQuery("task", taskId);
    if (focus) panel.focus();
  }

  function closePanel() {
    panelRequest += 1; // a request still under way no longer fills the panel
    const node = openTask && document.getElementById(`task-${openTask}`);
    panel.innerHTML = placeholder || "<p class=\"muted placeholder\">Select a task in the graph.</p>";
    openTask = null;
    markSelected(null);
    setQuery("task", null);
    if (node) node.querySelector("a").focus();
  }

  svg.addEventListener("click", (click) => {
    const link = click.target.closest("a[data-task]");
    if (!link) return;
    click.preventDefault();
    openPanel(link.dataset.task);
  });
  panel.addEventListener("click", (click) => {
    if (!click.target.closest(".close-panel")) return;
    click.preventDefault();
    closePanel();
  });

  // --- filters and zoom ------------------------------------------------------------------------

  for (const link of document.querySelectorAll(".views a[data-view]")) {
    link.addEventListener("click", (click) => {
      click.preventDefault();
      setStatusClass(scroller, "view-", link.dataset.view);
      for (const other of document.querySelectorAll(".views a")) other.removeAttribute("aria-current");
      link.setAttribute("aria-current", "true");
      setQuery("view", link.dataset.view === "all" ? null : link.dataset.view);
    });
  }

  const width = Number(svg.dataset.width), height = Number(svg.dataset.height);
  let scale = 1;
  function zoom(to) {
    scale = Math.min(3, Math.max(0.05, to));
    svg.setAttribute("width", String(Math.round(width * scale)));
    svg.setAttribute("height", String(Math.round(height * scale)));
    document.getElementById("zoom-level").textContent = `${Math.round(scale * 100)}%`;
  }
  const zoomBar = document.querySelector(".zoom");
  zoomBar.hidden = false;
  zoomBar.addEventListener("click", (click) => {
    const button = click.target.closest("button[data-zoom]");
    if (!button) return;
    const how = button.dataset.zoom;
    if (how === "in") zoom(scale * 1.25);
    else if (how === "out") zoom(scale / 1.25);
    else zoom(Math.min((scroller.clientWidth - 4) / width, (scroller.clientHeight - 4) / height, 1.5));
  });

  // --- actions ---------------------------------------------------------------------------------

  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (submit) => {
      const action = form.dataset.action;
      if (!window.confirm(`${action[0].toUpperCase()}${action.slice(1)} this session?\n\n${form.dataset.confirm}`)) {
        submit.preventDefault();
        return;
      }
      form.querySelector("input[name=confirm]").value = "yes"; // confirmed here: no confirmation page
    });
  }

  connect();
})();

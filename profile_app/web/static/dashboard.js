// The dashboard: renders each snapshot from /dashboard/events; cancel buttons DELETE /tasks/{id},
// retry buttons POST /tasks/{id}/retry.
"use strict";

(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const STATUSES = ["succeeded", "failed", "cancelled"];
  const STALE_AFTER_MS = 5000;
  const $ = (id) => document.getElementById(id);

  let source = null;
  let lastMessage = 0;
  let serverNow = Date.now(); // the time of the last snapshot, by the server's clock

  // -- the event stream ------------------------------------------------------------------

  function connect() {
    source = new EventSource("dashboard/events");
    source.onopen = () => setConnection("live", "live");
    source.onmessage = (event) => {
      lastMessage = Date.now();
      setConnection("live", "live");
      render(JSON.parse(event.data));
    };
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (e.g. 503 while the server starts): EventSource gives up, so we retry.
        setConnection("reconnecting", "reconnecting…");
        source.close();
        setTimeout(connect, 2000);
      } else {
        setConnection("reconnecting", "reconnecting…"); // EventSource retries by itself
      }
    };
  }

  function setConnection(state, text) {
    const badge = $("connection");
    badge.dataset.state = state;
    badge.textContent = text;
  }

  setInterval(() => {
    if (lastMessage && Date.now() - lastMessage > STALE_AFTER_MS && source.readyState === EventSource.OPEN) {
      setConnection("stale", "no update for " + Math.round((Date.now() - lastMessage) / 1000) + " s");
    }
  }, 1000);

  // -- rendering ---------------------------------------------------------------------------

  function render(snapshot) {
    serverNow = Date.parse(snapshot.at);
    $("updated").textContent = "updated " + new Date(serverNow).toLocaleTimeString();
    if (snapshot.error) {
      showNotice(snapshot.error, "data");
      return;
    }
    clearDataNotice();
    const finished = snapshot.history.finished;
    const total = (series) => series.reduce((sum, n) => sum + n, 0);
    $("queued-count").textContent = snapshot.queue.queued;
    $("running-count").textContent = snapshot.queue.running;
    $("finished-count").textContent = STATUSES.reduce((sum, s) => sum + total(finished[s]), 0);
    $("failed-count").textContent = total(finished.failed);
    renderDask(snapshot.dask);
    drawDepth(snapshot.history);
    drawThroughput(snapshot.history);
    syncTable("running", snapshot.running, [
      taskLink,
      (t) => t.kind,
      (t) => t.executor,
      attempt,
      progressBar,
      (t) => ago(t.started_at),
      cancelButton,
    ]);
    syncTable("queued", snapshot.queued, [
      taskLink,
      (t) => t.kind,
      (t) => String(t.priority),
      (t) => ({ text: t.waiting || "", className: "waiting" }),
      (t) => (t.waiting === "scheduled" || t.waiting === "retry backoff" ? until(t.run_at) : ""),
      attempt,
      (t) => ago(t.created_at),
      errorText,
      cancelButton,
    ]);
    syncTable("failures", snapshot.failures, [
      taskLink,
      (t) => t.kind,
      attemptsLink,
      (t) => ago(t.finished_at),
      errorText,
      retryButton,
    ]);
    syncRows("kinds", snapshot.kinds || [], (k) => k.name, [
      (k) => k.name,
      (k) => (k.concurrency === null ? "per process" : String(k.concurrency)),
      (k) => k.rate_limit || "",
      (k) => ({ text: k.paused ? "paused" : "running", className: k.paused ? "paused" : "" }),
      pauseButton,
    ]);
    syncRows("schedules", snapshot.schedules || [], (s) => s.name, [
      (s) => s.name,
      (s) => s.kind,
      (s) => s.cron || `${s.every_s} s`,
      (s) => until(s.next_run_at),
      (s) => (s.last_run_at ? ago(s.last_run_at) : "never"),
      (s) => String(s.missed_ticks),
    ]);
  }

  // Rows keyed by any field (kinds, schedules), like syncTable's rows by task id.
  function syncRows(id, items, keyOf, columns) {
    const table = $(id);
    const body = table.tBodies[0];
    const rows = new Map([...body.rows].map((row) => [row.dataset.key, row]));
    items.forEach((item, index) => {
      let row = rows.get(keyOf(item));
      rows.delete(keyOf(item));
      if (!row) {
        row = document.createElement("tr");
        row.dataset.key = keyOf(item);
        columns.forEach(() => row.insertCell());
      }
      columns.forEach((column, i) => fill(row.cells[i], column(item, row)));
      if (body.rows[index] !== row) body.insertBefore(row, body.rows[index] || null);
    });
    rows.forEach((row) => row.remove());
    table.hidden = items.length === 0;
    const empty = document.querySelector(`.empty[data-for="${id}"]`);
    if (empty) empty.hidden = items.length > 0;
  }

  function pauseButton(kind, row) {
    let button = row.querySelector("button.pause");
    if (!button) {
      button = document.createElement("button");
      button.type = "button";
      button.className = "pause";
      button.addEventListener("click", () => setPaused(kind.name, button.dataset.verb, button));
    }
    if (!button.disabled) {
      button.dataset.verb = kind.paused ? "resume" : "pause";
      button.textContent = kind.paused ? "Resume" : "Pause";
    }
    return button;
  }

  async function setPaused(name, verb, button) {
    button.disabled = true;
    try {
      const response = await fetch(`kinds/${encodeURIComponent(name)}/${verb}`, { method: "POST" });
      const body = await response.json().catch(() => ({}));
      if (response.ok) {
        showNotice(`Kind ${name} ${body.paused ? "paused" : "resumed"}.`, "info");
      } else {
        showNotice(`Could not ${verb} kind ${name}: ${body.detail || response.statusText}`, "error");
      }
    } catch (error) {
      showNotice(`Could not ${verb} kind ${name}: ${error}`, "error");
    }
    button.disabled = false;
  }

  function attemptsLink(task, row) {
    let link = row.querySelector("a.attempts");
    if (!link) {
      link = document.createElement("a");
      link.className = "attempts";
      link.href = `tasks/${encodeURIComponent(task.task_id)}/attempts`;
      link.title = "every attempt: where it ran, when, how it ended";
    }
    link.textContent = String(task.attempts);
    return link;
  }

  function until(iso) {
    if (!iso) return "";
    const seconds = Math.round((Date.parse(iso) - serverNow) / 1000);
    if (seconds <= 0) return "now";
    if (seconds < 120) return `in ${seconds} s`;
    if (seconds < 7200) return `in ${Math.round(seconds / 60)} min`;
    return `in ${Math.round(seconds / 3600)} h`;
  }

  // The Dask cluster (only with a scheduler configured): its state and a row per worker.
  function renderDask(dask) {
    $("dask").hidden = !dask;
    if (!dask) return;
    const state = $("dask-state");
    state.dataset.state = dask.status === "ok" ? "live" : "error";
    state.textContent = dask.status;
    $("dask-summary").textContent =
      `${dask.scheduler} · ${dask.workers} worker(s), ${dask.threads} thread(s) · up to ${dask.concurrency} task(s) in flight`;
    const detail = $("dask-detail");
    detail.hidden = !dask.detail;
    detail.textContent = dask.detail || "";
    const table = $("dask-workers");
    table.tBodies[0].replaceChildren(
      ...dask.per_worker.map((worker) => {
        const row = document.createElement("tr");
        const threads = worker.threads === null ? "left the cluster" : String(worker.threads);
        for (const value of [worker.address, threads, worker.running, worker.succeeded, worker.raised, worker.worker_died]) {
          row.insertCell().textContent = String(value);
        }
        return row;
      }),
    );
    table.hidden = dask.per_worker.length === 0;
  }

  // Rows are kept per task id and updated in place, so a button stays put under the pointer.
  function syncTable(id, tasks, columns) {
    const table = $(id);
    const body = table.tBodies[0];
    const rows = new Map([...body.rows].map((row) => [row.dataset.taskId, row]));
    tasks.forEach((task, index) => {
      let row = rows.get(task.task_id);
      rows.delete(task.task_id);
      if (!row) {
        row = document.createElement("tr");
        row.dataset.taskId = task.task_id;
        columns.forEach(() => row.insertCell());
      }
      columns.forEach((column, i) => fill(row.cells[i], column(task, row)));
      if (body.rows[index] !== row) body.insertBefore(row, body.rows[index] || null);
    });
    rows.forEach((row) => row.remove());
    table.hidden = tasks.length === 0;
    document.querySelector(`.empty[data-for="${id}"]`).hidden = tasks.length > 0;
  }

  // A column gives text, or a node to put in the cell once and keep (or update in place).
  function fill(cell, content) {
    if (content instanceof Node) {
      if (cell.firstChild !== content) cell.replaceChildren(content);
      return;
    }
    if (typeof content === "object" && content !== null) {
      cell.className = content.className || "";
      cell.title = content.title || "";
      content = content.text;
    }
    if (cell.textContent !== content) cell.textContent = content;
  }

  function taskLink(task, row) {
    let link = row.querySelector("a.task");
    if (!link) {
      link = document.createElement("a");
      link.className = "task";
      link.href = "tasks/" + encodeURIComponent(task.task_id);
      link.title = task.task_id;
      link.textContent = task.task_id.slice(0, 8);
    }
    return link;
  }

  function attempt(task) {
    return `${task.attempts} of ${task.max_attempts}`;
  }

  function errorText(task) {
    return { text: task.error || "", className: "error", title: task.error || "" };
  }

  function progressBar(task, row) {
    let wrap = row.querySelector(".progress");
    if (!wrap) {
      wrap = document.createElement("div");
      wrap.className = "progress";
      wrap.innerHTML = '<div class="bar"><span></span></div><span class="bar-text"></span>';
    }
    const known = typeof task.progress === "number";
    wrap.querySelector(".bar").classList.toggle("unknown", !known);
    wrap.querySelector(".bar > span").style.width = known ? `${Math.round(task.progress * 100)}%` : "";
    wrap.querySelector(".bar-text").textContent = known ? `${Math.round(task.progress * 100)} %` : "";
    return wrap;
  }

  function cancelButton(task, row) {
    return actionButton(task, row, {
      className: "cancel", label: "Cancel", busy: "Cancelling…", done: "Cancelled", rowClass: "cancelled",
      verb: "cancel", notice: "cancelled", method: "DELETE", path: "",
    });
  }

  function retryButton(task, row) {
    return actionButton(task, row, {
      className: "retry", label: "Retry", busy: "Retrying…", done: "Queued", rowClass: "retried",
      verb: "retry", notice: "queued again", method: "POST", path: "/retry",
    });
  }

  // A button that acts on its row's task once (DELETE /tasks/{id}, POST /tasks/{id}/retry).
  function actionButton(task, row, action) {
    let button = row.querySelector(`button.${action.className}`);
    if (!button) {
      button = document.createElement("button");
      button.type = "button";
      button.className = action.className;
      button.dataset.taskId = task.task_id;
      button.textContent = action.label;
      button.addEventListener("click", () => act(task.task_id, button, row, action));
    }
    return button;
  }

  async function act(taskId, button, row, action) {
    button.disabled = true;
    button.textContent = action.busy;
    try {
      const url = "tasks/" + encodeURIComponent(taskId) + action.path;
      const response = await fetch(url, { method: action.method });
      if (response.ok) {
        row.classList.add(action.rowClass);
        button.textContent = action.done;
        showNotice(`Task ${taskId} ${action.notice}.`, "info");
        return;
      }
      const body = await response.json().catch(() => ({}));
      showNotice(`Could not ${action.verb} task ${taskId}: ${body.detail || response.statusText}`, "error");
    } catch (error) {
      showNotice(`Could not ${action.verb} task ${taskId}: ${error}`, "error");
    }
    button.disabled = false;
    button.textContent = action.label;
  }

  // A notice about the data (the database is down) lasts until a good snapshot arrives;
  // one about a click goes away by itself.
  let noticeTimer = 0;

  function showNotice(text, kind) {
    const notice = $("notice");
    notice.textContent = text;
    notice.className = "notice " + kind;
    notice.dataset.kind = kind;
    notice.hidden = false;
    clearTimeout(noticeTimer);
    if (kind !== "data") noticeTimer = setTimeout(() => (notice.hidden = true), 6000);
  }

  function clearDataNotice() {
    const notice = $("notice");
    if (notice.dataset.kind === "data") notice.hidden = true;
  }

  function ago(iso) {
    if (!iso) return "";
    const seconds = Math.max(0, Math.round((serverNow - Date.parse(iso)) / 1000));
    if (seconds < 60) return `${seconds} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${seconds % 60} s ago`;
    return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min ago`;
  }

  // -- charts (SVG, drawn anew with each snapshot) ------------------------------------------

  const W = 600, H = 140, LEFT = 34, BOTTOM = 18, TOP = 8;

  function svg(name, attributes, parent) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
    if (parent) parent.appendChild(node);
    return node;
  }

  function niceMax(value) {
    if (value <= 4) return 4;
    const step = 10 ** Math.floor(Math.log10(value));
    return [1, 2, 2.5, 5, 10].map((m) => m * step).find((m) => m >= value);
  }

  function frame(chart, max, history) {
    chart.replaceChildren();
    const y = (v) => TOP + (H - TOP - BOTTOM) * (1 - v / max);
    for (const v of [0, max / 2, max]) {
      svg("line", { x1: LEFT, x2: W, y1: y(v), y2: y(v), class: "axis" }, chart);
      svg("text", { x: LEFT - 6, y: y(v) + 4, "text-anchor": "end", class: "label" }, chart).textContent =
        Number.isInteger(v) ? v : v.toFixed(1);
    }
    const minutes = (history.unfinished.length * history.bucket_s) / 60;
    svg("text", { x: LEFT, y: H - 4, class: "label" }, chart).textContent = `${minutes} min ago`;
    svg("text", { x: W, y: H - 4, "text-anchor": "end", class: "label" }, chart).textContent = "now";
    return y;
  }

  function bucketTitle(history, i) {
    const start = new Date(Date.parse(history.start) + i * history.bucket_s * 1000);
    const end = new Date(start.getTime() + history.bucket_s * 1000);
    return `${start.toLocaleTimeString()}–${end.toLocaleTimeString()}`;
  }

  function drawDepth(history) {
    const chart = $("depth-chart");
    const values = history.unfinished;
    const y = frame(chart, niceMax(Math.max(...values)), history);
    const step = (W - LEFT) / values.length;
    const points = values.map((v, i) => [LEFT + step * (i + 1), y(v)]);
    points.unshift([LEFT, points[0][1]]);
    const line = points.map(([px, py]) => `${px.toFixed(1)},${py.toFixed(1)}`).join(" ");
    svg("polygon", { points: `${LEFT},${y(0)} ${line} ${W},${y(0)}`, class: "depth-area" }, chart);
    svg("polyline", { points: line, class: "depth-line" }, chart);
    values.forEach((v, i) => {
      const hit = svg("rect", { x: LEFT + step * i, y: TOP, width: step, height: H - TOP - BOTTOM, fill: "transparent" }, chart);
      svg("title", {}, hit).textContent = `${bucketTitle(history, i)}: ${v} queued or running at the end`;
    });
  }

  function drawThroughput(history) {
    const chart = $("throughput-chart");
    const count = history.unfinished.length;
    const totals = Array.from({ length: count }, (_, i) => STATUSES.reduce((sum, s) => sum + history.finished[s][i], 0));
    const max = niceMax(Math.max(...totals));
    const y = frame(chart, max, history);
    const step = (W - LEFT) / count;
    for (let i = 0; i < count; i++) {
      let base = 0;
      const group = svg("g", {}, chart);
      for (const status of STATUSES) {
        const n = history.finished[status][i];
        if (!n) continue;
        svg("rect", { x: LEFT + step * i + 1, y: y(base + n), width: Math.max(1, step - 2), height: y(base) - y(base + n), class: status }, group);
        base += n;
      }
      const parts = STATUSES.filter((s) => history.finished[s][i]).map((s) => `${history.finished[s][i]} ${s}`);
      svg("title", {}, group).textContent = `${bucketTitle(history, i)}: ${parts.join(", ") || "none finished"}`;
    }
  }

  // -- the admin token (PROFILE_APP_ADMIN_TOKEN) ------------------------------------------
  // Asked once: the server keeps it in an HttpOnly, SameSite=Strict cookie, which the stream
  // and the buttons then send by themselves.

  async function start() {
    for (;;) {
      const response = await fetch("dashboard/session", { credentials: "same-origin" });
      if (response.status !== 401) break;
      const token = window.prompt("Admin token (PROFILE_APP_ADMIN_TOKEN):");
      if (token === null) {
        setConnection("reconnecting", "admin token needed: reload to enter it");
        return;
      }
      await fetch("dashboard/login", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ token }),
      });
    }
    connect();
  }

  start();
})();

// The guillotina_amqp dashboard: REST for pages, workers and queues; server-sent events for task changes.
"use strict";

const base = location.pathname.replace(/\/@amqp-dashboard\/?$/, "");
const tokenKey = "amqp-dashboard-token:" + base;
const rows = new Map(); // task id -> {row, task, received}
let cursor = null;
let stream = null;

const $ = (selector) => document.querySelector(selector);

async function api(method, path, body) {
  const response = await fetch(base + "/" + path, {
    method,
    headers: { Authorization: "Bearer " + sessionStorage.getItem(tokenKey), "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) { logout(); throw new Error("logged out"); }
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new Error((data && data.reason) || "HTTP " + response.status);
  return data;
}

// -- log in ----------------------------------------------------------------------
$("#login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const response = await fetch(base + "/@login", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ username: form.get("username"), password: form.get("password") }),
  });
  const data = await response.json().catch(() => null);
  if (!response.ok || !data || !data.token) { $("#login-error").textContent = "Wrong user or password."; return; }
  sessionStorage.setItem(tokenKey, data.token);
  start();
});

function logout() {
  sessionStorage.removeItem(tokenKey);
  if (stream) stream.abort();
  $("#app").hidden = true;
  $("#login").hidden = false;
}
$("#logout").addEventListener("click", logout);

// -- tasks -----------------------------------------------------------------------------
const seconds = (value) =>
  value === null || value === undefined ? "–" : value < 60 ? value.toFixed(1) + "s" : value < 3600 ? (value / 60).toFixed(1) + "m" : (value / 3600).toFixed(1) + "h";

function matches(task) {
  const status = $("#status-filter").value;
  const text = $("#function-filter").value.trim();
  return (!status || task.status === status) && (!text || (task.function || "").includes(text));
}

function cell(row, name, text) {
  const td = row.querySelector("td." + name);
  if (td.textContent !== text) td.textContent = text;
}

function render(entry) {
  const { row, task, received } = entry;
  const elapsed = (Date.now() - received) / 1000;
  const live = task.status === "running" || task.status === "scheduled";
  row.dataset.status = task.status;
  const badge = row.querySelector(".status");
  if (badge.dataset.status !== task.status) {
    badge.dataset.status = task.status;
    badge.innerHTML = `<span class="badge ${escape(task.status)}">${escape(task.status)}</span>`;
  }
  cell(row, "function", task.function || "–");
  cell(row, "age", seconds(task.age === null ? null : task.age + elapsed));
  const running = task.status === "running" && task.duration !== null;
  cell(row, "duration", seconds(running ? task.duration + elapsed : task.duration));
  cell(row, "retries", String(task.retries));
  cell(row, "progress", task.status === "errored" && task.error ? task.error : task.progress || "");
  const actions = row.querySelector(".actions");
  const action = live ? "cancel" : task.status === "errored" || task.status === "canceled" ? "retry" : "";
  if (actions.dataset.action !== action) {
    actions.dataset.action = action;
    actions.innerHTML = action ? `<button type="button" class="${action}">${action === "cancel" ? "Cancel" : "Retry"}</button>` : "";
  }
  row.hidden = !matches(task);
}

// rows stay newest first: a task pushed live goes above the first one created before it
function insert(row, created) {
  const body = $("#tasks tbody");
  row.dataset.created = created || 0;
  const after = [...body.rows].find((other) => Number(other.dataset.created) < (created || 0));
  body.insertBefore(row, after || null);
}

function show(task) {
  let entry = rows.get(task.task_id);
  if (!entry) {
    const row = document.createElement("tr");
    row.dataset.taskId = task.task_id;
    row.innerHTML = '<td class="status"></td><td class="function"></td><td class="age"></td><td class="duration"></td>' +
      '<td class="retries"></td><td class="progress"></td><td class="id"></td><td class="actions"></td>';
    row.querySelector(".id").textContent = task.task_id.slice(-12);
    row.querySelector(".id").title = task.task_id;
    insert(row, task.created);
    entry = { row };
    rows.set(task.task_id, entry);
  }
  entry.task = task;
  entry.received = Date.now();
  render(entry);
  $("#no-tasks").hidden = [...rows.values()].some((e) => !e.row.hidden);
}

async function loadTasks(reset) {
  if (reset) { rows.clear(); $("#tasks tbody").innerHTML = ""; cursor = null; }
  const query = new URLSearchParams({ limit: "50" });
  if (cursor) query.set("cursor", cursor);
  if ($("#status-filter").value) query.set("status", $("#status-filter").value);
  if ($("#function-filter").value.trim()) query.set("function", $("#function-filter").value.trim());
  const page = await api("GET", "@amqp-tasks?" + query);
  page.items.forEach(show);
  cursor = page.cursor;
  $("#more").hidden = !cursor;
  $("#no-tasks").hidden = [...rows.values()].some((e) => !e.row.hidden);
}

$("#more").addEventListener("click", () => loadTasks(false));
$("#status-filter").addEventListener("change", () => loadTasks(true));
let typing = null;
$("#function-filter").addEventListener("input", () => {
  rows.forEach(render); // at once on what is shown, then from the server
  clearTimeout(typing);
  typing = setTimeout(() => loadTasks(true).catch((error) => { $("#message").textContent = error.message; }), 300);
});

$("#tasks").addEventListener("click", async (event) => {
  const button = event.target.closest("button");
  if (!button) return;
  const id = button.closest("tr").dataset.taskId;
  button.disabled = true;
  try {
    if (button.classList.contains("cancel")) await api("DELETE", "@amqp-tasks/" + encodeURIComponent(id));
    else await api("POST", "@amqp-tasks/" + encodeURIComponent(id) + "/retry");
    $("#message").textContent = "";
  } catch (error) {
    $("#message").textContent = error.message;
    button.disabled = false;
  }
});

// -- live changes: server-sent events read through fetch (it can send the token) -----------
async function listen() {
  while (sessionStorage.getItem(tokenKey)) {
    stream = new AbortController();
    try {
      const response = await fetch(base + "/@amqp-events", {
        headers: { Authorization: "Bearer " + sessionStorage.getItem(tokenKey), Accept: "text/event-stream" },
        signal: stream.signal,
      });
      if (!response.ok) throw new Error("HTTP " + response.status);
      $("#live").className = "on";
      $("#live").textContent = "live";
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
          if (data) JSON.parse(data).forEach(show);
        }
      }
    } catch (error) {
      if (stream.signal.aborted) return;
    }
    $("#live").className = "off";
    $("#live").textContent = "reconnecting";
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

// -- workers, queues, chart ------------------------------------------------------------
function fill(table, items, columns) {
  const body = $(table + " tbody");
  body.innerHTML = "";
  for (const item of items) {
    const row = body.insertRow();
    columns.forEach((column) => { row.insertCell().innerHTML = column(item); });
    if (item.worker_id) row.dataset.workerId = item.worker_id;
  }
}

const escape = (text) => String(text).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);

async function loadWorkers() {
  const workers = await api("GET", "@amqp-workers");
  fill("#workers", workers, [
    (w) => `<code title="${escape(w.worker_id)}">${escape(w.worker_id.slice(0, 8))}</code>`,
    (w) => `${escape(w.host)}:${escape(w.pid)}`,
    (w) => `<span class="load"><i style="width:${Math.round(100 * w.load)}%"></i></span>${w.running_total}/${w.max_running}`,
    (w) => w.running.map((t) => escape(t.function)).join(", ") || "–",
    (w) => escape(w.total_run),
    (w) => escape(w.total_errored),
  ]);
  $("#no-workers").hidden = workers.length > 0;
}

function chart(throughput) {
  const statuses = ["finished", "errored", "canceled"];
  const buckets = throughput.finished.length;
  const totals = [...Array(buckets).keys()].map((i) => statuses.reduce((sum, s) => sum + throughput[s][i], 0));
  const top = Math.max(1, ...totals);
  const width = 240 / buckets;
  let svg = "";
  for (let i = 0; i < buckets; i++) {
    let y = 80;
    for (const status of statuses) {
      const height = (throughput[status][i] / top) * 76;
      y -= height;
      if (height > 0) svg += `<rect class="${status}" x="${i * width + 1}" y="${y}" width="${width - 2}" height="${height}"><title>${throughput[status][i]} ${status}</title></rect>`;
    }
  }
  $("#chart").innerHTML = svg;
}

async function loadQueues() {
  const found = await api("GET", "@amqp-queues");
  fill("#queues", found.queues, [(q) => escape(q.queue), (q) => escape(q.messages ?? "gone"), (q) => escape(q.consumers ?? "–")]);
  chart(found.throughput);
}

function every(ms, load) {
  const run = () => load().catch((error) => { $("#message").textContent = error.message; });
  run();
  return setInterval(run, ms);
}

let timers = [];
function start() {
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#container-name").textContent = base.split("/").pop();
  timers.forEach(clearInterval);
  loadTasks(true).catch((error) => { $("#message").textContent = error.message; });
  listen();
  timers = [every(2000, loadWorkers), every(5000, loadQueues), setInterval(() => rows.forEach(render), 1000)];
}

if (sessionStorage.getItem(tokenKey)) start();
else $("#login").hidden = false;

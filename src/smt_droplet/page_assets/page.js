// The SMT droplet's operator page: vanilla JavaScript, no framework, no build step.
// The secret lives in sessionStorage (this tab only) and travels in a header, never in a URL.
"use strict";

const API = "/api/v1";
const KEY = "smt-droplet-secret";
const $ = (id) => document.getElementById(id);
let limits = { maxBytes: 0, csvPattern: "\\.csv(\\.\\d+)?$" };

function secretHeader(secret) {
  return secret.startsWith("v1.") ? { "x-smt-upload-ticket": secret } : { "x-smt-upload-token": secret };
}

function authHeaders() {
  const secret = sessionStorage.getItem(KEY);
  return secret ? secretHeader(secret) : {};
}

async function api(path, options = {}) {
  const response = await fetch(API + path, {
    ...options,
    headers: { ...authHeaders(), ...(options.headers || {}) },
    cache: "no-store",
  });
  if (response.status === 401) {
    signOut("Your session is no longer accepted: sign in again.");
    throw new Error("unauthorized");
  }
  return response;
}

function text(tag, content, cls) {
  const el = document.createElement(tag);
  el.textContent = content == null ? "" : String(content);
  if (cls) el.className = cls;
  return el;
}

function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function when(iso) {
  return iso ? iso.replace("T", " ").replace("Z", " UTC") : "–";
}

// -- sign-in -------------------------------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  const secret = $("secret").value.trim();
  $("sign-in-error").textContent = "";
  if (!secret) return;
  let response;
  try {
    response = await fetch(API + "/session", { headers: secretHeader(secret), cache: "no-store" });
  } catch (err) {
    $("sign-in-error").textContent = "The droplet cannot be reached.";
    return;
  }
  if (response.status === 401) {
    $("sign-in-error").textContent = "Wrong token or ticket: the droplet refused it.";
    $("secret").select();
    return;
  }
  if (!response.ok) {
    $("sign-in-error").textContent = `The droplet answered ${response.status}.`;
    return;
  }
  sessionStorage.setItem(KEY, secret);
  $("secret").value = "";
  await start(await response.json());
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message || "";
  $("secret").focus();
}

async function start(session) {
  limits = session;
  $("sign-in").hidden = true;
  $("app").hidden = false;
  $("sign-out").hidden = false;
  await refresh();
}

async function refresh() {
  await Promise.all([loadOverview(), loadFiles(), loadCoverage()]);
}

// -- health at a glance ---------------------------------------------------------------------

async function loadOverview() {
  const o = await (await api("/overview")).json();
  const verdict = $("health-verdict");
  const last = o.lastPass;
  const cause = last && last.fatal ? ` (${last.fatal})` : "";
  const waiting = last && last.needs_operator ? last.needs_operator : 0;
  if (!o.healthy) {
    verdict.textContent = `Needs attention: ${o.reason}${cause}`;
    verdict.className = "error";
  } else if (waiting) {
    verdict.textContent = `Running, but ${waiting} file(s) wait for a person (see Files)`;
    verdict.className = "warn";
  } else {
    verdict.textContent = "Healthy";
    verdict.className = "ok";
  }
  const facts = [
    ["Last pass", last ? `${when(last.finished)}, ${last.duration_seconds} s, exit ${last.exit_code} (${last.trigger})` : "none yet"],
    ["Its files", last ? `${last.posted} posted, ${last.notLanded} not landed whole, ${last.failed} to retry, ${last.waitingForApp} waiting for the app` : "–"],
    ["Last success", when(o.lastSuccess)],
    ["Next timer run", when(o.nextTimerRun)],
    ["Queue depth", o.queueDepth],
    ["Free disk", bytes(o.freeBytes)],
    ["Upload cap", bytes(o.maxBytes)],
  ];
  const dl = $("health-facts");
  dl.replaceChildren();
  for (const [name, value] of facts) {
    dl.append(text("dt", name), text("dd", value));
  }
}

async function loadCoverage() {
  const data = await (await api("/coverage")).json();
  const box = $("coverage");
  for (const img of box.querySelectorAll("img")) URL.revokeObjectURL(img.src);
  box.replaceChildren();
  if (!data.esiids.length) {
    box.append(text("p", "No posted data yet."));
    return;
  }
  const idle = data.esiids.filter((c) => c.complete + c.gaps === 0).map((c) => c.esiid);
  for (const c of data.esiids.filter((c) => c.complete + c.gaps > 0)) {
    const figure = document.createElement("figure");
    figure.dataset.esiid = c.esiid;
    const svg = await (await api(`/coverage/${c.esiid}.svg`)).blob();
    const img = document.createElement("img");
    img.src = URL.createObjectURL(svg);
    const due = c.due ? ` (${c.due} not due yet)` : "";
    img.alt = `ESIID ${c.esiid}: ${c.complete} complete, ${c.gaps} with gaps, ${c.missing} missing days${due}`;
    figure.append(img, text("figcaption", `${c.esiid}: ${c.complete} complete, ${c.gaps} with gaps, ${c.missing} missing${due}`));
    box.append(figure);
  }
  if (idle.length) {
    box.append(text("p", `No data in the last ${data.days} days for ${idle.length} ESIID(s): ${idle.join(", ")}`, "idle"));
  }
}

// -- files ------------------------------------------------------------------------------------

async function loadFiles(event) {
  if (event) event.preventDefault();
  const query = new URLSearchParams();
  if ($("filter-outcome").value) query.set("outcome", $("filter-outcome").value);
  if ($("filter-esiid").value.trim()) query.set("esiid", $("filter-esiid").value.trim());
  if ($("filter-landing").value) query.set("landing", $("filter-landing").value);
  const data = await (await api(`/files?${query}`)).json();
  $("files-count").textContent = `${data.matching} file(s); ${data.needs_operator} need a person`;
  const body = $("files-table").tBodies[0];
  body.replaceChildren();
  for (const row of data.files) body.append(fileRow(row));
}

function fileRow(row) {
  const tr = document.createElement("tr");
  tr.dataset.sha256 = row.sha256;
  tr.dataset.state = row.state;
  const s = row.summary || {};
  const dates = s.first_day ? `${s.first_day} – ${s.last_day}` : "–";
  const landing = row.landing || null;
  const intervals = landing ? landedText(landing) : s.intervals_expected ? `${s.intervals_present} / ${s.intervals_expected}` : "–";
  let reason = row.reason || (landing && NOT_LANDED.includes(landing.verdict) ? landing.detail : "");
  if (row.state === "failed-will-retry") {
    const tries = row.attempts ? `${row.attempts} attempts; ` : "";
    reason += ` (${tries}next try ${row.next_try ? when(row.next_try) : "with the next pass"})`;
  }
  const cells = [
    text("td", when(row.arrived), "when"),
    pathCell(row.path),
    text("td", row.source),
    text("td", row.state, `state ${row.needs_operator ? "needs" : ""}`),
    text("td", row.esiid || "–", "esiid"),
    text("td", dates, "dates"),
    landedCell(intervals, landing),
    text("td", row.app_id || "–"),
    reasonCell(reason),
  ];
  tr.append(...cells);
  const cell = document.createElement("td");
  cell.className = "actions";
  if (row.state !== "posted" && row.state !== "ignored") {
    cell.append(actionButton("Ignore", row, "ignore"));
  }
  if (row.state === "no-esiid") {
    cell.append(actionButton("Post with ESIID", row, "post"));
  }
  if (row.state === "posted" && landing && NOT_LANDED.includes(landing.verdict)) {
    cell.append(actionButton("Send again", row, "resend"));
  }
  if (row.state !== "pending") {
    cell.append(actionButton("Forget", row, "forget"));
  }
  tr.append(cell);
  const labels = [...$("files-table").tHead.rows[0].cells].map((th) => th.textContent);
  [...tr.cells].forEach((td, i) => { td.dataset.label = labels[i] || ""; });
  return tr;
}

// A file name that wraps at its separators (_ - .), not in the middle of a word.
function pathCell(path) {
  const td = document.createElement("td");
  td.className = "path";
  for (const piece of String(path).split(/(?<=[_\-.\/])/)) {
    td.append(document.createTextNode(piece), document.createElement("wbr"));
  }
  return td;
}

// A long reason (some spell out commands) is folded: its first words, the rest on demand.
const REASON_FOLD = 90;
function reasonCell(reason) {
  const td = document.createElement("td");
  td.className = "reason";
  if (reason.length <= REASON_FOLD) {
    td.textContent = reason;
    return td;
  }
  const details = document.createElement("details");
  const cut = reason.lastIndexOf(" ", REASON_FOLD);
  details.append(text("summary", `${reason.slice(0, cut > 40 ? cut : REASON_FOLD)} …`), text("p", reason));
  td.append(details);
  return td;
}

const NOT_LANDED = ["short", "none", "mismatch"];

// "app 288 / file 292": what the app says it stored beside what the file holds.
function landedText(landing) {
  const file = landing.file && landing.file.intervals != null ? landing.file.intervals : "?";
  if (!landing.app) return `file ${file} (app: no count)`;
  return `app ${landing.app.intervals} / file ${file}`;
}

function landedCell(content, landing) {
  const td = text("td", content, landing ? `landing landing-${landing.verdict}` : "");
  if (landing) {
    td.dataset.verdict = landing.verdict;
    td.title = `${landing.verdict}: ${landing.detail || ""}`;
  }
  return td;
}

function actionButton(label, row, action) {
  const button = text("button", label);
  button.type = "button";
  button.dataset.action = action;
  button.addEventListener("click", () => confirmAction(row, action));
  return button;
}

const ACTIONS = {
  forget: { text: (r) => `Forget ${r.path}? The next pass posts it again.`, field: null },
  ignore: { text: (r) => `Ignore ${r.path} for good? It is never posted.`, field: "Reason (shown in status)" },
  post: { text: (r) => `Post ${r.path} with this ESIID?`, field: "ESIID (17 digits)" },
  resend: { text: (r) => `Send ${r.path} to the app again? ${(r.landing || {}).detail || ""}`, field: null },
};

function confirmAction(row, action) {
  const spec = ACTIONS[action];
  const dialog = $("confirm");
  $("confirm-text").textContent = spec.text(row);
  $("confirm-field").hidden = !spec.field;
  $("confirm-label").textContent = spec.field || "";
  $("confirm-input").value = "";
  $("confirm-error").textContent = "";
  dialog.dataset.action = action;
  dialog.dataset.sha256 = row.sha256;
  dialog.showModal();
  (spec.field ? $("confirm-input") : $("confirm-ok")).focus();
}

async function confirmed(event) {
  event.preventDefault();
  const dialog = $("confirm");
  const action = dialog.dataset.action;
  const value = $("confirm-input").value.trim();
  const body = action === "ignore" ? { reason: value } : action === "post" ? { esiid: value } : {};
  $("confirm-ok").disabled = true;  // one decision per confirmation
  let response;
  try {
    response = await api(`/files/${dialog.dataset.sha256}/${action}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
  } finally {
    $("confirm-ok").disabled = false;
  }
  if (!response.ok) {
    const why = await response.json();
    $("confirm-error").textContent = why.message || why.error || `refused (${response.status})`;
    return;
  }
  dialog.close();
  $("action-status").textContent = `${action}: queued for the next pass`;
  await waitServed((await response.json()).id);
  $("action-status").textContent = `${action}: done by the pass`;
  await refresh();
}

// Poll a queued request until an ingest pass has served it.
async function waitServed(id) {
  const deadline = Date.now() + 5 * 60 * 1000;
  while (Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 1000));
    const response = await api(`/requests/${id}`);
    if (response.ok && (await response.json()).served) return;
  }
}

// -- upload -----------------------------------------------------------------------------------

function refuse(file) {
  if (!new RegExp(limits.csvPattern, "i").test(file.name)) return "not a CSV file (.csv or .csv.<n>)";
  if (limits.maxBytes && file.size > limits.maxBytes) return `larger than the cap of ${bytes(limits.maxBytes)}`;
  return null;
}

function uploadFiles(files) {
  for (const file of files) {
    const item = document.createElement("li");
    item.className = "upload";
    const name = text("span", file.name, "name");
    const bar = document.createElement("progress");
    bar.max = file.size || 1;
    bar.value = 0;
    bar.setAttribute("aria-label", `upload of ${file.name}`);
    const note = text("span", "", "note");
    item.append(name, bar, note);
    $("uploads").prepend(item);
    const why = refuse(file);
    if (why) {
      item.dataset.state = "refused";
      bar.remove();
      note.textContent = `refused here: ${why}`;
      note.className = "note error";
      continue;
    }
    send(file, item, bar, note);
  }
}

function send(file, item, bar, note) {
  const form = new FormData();
  form.append("file", file, file.name);
  const xhr = new XMLHttpRequest();
  const started = performance.now();
  xhr.open("POST", "/upload");
  for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
  item.dataset.state = "sending";
  xhr.upload.addEventListener("progress", (e) => {
    bar.max = e.total || file.size;
    bar.value = e.loaded;
    const seconds = (performance.now() - started) / 1000;
    note.textContent = `${bytes(e.loaded)} of ${bytes(e.total)}, ${bytes(e.loaded / Math.max(seconds, 0.001))}/s`;
  });
  xhr.addEventListener("error", () => { item.dataset.state = "error"; note.textContent = "the connection failed"; });
  xhr.addEventListener("load", () => {
    let answer = {};
    try { answer = JSON.parse(xhr.responseText); } catch (err) { /* not JSON */ }
    if (xhr.status === 202 || xhr.status === 200) {
      bar.value = bar.max;
      if (answer.duplicate) {
        item.dataset.state = "duplicate";
        note.textContent = answer.filename ? `already stored as ${answer.filename}` : "already posted earlier";
        return;
      }
      item.dataset.state = answer.queued ? "queued" : "stored";
      note.textContent = answer.queued ? `stored as ${answer.filename}, queued` : `stored as ${answer.filename}`;
      follow(answer.sha256, answer.filename, item, note);
    } else {
      item.dataset.state = "refused";
      note.textContent = `refused by the droplet (${xhr.status}): ${answer.message || answer.error || xhr.statusText}`;
      note.className = "note error";
    }
  });
  xhr.send(form);
}

async function follow(sha256, filename, item, note) {
  const deadline = Date.now() + 10 * 60 * 1000;
  while (Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 1000));
    const response = await api(`/files/${sha256}?path=${encodeURIComponent(filename)}`);
    if (!response.ok) continue;
    const row = await response.json();
    if (row.state === "pending" || row.state === "failed-will-retry") {
      note.textContent = `stored as ${filename}, ${row.state === "pending" ? "waiting for the pass" : "will be retried"}`;
      continue;
    }
    item.dataset.state = row.state;
    if (row.state === "posted") {
      note.textContent = `posted: id ${row.app_id || "–"}, ESIID ${row.esiid || "–"}, meter ${row.meter || "–"}`;
    } else {
      note.textContent = `${row.state}: ${row.reason}`;
      note.className = "note error";
    }
    await refresh();
    item.dataset.shown = "1";  // the table and the charts show it now
    return;
  }
}

// -- wiring -----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", async () => {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut());
  // Refreshing the files refreshes the health box too (the pass that changed them wrote it).
  $("filter").addEventListener("submit", (event) => { loadFiles(event); loadOverview(); });
  $("confirm-form").addEventListener("submit", confirmed);  // Confirm, or Enter in the field
  $("confirm-cancel").addEventListener("click", () => $("confirm").close());  // or Escape
  const zone = $("drop-zone");
  const input = $("file-input");
  zone.addEventListener("click", (e) => { if (e.target !== input) input.click(); });
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  input.addEventListener("change", () => { uploadFiles(input.files); input.value = ""; });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    uploadFiles(e.dataTransfer.files);
  });
  if (sessionStorage.getItem(KEY)) {
    const response = await fetch(API + "/session", { headers: authHeaders(), cache: "no-store" });
    if (response.ok) return start(await response.json());
    signOut("Sign in again.");
  } else {
    $("secret").focus();
  }
});

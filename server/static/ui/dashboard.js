// The job table at /ui/: one page of GET /v1/jobs (the filters and the page are in the URL,
// so every view has a JSON twin), then the feed from that list's `cursor`, so the rows move
// live with nothing missed or seen twice between the two. Pages of 50: a server with 10,000
// jobs costs the page no more than one with 50.

import { watchFeed } from "/client/jobfeed.js";
import { formatRate } from "/client/progress.js";
import {
  api,
  el,
  formatSpan,
  getTicket,
  setUpTokenForm,
  showProblem,
  statusBadge,
  tsMillis,
} from "/ui/common.js";

const PAGE_SIZE = 50;
const STATUSES = ["queued", "running", "completed", "failed", "cancelled"];
const FINISHED = new Set(["completed", "failed", "cancelled"]);
const COUNTS_EVERY_MS = 2000; // at most one /ui/counts.json per this while jobs change

const view = {
  rows: new Map(), // job_id -> {snapshot, tr}
  watch: null,
  countsTimer: null,
  nextCursor: null,
  generation: 0,
};

function params() {
  return new URLSearchParams(location.search);
}

function filters() {
  const p = params();
  return {
    status: p.get("status") || "",
    kind: p.get("kind") || "",
    prefix: p.get("prefix") || "",
    quiet: Number(p.get("quiet")) || 30,
  };
}

function listQuery(extra = {}) {
  const { status, kind, prefix } = filters();
  const q = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (status) q.set("status", status);
  if (kind) q.set("kind", kind);
  if (prefix) q.set("prefix", prefix);
  for (const [name, value] of Object.entries(extra)) if (value) q.set(name, value);
  return q;
}

async function load() {
  view.watch?.stop();
  view.watch = null;
  // A load started later (a filter changed while this list was on its way) wins: an older
  // answer arriving after it must not draw its rows or start its feed.
  const generation = ++view.generation;
  const cursor = params().get("cursor") || "";
  const query = listQuery({ cursor });
  document.getElementById("json-twin").href = `/v1/jobs?${query}`;
  let body;
  try {
    body = await api(`/v1/jobs?${query}`);
    if (generation !== view.generation) return;
    showProblem("");
  } catch (error) {
    if (generation === view.generation) showProblem(`Cannot list jobs: ${error.message}`);
    return;
  }
  renderTable(body.jobs);
  view.nextCursor = body.next_cursor;
  renderPager(cursor);
  refreshCounts();
  const { kind, prefix } = filters();
  view.watch = watchFeed("/v1/feed", {
    after: body.cursor,
    filters: { kind: kind || undefined, prefix: prefix || undefined },
    jobs: body.jobs,
    getTicket,
    onSnapshot: (snapshot, event) => jobChanged(snapshot, event, !cursor),
    onEvent: () => scheduleCounts(),
    onStatus: (state) => {
      const live = document.getElementById("live");
      live.textContent = state === "live" ? "live" : state === "waiting" ? "reconnecting" : state;
      live.dataset.state = state;
    },
    onError: (error) => showProblem(`The live feed stopped: ${error.message}`),
  });
}

function renderTable(jobs) {
  const tbody = document.querySelector("#jobs tbody");
  view.rows.clear();
  const rows = jobs.map((snapshot) => {
    const tr = el("tr");
    view.rows.set(snapshot.job_id, { snapshot, tr });
    fillRow(tr, snapshot);
    return tr;
  });
  tbody.replaceChildren(...rows);
  document.getElementById("empty").hidden = jobs.length > 0;
}

// A feed event changed a job: its row if shown; a new job at the top of the first page.
function jobChanged(snapshot, event, firstPage) {
  const shown = view.rows.get(snapshot.job_id);
  if (shown) {
    shown.snapshot = snapshot;
    fillRow(shown.tr, snapshot);
    shown.tr.classList.remove("changed");
    void shown.tr.offsetWidth; // restart the highlight animation
    shown.tr.classList.add("changed");
    return;
  }
  const { status } = filters();
  if (!firstPage || event?.type !== "created" || (status && status !== "queued")) return;
  const tr = el("tr", { class: "changed" });
  view.rows.set(snapshot.job_id, { snapshot, tr });
  fillRow(tr, snapshot);
  document.querySelector("#jobs tbody").prepend(tr);
  document.getElementById("empty").hidden = true;
}

function fillRow(tr, s) {
  const now = Date.now();
  const progress = s.progress ?? null;
  const bar = el("progress", {
    max: "100",
    "aria-label": `Progress of ${s.job_id}`,
  });
  // No value: an indeterminate bar, only for a running job that reports no percent.
  if (progress !== null) bar.value = progress;
  else if (s.status !== "running") bar.value = 0;
  const detail = [s.phase, s.message].filter(Boolean).join(" · ");
  tr.dataset.job = s.job_id;
  tr.dataset.status = s.status;
  tr.replaceChildren(
    el("td", { class: "job-id" }, el("a", { href: `/ui/jobs/${encodeURIComponent(s.job_id)}`, text: s.job_id })),
    el("td", { class: "kind", text: s.kind ?? "" }),
    el("td", {}, statusBadge(s.status)),
    el(
      "td",
      { class: "progress-col" },
      bar,
      el("span", { class: "pct", text: progress === null ? "" : `${Math.floor(progress)}%` }),
    ),
    el("td", { class: "detail", title: detail, text: detail }),
    el("td", { class: "age", "data-since": s.created_at }),
    el("td", { class: "updated", "data-since": s.updated_at }),
    etaCell(s),
  );
  tickRow(tr, s, now);
}

// The cells that move with the clock: ages, ETA, and the quiet highlight.
function tickRow(tr, s, now) {
  const quietAfter = filters().quiet * 1000;
  const created = tsMillis(s.created_at);
  const updated = tsMillis(s.updated_at);
  const end = s.finished_at ? tsMillis(s.finished_at) : now;
  tr.querySelector(".age").textContent = formatSpan(end - created);
  const idle = now - updated;
  const quiet = s.status === "running" && idle > quietAfter; // queued is waiting, not quiet
  tr.classList.toggle("quiet", quiet);
  tr.querySelector(".updated").textContent = quiet ? `quiet ${formatSpan(idle)}` : `${formatSpan(idle)} ago`;
}

// The server's estimate as of the job's last event (docs/protocol.md, "Rate and ETA"), shown
// as it is: not counted down with this browser's clock, which need not agree with the
// server's ("Updated" says how old it is). The rate, in units of `current`, below it.
function etaCell(s) {
  const running = s.status === "running";
  const left = running && s.eta_seconds != null ? `~${formatSpan(Math.ceil(s.eta_seconds) * 1000)}` : "";
  const rate = running && s.rate != null ? formatRate(s.rate) : "";
  return el("td", { class: "eta" }, left, rate ? el("small", { class: "rate", text: rate }) : null);
}

function renderPager(cursor) {
  const older = document.getElementById("older");
  const newer = document.getElementById("newer");
  older.disabled = !view.nextCursor;
  newer.disabled = !cursor;
  document.getElementById("page-info").textContent = cursor ? "older jobs" : "newest jobs";
}

function go(changes, replace = false) {
  const p = params();
  for (const [name, value] of Object.entries(changes)) {
    if (value === "" || value === null || value === undefined) p.delete(name);
    else p.set(name, value);
  }
  const url = `${location.pathname}${p.size ? `?${p}` : ""}`;
  if (replace) {
    history.replaceState(history.state, "", url);
    return;
  }
  history.pushState({ cursors: [] }, "", url); // a new filter starts at the newest page
  load();
}

// The cursors of the pages before this one, so "Newer" goes back one page.
function pageStack() {
  return history.state?.cursors ?? [];
}

function scheduleCounts() {
  if (view.countsTimer) return;
  view.countsTimer = setTimeout(() => {
    view.countsTimer = null;
    refreshCounts();
  }, COUNTS_EVERY_MS);
}

async function refreshCounts() {
  const { kind, prefix, status } = filters();
  const q = new URLSearchParams();
  if (kind) q.set("kind", kind);
  if (prefix) q.set("prefix", prefix);
  const asked = (view.countsAsked = (view.countsAsked ?? 0) + 1);
  let counts;
  try {
    counts = (await api(`/ui/counts.json?${q}`)).counts;
  } catch {
    return; // the table says what is wrong
  }
  if (asked !== view.countsAsked) return; // a later question's answer is (or will be) shown
  const total = STATUSES.reduce((sum, name) => sum + (counts[name] ?? 0), 0);
  const chip = (name, label, count) =>
    el(
      "button",
      {
        type: "button",
        class: `chip status-${name || "all"}`,
        "aria-pressed": String(status === name),
        "data-status": name || "all",
        onclick: () => go({ status: name, cursor: "" }),
      },
      el("span", { class: "chip-label", text: label }),
      el("span", { class: "chip-count", text: count.toLocaleString("en") }),
    );
  document
    .getElementById("counts")
    .replaceChildren(chip("", "all", total), ...STATUSES.map((name) => chip(name, name, counts[name] ?? 0)));
}

function setUpFilters() {
  const form = document.getElementById("filters");
  const current = filters();
  for (const name of ["status", "kind", "prefix", "quiet"]) {
    form.elements[name].value = name === "quiet" ? String(current.quiet) : current[name];
  }
  form.addEventListener("submit", (event) => event.preventDefault());
  form.addEventListener("change", (event) => {
    const field = event.target;
    if (!field.checkValidity()) return;
    if (field.name === "quiet") {
      go({ quiet: field.value === "30" ? "" : field.value }, true);
      const now = Date.now();
      for (const { snapshot, tr } of view.rows.values()) tickRow(tr, snapshot, now);
      return;
    }
    go({ [field.name]: field.value.trim(), cursor: "" });
  });
  document.getElementById("older").addEventListener("click", () => {
    const stack = [...pageStack(), params().get("cursor") || ""];
    const p = params();
    p.set("cursor", view.nextCursor);
    history.pushState({ cursors: stack }, "", `${location.pathname}?${p}`);
    load();
  });
  document.getElementById("newer").addEventListener("click", () => {
    const stack = [...pageStack()];
    const previous = stack.pop() ?? "";
    const p = params();
    if (previous) p.set("cursor", previous);
    else p.delete("cursor");
    history.pushState({ cursors: stack }, "", `${location.pathname}${p.size ? `?${p}` : ""}`);
    load();
  });
  window.addEventListener("popstate", () => {
    const again = filters();
    for (const name of ["status", "kind", "prefix"]) form.elements[name].value = again[name];
    load();
  });
}

setUpTokenForm();
setUpFilters();
setInterval(() => {
  const now = Date.now();
  for (const { snapshot, tr } of view.rows.values()) tickRow(tr, snapshot, now);
}, 1000);
load();

// A job's page at /ui/jobs/{job_id}: its progress card, facts, a live timeline of its events
// (watchJob from seq 0: the whole log, then live), the NDJSON export and the `jobfeed tail`
// command that follows the same job from a terminal. Its JSON twin is GET /v1/jobs/{job_id}.

import { watchJob, jobStreamUrl } from "/client/jobfeed.js";
import { formatEta, formatRate } from "/client/progress.js";
import { el, getTicket, setUpTokenForm, showProblem, statusBadge, token } from "/ui/common.js";

// The timeline keeps the newest events in the page; the download has them all.
const TIMELINE_MAX = 1000;

const jobId = decodeURIComponent(location.pathname.replace(/^\/ui\/jobs\//, ""));
const timeline = document.querySelector("#timeline tbody");
let shown = 0;

function setUp() {
  document.title = `${jobId} · jobfeed`;
  document.getElementById("job-title").textContent = jobId;
  document.getElementById("json-twin").href = `/v1/jobs/${encodeURIComponent(jobId)}`;
  const card = el("jobfeed-progress", { job: jobId, server: location.origin });
  card.getTicket = getTicket;
  document.getElementById("card-slot").append(card);

  const command = `jobfeed tail ${shellQuote(jobId)} --url ${location.origin}`;
  document.getElementById("tail-command").textContent = command;
  document.getElementById("copy").addEventListener("click", async () => {
    const said = document.getElementById("copied");
    try {
      await navigator.clipboard.writeText(command);
      said.textContent = "copied";
    } catch {
      // No clipboard (an insecure origin): select the text for a manual copy.
      getSelection().selectAllChildren(document.getElementById("tail-command"));
      said.textContent = "selected: press Ctrl+C";
    }
  });
  document.getElementById("download").addEventListener("click", download);

  watchJob(jobStreamUrl(jobId, location.origin), {
    getTicket,
    onEvent: (event, snapshot) => {
      addEvent(event);
      if (snapshot) showFacts(snapshot);
    },
    onStatus: (state) => {
      const live = document.getElementById("live");
      live.textContent =
        state === "live" ? "live" : state === "waiting" ? "reconnecting" : state === "done" ? "finished" : state;
      live.dataset.state = state;
    },
    onReset: () => {
      timeline.replaceChildren();
      shown = 0;
    },
    onError: (error) => {
      if (error.final) {
        showProblem(error.code === "job_not_found" ? `There is no job ${jobId}.` : error.message);
      }
    },
  });
}

function addEvent(event) {
  const summary = summarize(event);
  const data = event.data ?? event.result ?? event.error ?? event.metadata;
  const row = el(
    "tr",
    { "data-seq": String(event.seq), "data-type": event.type, class: `type-${event.type}` },
    el("td", { class: "seq", text: String(event.seq) }),
    el("td", { class: "time" }, el("time", { datetime: event.ts, title: event.ts, text: clock(event.ts) })),
    el("td", {}, el("span", { class: `badge type type-${event.type}`, text: event.type })),
    el("td", { class: `level level-${event.level ?? ""}`, text: event.level ?? "" }),
    el("td", { class: "message", text: summary }),
    el("td", { class: "data" }, data === undefined ? null : details(data)),
  );
  timeline.append(row);
  shown++;
  if (timeline.childElementCount > TIMELINE_MAX) timeline.firstElementChild.remove();
  const count = document.getElementById("timeline-count");
  count.textContent =
    shown > TIMELINE_MAX ? `(the last ${TIMELINE_MAX} of ${shown} events)` : `(${shown} events)`;
}

function summarize(event) {
  switch (event.type) {
    case "progress": {
      const parts = [];
      if (event.progress !== undefined) parts.push(`${Math.round(event.progress * 10) / 10}%`);
      if (event.current !== undefined || event.total !== undefined) {
        parts.push(`${event.current ?? "?"}/${event.total ?? "?"}`);
      }
      if (event.phase) parts.push(event.phase);
      if (event.message) parts.push(event.message);
      return parts.join(" · ");
    }
    case "failed":
      return event.error?.code ? `${event.error.code}: ${event.error.message}` : event.error?.message ?? "";
    case "cancelled":
      return event.reason ?? "";
    case "created":
      return event.kind ? `kind ${event.kind}` : "";
    default:
      return event.message ?? "";
  }
}

function details(value) {
  const text = JSON.stringify(value, null, 2);
  const short = JSON.stringify(value);
  return el(
    "details",
    {},
    el("summary", { text: short.length > 60 ? `${short.slice(0, 57)}…` : short }),
    el("pre", { text }),
  );
}

function showFacts(s) {
  const facts = [
    ["Status", statusBadge(s.status)],
    ["Kind", s.kind ?? "—"],
    ["Created", s.created_at],
    ["Started", s.started_at ?? "—"],
    ["Finished", s.finished_at ?? "—"],
    // The server's estimate as of the last event (docs/protocol.md, "Rate and ETA").
    ["Time left", s.eta_seconds == null ? "—" : `~${formatEta(s.eta_seconds)}`],
    ["Rate", s.rate == null ? "—" : formatRate(s.rate)],
    ["Events", String(s.last_seq)],
    ["Epoch", s.epoch ?? "—"],
  ];
  if (s.metadata) facts.push(["Metadata", details(s.metadata)]);
  document.getElementById("facts").replaceChildren(
    ...facts.flatMap(([name, value]) => [el("dt", { text: name }), el("dd", {}, value)]),
  );
}

async function download() {
  const headers = { Accept: "application/x-ndjson" };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { headers });
  if (!response.ok) {
    showProblem(`Download failed: HTTP ${response.status}`);
    return;
  }
  const url = URL.createObjectURL(await response.blob());
  const link = el("a", { href: url, download: `${jobId}.ndjson` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

function clock(ts) {
  // "13:04:36.923" in UTC: the log's own clock, to the millisecond.
  return ts.slice(11, 23);
}

function shellQuote(text) {
  return /^[A-Za-z0-9._:-]+$/.test(text) ? text : `'${text.replaceAll("'", "'\\''")}'`;
}

setUpTokenForm();
setUp();

// <jobfeed-progress job="build-42">: a progress card for one job, with no framework.
//
//   <script type="module" src="http://jobfeed.example:8080/client/progress.js"></script>
//   <jobfeed-progress job="build-42"></jobfeed-progress>
//
// Attributes: `job` (required); `server` (default: the server this script came from);
// `persist` (present: a reload resumes from sessionStorage). It follows the job with
// watchJob (resuming across drops and restarts) and shows a bar, the percent, phase, message,
// the server's estimate of the time left and of the rate (docs/protocol.md, "Rate and ETA"),
// elapsed time, and the result or the error at the end. Style it with CSS custom properties
// (--jobfeed-bar-color, --jobfeed-bar-background, --jobfeed-completed-color,
// --jobfeed-failed-color, --jobfeed-border, --jobfeed-radius, --jobfeed-font,
// --jobfeed-muted-color, --jobfeed-background) or its parts (::part(bar), ::part(fill), ...).
// Accessible: the bar is a role="progressbar" with aria-valuenow/min/max and aria-valuetext;
// the status line is a polite live region that announces the ending.

import { jobStreamUrl, timestampMicros, watchJob } from "./jobfeed.js";

const TEMPLATE = `
<style>
  :host {
    display: block;
    font: var(--jobfeed-font, 14px/1.4 system-ui, sans-serif);
    color: inherit;
    background: var(--jobfeed-background, transparent);
    border: var(--jobfeed-border, 1px solid #d0d7de);
    border-radius: var(--jobfeed-radius, 8px);
    padding: 12px 14px;
    max-width: 36rem;
  }
  header { display: flex; justify-content: space-between; align-items: baseline; gap: 8px; }
  .job { font-weight: 600; overflow-wrap: anywhere; }
  .status { font-size: 0.85em; color: var(--jobfeed-muted-color, #57606a); }
  .track {
    height: 10px; margin: 8px 0 6px; border-radius: 5px; overflow: hidden;
    background: var(--jobfeed-bar-background, #eaeef2);
  }
  .fill {
    height: 100%; width: 0; border-radius: inherit;
    background: var(--jobfeed-bar-color, #0969da);
    transition: width 0.2s ease-out;
  }
  :host([status="completed"]) .fill { background: var(--jobfeed-completed-color, #1a7f37); }
  :host([status="failed"]) .fill,
  :host([status="cancelled"]) .fill { background: var(--jobfeed-failed-color, #cf222e); }
  .track.indeterminate .fill { width: 30% !important; animation: slide 1.2s infinite ease-in-out; }
  @keyframes slide { from { margin-left: -30%; } to { margin-left: 100%; } }
  @media (prefers-reduced-motion: reduce) {
    .fill { transition: none; }
    .track.indeterminate .fill { animation: none; margin-left: 35%; }
  }
  .line { display: flex; justify-content: space-between; gap: 8px; }
  .percent { font-variant-numeric: tabular-nums; font-weight: 600; }
  .phase { color: var(--jobfeed-muted-color, #57606a); }
  .message { overflow-wrap: anywhere; }
  .message:empty { display: none; }
  .elapsed { color: var(--jobfeed-muted-color, #57606a); font-variant-numeric: tabular-nums; }
  .eta { font-variant-numeric: tabular-nums; }
  .eta:not(:empty)::after { content: " · "; color: var(--jobfeed-muted-color, #57606a); }
  .outcome:empty { display: none; }
  .outcome { margin-top: 8px; padding: 6px 8px; border-radius: 6px; background: #f6f8fa; }
  :host([status="failed"]) .outcome { background: #ffebe9; color: #82071e; }
  .outcome pre { margin: 4px 0 0; white-space: pre-wrap; overflow-wrap: anywhere;
    font: 12px/1.4 ui-monospace, monospace; max-height: 10em; overflow: auto; }
</style>
<header><span class="job" part="job"></span><span class="status" part="status" role="status"></span></header>
<div class="track" part="bar" role="progressbar" aria-valuemin="0" aria-valuemax="100"><div class="fill" part="fill"></div></div>
<div class="line"><span><span class="percent" part="percent"></span> <span class="phase" part="phase"></span></span><span><span class="eta" part="eta"></span><span class="elapsed" part="elapsed" title="elapsed"></span></span></div>
<div class="message" part="message"></div>
<div class="outcome" part="outcome"></div>
`;

const SCRIPT_SERVER = new URL("..", import.meta.url).href;

export class JobfeedProgress extends HTMLElement {
  static observedAttributes = ["job", "server"];
  #watch = null;
  #timer = null;
  #snapshot = null;
  #connection = "connecting";
  #els;

  constructor() {
    super();
    const root = this.attachShadow({ mode: "open" });
    root.innerHTML = TEMPLATE;
    const $ = (selector) => root.querySelector(selector);
    this.#els = {
      job: $(".job"),
      status: $(".status"),
      bar: $(".track"),
      fill: $(".fill"),
      percent: $(".percent"),
      phase: $(".phase"),
      message: $(".message"),
      elapsed: $(".elapsed"),
      eta: $(".eta"),
      outcome: $(".outcome"),
    };
  }

  /** The job's snapshot as folded so far (null before its created event). */
  get snapshot() {
    return this.#snapshot;
  }

  /** The underlying watch (state, resumes, transport...). */
  get watch() {
    return this.#watch;
  }

  connectedCallback() {
    this.#start();
  }

  disconnectedCallback() {
    this.#stop();
  }

  attributeChangedCallback(name, before, after) {
    if (before !== after && this.isConnected) this.#start();
  }

  #start() {
    this.#stop();
    const job = this.getAttribute("job");
    this.#snapshot = null;
    this.#els.job.textContent = job ?? "";
    this.#render();
    if (!job) return;
    const server = this.getAttribute("server") || SCRIPT_SERVER;
    this.#watch = watchJob(jobStreamUrl(job, server), {
      persist: this.hasAttribute("persist") ? `jobfeed:progress:${server}:${job}` : false,
      getTicket: this.getTicket,
      onSnapshot: (snapshot) => {
        this.#snapshot = snapshot;
        this.#render();
        this.dispatchEvent(new CustomEvent("jobfeed-snapshot", { detail: snapshot }));
      },
      onStatus: (state) => {
        this.#connection = state;
        this.#render();
      },
      onError: (error) => {
        this.#connection = error.final ? `error: ${error.message}` : this.#connection;
        this.#render();
      },
    });
    if (this.#watch.snapshot) this.#snapshot = this.#watch.snapshot; // restored (persist)
    this.#timer = setInterval(() => this.#renderElapsed(), 1000);
    this.#render();
  }

  #stop() {
    this.#watch?.stop();
    this.#watch = null;
    clearInterval(this.#timer);
    this.#timer = null;
  }

  #render() {
    const s = this.#snapshot;
    const { bar, fill, percent, phase, message, status, outcome, eta } = this.#els;
    const job = this.getAttribute("job") ?? "";
    this.setAttribute("status", s?.status ?? "unknown");
    bar.setAttribute("aria-label", `Progress of ${job}`);
    const value = s?.progress ?? null;
    bar.classList.toggle("indeterminate", value === null && s?.status === "running");
    if (value === null) {
      bar.removeAttribute("aria-valuenow");
      fill.style.width = "0";
      percent.textContent = "";
    } else {
      const rounded = Math.round(value * 10) / 10;
      bar.setAttribute("aria-valuenow", String(rounded));
      fill.style.width = `${Math.min(100, Math.max(0, value))}%`;
      percent.textContent = `${Math.floor(value)}%`;
    }
    const counts = s?.total ? `${s.current ?? 0} of ${s.total}` : "";
    phase.textContent = [s?.phase, counts].filter(Boolean).join(" · ");
    message.textContent = s?.message ?? "";
    eta.textContent = estimateText(s);
    bar.setAttribute("aria-valuetext", valueText(s));
    status.textContent = statusText(s, this.#connection);
    outcome.replaceChildren(...outcomeNodes(s));
    this.#renderElapsed();
  }

  #renderElapsed() {
    const s = this.#snapshot;
    if (!s) {
      this.#els.elapsed.textContent = "";
      return;
    }
    const start = timestampMicros(s.created_at) / 1000;
    const end = s.finished_at ? timestampMicros(s.finished_at) / 1000 : Date.now();
    this.#els.elapsed.textContent = formatDuration(end - start);
    if (s.finished_at) {
      clearInterval(this.#timer);
      this.#timer = null;
    }
  }
}

function valueText(s) {
  if (!s) return "waiting for the job";
  const parts = [];
  if (s.progress !== null) parts.push(`${Math.floor(s.progress)} percent`);
  if (s.status !== "running" || s.progress === null) parts.push(s.status);
  if (s.eta_seconds != null) parts.push(spokenEta(s.eta_seconds));
  if (s.rate != null) parts.push(`${formatNumber(s.rate)} per second`);
  if (s.phase) parts.push(s.phase);
  if (s.message) parts.push(s.message);
  return parts.join(", ");
}

function statusText(s, connection) {
  if (connection.startsWith("error")) return connection;
  if (!s) return connection === "live" ? "waiting for the job" : connection;
  if (s.status === "running" && connection !== "live" && connection !== "done") {
    return `running (${connection === "waiting" ? "reconnecting" : connection})`;
  }
  return s.status;
}

function outcomeNodes(s) {
  if (!s) return [];
  if (s.status === "failed" && s.error) {
    const title = document.createElement("strong");
    title.textContent = s.error.code ? `Failed (${s.error.code}): ` : "Failed: ";
    const text = document.createTextNode(s.error.message ?? "");
    return s.error.details !== undefined && s.error.details !== null
      ? [title, text, pre(s.error.details)]
      : [title, text];
  }
  if (s.status === "completed") {
    const title = document.createElement("strong");
    title.textContent = "Completed";
    return s.result === null ? [title] : [title, pre(s.result)];
  }
  if (s.status === "cancelled") {
    const title = document.createElement("strong");
    title.textContent = "Cancelled";
    return [title];
  }
  return [];
}

function pre(value) {
  const node = document.createElement("pre");
  node.textContent = JSON.stringify(value, null, 2);
  return node;
}

// The server's estimate, as it is: it changes with every event and is not counted down here
// (this browser's clock need not agree with the server's).
function estimateText(s) {
  if (!s || s.status !== "running") return "";
  const parts = [];
  if (s.eta_seconds != null) parts.push(`${formatEta(s.eta_seconds)} left`);
  if (s.rate != null) parts.push(formatRate(s.rate));
  return parts.join(" · ");
}

/** Seconds left as "0:07", "2:31", "1:05:00", "3 days". */
export function formatEta(seconds) {
  if (seconds >= 2 * 86400) return `${Math.round(seconds / 86400)} days`;
  return formatDuration(Math.ceil(seconds) * 1000);
}

/** Units per second as "12.5/s", "3/min", "0.5/h" (3 significant digits). */
export function formatRate(rate) {
  if (rate >= 1 || rate === 0) return `${formatNumber(rate)}/s`;
  if (rate * 60 >= 1) return `${formatNumber(rate * 60)}/min`;
  return `${formatNumber(rate * 3600)}/h`;
}

function formatNumber(value) {
  return value.toLocaleString(undefined, { maximumSignificantDigits: 3 });
}

function spokenEta(seconds) {
  if (seconds < 1) return "almost done";
  const s = Math.ceil(seconds);
  if (s < 60) return `about ${s} second${s === 1 ? "" : "s"} left`;
  if (s < 3600) {
    const m = Math.round(s / 60);
    return `about ${m} minute${m === 1 ? "" : "s"} left`;
  }
  if (s < 2 * 86400) {
    const h = Math.floor(s / 3600);
    const m = Math.round((s % 3600) / 60);
    return `about ${h} hour${h === 1 ? "" : "s"}${m ? ` ${m} minute${m === 1 ? "" : "s"}` : ""} left`;
  }
  return `about ${Math.round(s / 86400)} days left`;
}

export function formatDuration(ms) {
  const total = Math.max(0, Math.floor(ms / 1000));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const mm = String(m).padStart(h ? 2 : 1, "0");
  const ss = String(s).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

if (!customElements.get("jobfeed-progress")) {
  customElements.define("jobfeed-progress", JobfeedProgress);
}

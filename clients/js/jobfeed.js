// jobfeed.js: follow jobfeed jobs from a browser, with jobfeed's guarantees and no code of your
// own for reconnection. Plain modern JavaScript, no dependencies, no build step; types in
// jobfeed.d.ts beside it. Served by jobfeed at /client/jobfeed.js and publishable to npm as is.
//
//   import { watchJob } from "/client/jobfeed.js";
//   const watch = watchJob("/v1/jobs/build-42/stream", {
//     onEvent: (event, snapshot) => console.log(event.seq, event.type, snapshot.progress),
//   });
//
// Every event is handed out once, in order, across drops and server restarts: each attempt
// resumes from the last seq (a job) or event id (the feed) with the log's epoch, after a
// backoff with full jitter. The contract is jobfeed's docs/protocol.md.

export const TERMINAL_TYPES = Object.freeze(["completed", "failed", "cancelled"]);
const TERMINAL = new Set(TERMINAL_TYPES);

/** True for completed, failed and cancelled: the events (and statuses) that end a job. */
export function isTerminal(type) {
  return TERMINAL.has(type);
}

// -- The fold: a copy of server/snapshot.py, tested against the server's own vectors --------

const TS_RE = /^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})$/;

/** Microseconds since 1970 of an RFC 3339 timestamp as jobfeed writes them (Date has ms). */
export function timestampMicros(ts) {
  const match = TS_RE.exec(ts);
  if (!match) throw new TypeError(`not an RFC 3339 timestamp: ${ts}`);
  const seconds = Date.parse(match[1] + match[3]);
  const micros = Number((match[2] || "").padEnd(6, "0").slice(0, 6));
  return seconds * 1000 + micros;
}

/** The log's identity as the server derives it: "{created id}-{created ts in µs, hex}". */
export function logEpoch(createdId, createdTs) {
  return `${createdId}-${timestampMicros(createdTs).toString(16)}`;
}

/**
 * What ends a job's epoch in the database generation that the feed's hello names
 * (`g{number}-{tag}`): nothing in generation 0, `-g{number}-{tag}` after a restore.
 */
export function jobEpochSuffix(feedEpoch) {
  return !feedEpoch || feedEpoch.startsWith("g0-") ? "" : `-${feedEpoch}`;
}

const PROGRESS_FIELDS = ["progress", "phase", "message", "current", "total"];

/** The snapshot after `event` (a stored event); `state` is null only before `created`. */
export function applyEvent(state, event) {
  const { type, ts } = event;
  if (type === "created") {
    return {
      job_id: event.job_id,
      kind: event.kind ?? null,
      status: "queued",
      progress: null,
      phase: null,
      message: null,
      current: null,
      total: null,
      last_seq: event.seq,
      created_at: ts,
      updated_at: ts,
      finished_at: null,
      metadata: event.metadata ?? null,
      result: null,
      error: null,
      epoch: logEpoch(event.id, ts),
      started_at: null,
      rate: null,
      eta_seconds: null,
      rate_window: null,
      heartbeat_timeout: event.heartbeat_timeout ?? null,
    };
  }
  if (!state) throw new Error(`event ${type} (seq ${event.seq}) before the job's created event`);
  const next = { ...state, last_seq: event.seq, updated_at: ts };
  if (state.started_at == null) next.started_at = ts;
  if (type === "progress") {
    next.status = "running";
    for (const name of PROGRESS_FIELDS) if (name in event) next[name] = event[name];
  } else if (type === "log") {
    next.status = "running";
  } else if (TERMINAL.has(type)) {
    next.status = type;
    next.finished_at = ts;
    if (type === "completed") {
      next.progress = 100;
      next.result = event.result ?? null;
      if ("message" in event) next.message = event.message;
    } else if (type === "failed") {
      next.error = event.error;
    } else if ("reason" in event) {
      next.message = event.reason;
    }
    next.rate = next.eta_seconds = next.rate_window = null; // nothing left to estimate
    return next;
  }
  // A custom event moves nothing but last_seq and updated_at (not even out of queued).
  sample(state, next, ts);
  return next;
}

// Rate and ETA: server/snapshot.py's estimator, the same operations in the same order on the
// same doubles, so a live card shows the server's numbers (docs/protocol.md, "Rate and ETA").
// Every event of a running job is a sample of its position (current, else progress); the
// window is two decayed sums, advance and seconds; rate = advance / seconds.
export const RATE_WINDOW_SECONDS = 30;
export const MIN_RATE_SECONDS = 1;
export const MAX_ETA_SECONDS = 1e9;

function sample(state, next, ts) {
  const inUnits = next.current != null;
  const position = inUnits ? next.current : next.progress;
  if (position == null) return; // nothing to measure yet
  const before = state.current ?? state.progress;
  const window = state.rate_window;
  let advance = 0;
  let seconds = 0;
  if (window && before != null && (state.current != null) === inUnits && position >= before) {
    ({ advance, seconds } = window);
    const elapsed = ts === state.updated_at ? 0 : secondsBetween(state.updated_at, ts);
    const gain = position - before;
    if (elapsed || gain) {
      const decay = RATE_WINDOW_SECONDS / (RATE_WINDOW_SECONDS + elapsed);
      advance = advance * decay + gain;
      seconds = seconds * decay + elapsed;
    }
  }
  next.rate_window = { advance, seconds };
  const rate = seconds >= MIN_RATE_SECONDS ? advance / seconds : null;
  next.rate = inUnits ? rate : null;
  let left = null;
  if (!inUnits) left = 100 - position;
  else if (next.total != null) left = next.total - next.current;
  if (left === null || rate === null) next.eta_seconds = null;
  else if (left <= 0) next.eta_seconds = 0;
  else if (rate > 0 && left < rate * MAX_ETA_SECONDS) next.eta_seconds = left / rate;
  else next.eta_seconds = null;
}

function secondsBetween(earlier, later) {
  const micros = timestampMicros(later) - timestampMicros(earlier);
  return micros > 0 ? micros / 1_000_000 : 0;
}

/** `applyEvent` over `events`, from `state` (default: nothing, so events[0] is `created`). */
export function fold(events, state = null) {
  for (const event of events) state = applyEvent(state, event);
  return state;
}

// -- Errors ---------------------------------------------------------------------------------

/** A refusal or a failure the watch reports through onError. `final`: the watch stopped. */
export class JobfeedError extends Error {
  constructor(code, message, { status = null, closeCode = null, final = true } = {}) {
    super(message);
    this.name = "JobfeedError";
    this.code = code;
    this.status = status;
    this.closeCode = closeCode;
    this.final = final;
  }
}

// Close codes (docs/protocol.md, "Close codes"): resume later, or give up.
const RESUME_CLOSE_CODES = new Set([1001, 1005, 1006, 1011, 1012, 1013, 1014]);
const RETRY_STATUSES = new Set([408, 425, 429, 500, 502, 503, 504]);
const CLOSE_ERROR_CODES = {
  4004: "job_not_found",
  4400: "invalid_parameter",
  4401: "unauthorized",
  4403: "forbidden",
  4409: "log_reset",
  4410: "job_deleted",
};

// -- Watching -------------------------------------------------------------------------------

const DEFAULTS = {
  transport: "auto", // "auto": WebSocket first, Server-Sent Events when it cannot connect
  backoff: { base: 250, cap: 10_000 }, // ms: full jitter in [0, min(cap, base * 2^failures))
  idleTimeout: 45_000, // ms without a byte (heartbeats come every 15 s when idle): resume
};

class Watch {
  #kind;
  #url;
  #options;
  #abort = null;
  #stopped = false;
  #failures = 0;
  #ticket = null;
  #reauths = 0;
  #connected = { websocket: false, sse: false };
  #resolveClosed;

  constructor(kind, url, options) {
    this.#kind = kind;
    this.#url = new URL(url, globalThis.location?.href);
    // An option given as undefined is an option not given (a wrapper passes its own through).
    const given = Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined));
    this.#options = { ...DEFAULTS, ...given, backoff: { ...DEFAULTS.backoff, ...given.backoff } };
    /** "connecting" | "live" | "waiting" | "done" | "failed" | "stopped" */
    this.state = "connecting";
    this.transport = this.#options.transport === "sse" ? "sse" : "websocket";
    this.resumes = 0;
    this.hello = null;
    this.error = null;
    this.closed = new Promise((resolve) => (this.#resolveClosed = resolve));
    this.#restore();
    queueMicrotask(() => this.#run());
  }

  /** Stop for good: closes the connection; no callback is called after this returns. */
  stop() {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#abort?.();
    this.#finish("stopped");
  }

  async #run() {
    while (!this.#stopped) {
      this.#setState("connecting");
      let outcome;
      try {
        const ticket = await this.#currentTicket();
        if (this.#stopped) return;
        const url = this.#attemptUrl(ticket);
        outcome =
          this.transport === "websocket" ? await this.#wsAttempt(url) : await this.#sseAttempt(url);
      } catch (error) {
        outcome = { kind: "retry", reason: String(error?.message ?? error) };
      }
      if (this.#stopped || outcome.kind === "stopped") return;
      if (outcome.kind === "done") return this.#finish("done");
      if (outcome.kind === "fatal") {
        this.#report(outcome.error);
        return this.#finish("failed");
      }
      if (outcome.kind === "reset") {
        this.#reset(outcome.error);
        continue;
      }
      if (outcome.kind === "reauth") {
        // 4401: a new ticket, then resume at once; twice in a row without a hello is final.
        this.#ticket = null;
        if (!this.#options.getTicket || ++this.#reauths > 1) {
          this.#report(outcome.error);
          return this.#finish("failed");
        }
        continue;
      }
      // retry: a transport that never connected in this watch gives way to the other one.
      if (!outcome.opened && this.#options.transport === "auto" && !this.#connected[this.transport]) {
        this.transport = this.transport === "websocket" ? "sse" : "websocket";
      }
      this.lastDrop = outcome.reason;
      this.resumes++;
      this.#setState("waiting");
      await this.#sleep(this.#nextDelay(outcome.retryAfter));
    }
  }

  #nextDelay(floor = 0) {
    const { base, cap } = this.#options.backoff;
    const window = Math.min(cap, base * 2 ** Math.min(this.#failures, 30));
    this.#failures++;
    return (floor || 0) + Math.random() * window;
  }

  #sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.#abort = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  async #currentTicket() {
    const getTicket = this.#options.getTicket;
    if (!getTicket) return null;
    if (this.#ticket === null) this.#ticket = await getTicket();
    return this.#ticket;
  }

  #attemptUrl(ticket) {
    const url = new URL(this.#url);
    if (this.after !== null && this.after !== undefined) url.searchParams.set("after", this.after);
    if (this.epoch) url.searchParams.set("epoch", this.epoch);
    if (this.#kind === "feed") appendFilters(url, this.#options.filters, this.#options.snapshots);
    if (ticket) url.searchParams.set("ticket", ticket);
    return url;
  }

  // One WebSocket subscription; resolves with how it ended.
  #wsAttempt(url) {
    const wsUrl = new URL(url);
    wsUrl.protocol = wsUrl.protocol === "https:" ? "wss:" : "ws:";
    return new Promise((resolve) => {
      let opened = false;
      let errorFrame = null;
      let idle = null;
      const ws = new WebSocket(wsUrl);
      const end = (outcome) => {
        clearTimeout(idle);
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        if (ws.readyState <= WebSocket.OPEN) ws.close(1000);
        resolve(outcome);
      };
      const armIdle = () => {
        clearTimeout(idle);
        idle = setTimeout(
          () => end({ kind: "retry", reason: "idle", opened }),
          this.#options.idleTimeout,
        );
      };
      this.#abort = () => end({ kind: "stopped" });
      armIdle();
      ws.onopen = () => {
        opened = true;
        this.#connected.websocket = true;
        armIdle();
      };
      ws.onmessage = (message) => {
        armIdle();
        let frame;
        try {
          frame = JSON.parse(message.data);
        } catch {
          return end({ kind: "retry", reason: "a frame that is not JSON", opened });
        }
        if (frame.type === "error" && !("seq" in frame)) {
          errorFrame = frame;
          return;
        }
        const verdict = this.#accept(frame);
        if (verdict) end(verdict.kind === "retry" ? { ...verdict, opened } : verdict);
      };
      ws.onclose = (close) => end(this.#closeOutcome(close.code, close.reason, errorFrame, opened));
    });
  }

  #closeOutcome(code, reason, errorFrame, opened) {
    if (code === 1000) return { kind: "done" };
    if (RESUME_CLOSE_CODES.has(code) || code < 1000) {
      return { kind: "retry", reason: `closed ${code}`, opened };
    }
    const errorCode = errorFrame?.code ?? CLOSE_ERROR_CODES[code] ?? "closed";
    const message = errorFrame?.message ?? (reason || `the server closed the stream (${code})`);
    const error = new JobfeedError(errorCode, message, { closeCode: code });
    if (code === 4401) return { kind: "reauth", error };
    if (code === 4409) return { kind: "reset", error };
    return { kind: "fatal", error };
  }

  // One Server-Sent Events response, read with fetch so that its status is known (204 ends,
  // 409 is log_reset), then parsed here; resolves with how it ended.
  async #sseAttempt(url) {
    const controller = new AbortController();
    let why = { kind: "stopped" };
    let idle = null;
    const end = (outcome) => {
      why = outcome;
      controller.abort();
    };
    const armIdle = () => {
      clearTimeout(idle);
      idle = setTimeout(
        () => end({ kind: "retry", reason: "idle", opened: true }),
        this.#options.idleTimeout,
      );
    };
    this.#abort = () => end({ kind: "stopped" });
    try {
      const response = await fetch(url, {
        headers: { Accept: "text/event-stream" },
        cache: "no-store",
        signal: controller.signal,
      });
      if (response.status === 204) return { kind: "done" };
      if (response.status !== 200) return await this.#httpOutcome(response);
      this.#connected.sse = true;
      armIdle();
      const parser = new SSEParser();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        armIdle();
        for (const record of parser.feed(value)) {
          const verdict = this.#sseRecord(record, parser.retry);
          if (verdict) {
            end(verdict);
            return verdict;
          }
        }
      }
    } catch (error) {
      if (controller.signal.aborted) return why;
      return { kind: "retry", reason: `SSE: ${error?.message ?? error}`, opened: this.#connected.sse };
    } finally {
      clearTimeout(idle);
    }
    // The response ended without the terminal event: a job's hello may say there is no more.
    const hello = this.hello;
    if (this.#kind === "job" && hello && TERMINAL.has(hello.status) && this.after >= hello.last_seq) {
      return { kind: "done" };
    }
    return { kind: "retry", reason: "the SSE response ended", opened: true };
  }

  #sseRecord(record, retryHint) {
    if (record.event === "error") {
      // A 200 that carries an error record is, by design, a refusal to retry (final
      // refusals keep their 4xx status): overloaded, shutting_down, a proxy's
      // upstream_unavailable (docs/nginx/jobfeed.conf)... Only auth.md's codes differ.
      const frame = parseJson(record.data) ?? {};
      const code = String(frame.code ?? "error");
      const error = new JobfeedError(code, frame.message ?? code);
      if (code === "token_expired" || code === "unauthorized") return { kind: "reauth", error };
      if (code === "forbidden" || code === "job_deleted") return { kind: "fatal", error };
      return { kind: "retry", reason: `SSE error ${code}`, retryAfter: retryHint, opened: true };
    }
    if (!record.data) return null;
    const frame = parseJson(record.data);
    if (frame === null) return { kind: "retry", reason: "a record that is not JSON", opened: true };
    return this.#accept(frame);
  }

  async #httpOutcome(response) {
    const body = parseJson(await response.text().catch(() => ""));
    const code = body?.error?.code ?? `http_${response.status}`;
    const message = body?.error?.message ?? `HTTP ${response.status}`;
    const error = new JobfeedError(code, message, { status: response.status });
    if (RETRY_STATUSES.has(response.status)) {
      const retryAfter = Number(response.headers.get("Retry-After")) * 1000 || 0;
      return { kind: "retry", reason: `HTTP ${response.status}`, retryAfter, opened: true };
    }
    if (response.status === 401) return { kind: "reauth", error };
    if (code === "log_reset") return { kind: "reset", error };
    return { kind: "fatal", error };
  }

  // A frame from either transport; returns how the attempt ends, or nothing to go on.
  #accept(frame) {
    return this.#kind === "job" ? this.#acceptJobFrame(frame) : this.#acceptFeedFrame(frame);
  }

  #acceptJobFrame(frame) {
    if (!("seq" in frame)) {
      if (frame.type !== "hello") return null; // heartbeats, pongs
      if (this.epoch && frame.epoch && frame.epoch !== this.epoch) {
        // Not sent by a server that got our epoch (it refuses with 4409): the same remedy.
        const message = `job ${frame.job_id}'s log is epoch ${frame.epoch}, not ${this.epoch}`;
        return { kind: "reset", error: new JobfeedError("log_reset", message, { final: false }) };
      }
      this.#helloSeen(frame);
      return null;
    }
    const seq = frame.seq;
    if (seq <= this.after) return null; // already handed out (never sent by the server)
    if (seq !== this.after + 1) {
      return { kind: "retry", reason: `expected seq ${this.after + 1}, got ${seq}` };
    }
    if (this.snapshot || (frame.type === "created" && this.after === 0)) {
      this.snapshot = applyEvent(this.snapshot, frame);
      // The hello's epoch: after a restore it carries the database's generation, which the
      // created event alone does not (docs/protocol.md, the log's epoch).
      if (frame.type === "created" && this.epoch) this.snapshot.epoch = this.epoch;
    }
    this.after = seq;
    this.#save();
    this.#call("onEvent", frame, this.snapshot);
    if (this.snapshot) this.#call("onSnapshot", this.snapshot, frame);
    return TERMINAL.has(frame.type) ? { kind: "done" } : null;
  }

  #acceptFeedFrame(frame) {
    if (frame.type === "hello" && !("seq" in frame)) {
      if (this.epoch && frame.epoch && frame.epoch !== this.epoch) {
        // Not sent by a server that got our epoch (it refuses with 4409): the same remedy.
        const message = `the feed is epoch ${frame.epoch}, not ${this.epoch}`;
        return { kind: "reset", error: new JobfeedError("log_reset", message, { final: false }) };
      }
      if (this.after === null || this.after === undefined) this.after = frame.after;
      this.#helloSeen(frame);
      return null;
    }
    if (frame.type === "snapshot" && !("seq" in frame)) {
      this.snapshots.set(frame.job.job_id, frame.job);
      this.#call("onSnapshot", frame.job, null);
      return null;
    }
    if (frame.type === "heartbeat" && !("seq" in frame)) {
      // Every matching event up to last_id was sent: resume past what was scanned.
      if (frame.last_id > this.after) {
        this.after = frame.last_id;
        this.#save();
      }
      return null;
    }
    if (!("id" in frame) || !("seq" in frame)) return null;
    if (frame.id <= this.after) return null;
    this.after = frame.id;
    const known = this.snapshots.get(frame.job_id);
    let snapshot = null;
    if (frame.type === "created" || (known && frame.seq === known.last_seq + 1)) {
      snapshot = applyEvent(known ?? null, frame);
      // After a restore a job's epoch also names the generation, which the created event
      // alone does not (docs/protocol.md, the log's epoch); the feed's hello does.
      if (frame.type === "created") snapshot.epoch += jobEpochSuffix(this.epoch);
      this.snapshots.set(frame.job_id, snapshot);
    } else if (known && frame.seq > known.last_seq) {
      this.snapshots.delete(frame.job_id); // a hole in this job (a type filter): not foldable
    } else if (known) {
      snapshot = known;
    }
    this.#save();
    this.#call("onEvent", frame, snapshot);
    if (snapshot) this.#call("onSnapshot", snapshot, frame);
    return null;
  }

  #helloSeen(frame) {
    this.epoch = frame.epoch ?? this.epoch;
    this.hello = frame;
    this.#failures = 0;
    this.#reauths = 0;
    this.#setState("live");
  }

  // log_reset: the log we hold is not the job's log any more. Start over from its beginning.
  // The feed (a restored database) starts again from now, with the snapshots again if it
  // asked for them; what the page built from the old log is stale (onReset: list again).
  #reset(error) {
    error.final = false;
    this.after = this.#kind === "job" ? 0 : null;
    this.epoch = null;
    this.snapshot = null;
    if (this.#kind === "feed") this.snapshots.clear();
    this.#call("onReset", error);
    this.#report(error);
    this.#save();
  }

  #setState(state) {
    if (this.state === state || this.#stopped) return;
    this.state = state;
    this.#call("onStatus", state, this);
  }

  #finish(state) {
    if (state !== "stopped") this.#setState(state);
    else this.state = "stopped";
    this.#abort = null;
    this.#resolveClosed(state);
  }

  #report(error) {
    this.error = error;
    this.#call("onError", error);
  }

  // A callback that throws must not break the stream: report it and go on.
  #call(name, ...args) {
    const callback = this.#options[name];
    if (!callback || this.#stopped) return;
    try {
      callback(...args);
    } catch (error) {
      (globalThis.reportError ?? console.error)(error);
    }
  }

  // -- The persisted cursor (sessionStorage): a reload resumes where the page was ----------

  #storageKey() {
    const persist = this.#options.persist;
    if (!persist) return null;
    if (typeof persist === "string") return persist;
    const url = new URL(this.#url);
    if (this.#kind === "feed") appendFilters(url, this.#options.filters, false);
    return `jobfeed:${this.#kind}:${url.pathname}${url.search}`;
  }

  #restore() {
    const options = this.#options;
    this.after = options.after ?? (this.#kind === "job" ? 0 : null);
    this.epoch = options.epoch ?? null;
    if (this.#kind === "job") {
      this.snapshot = options.snapshot ?? null;
      if (this.snapshot && options.after === undefined) {
        this.after = this.snapshot.last_seq;
        this.epoch = this.snapshot.epoch;
      }
    } else {
      this.snapshots = new Map((options.jobs ?? []).map((job) => [job.job_id, job]));
    }
    const key = this.#storageKey();
    if (!key || options.after !== undefined) return;
    const saved = parseJson(storage()?.getItem(key) ?? "");
    if (!saved || typeof saved.after !== "number") return;
    this.after = saved.after;
    this.epoch = saved.epoch ?? null;
    if (this.#kind === "job") {
      this.snapshot = saved.snapshot ?? null;
    }
  }

  #save() {
    const key = this.#storageKey();
    if (!key) return;
    const saved =
      this.#kind === "job"
        ? { after: this.after, epoch: this.epoch, snapshot: this.snapshot }
        : { after: this.after, epoch: this.epoch };
    try {
      storage()?.setItem(key, JSON.stringify(saved));
    } catch {
      // Storage full or refused (private mode): the watch goes on without it.
    }
  }
}

function storage() {
  try {
    return globalThis.sessionStorage ?? null;
  } catch {
    return null; // a sandboxed frame may throw on access
  }
}

function parseJson(text) {
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

function appendFilters(url, filters = {}, snapshots = false) {
  for (const name of ["job", "prefix", "kind", "type"]) {
    const value = filters?.[name];
    if (value === undefined || value === null || value === "") continue;
    for (const one of Array.isArray(value) ? value : [value]) url.searchParams.append(name, one);
  }
  if (snapshots) url.searchParams.set("snapshots", "1");
}

/** A minimal Server-Sent Events parser (the WHATWG rules jobfeed's records need). */
export class SSEParser {
  #buffer = "";
  #record = { event: "", data: [], id: null };
  retry = 0;

  *feed(text) {
    this.#buffer += text;
    let newline;
    while ((newline = this.#buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = this.#buffer.slice(0, newline);
      const width = this.#buffer.startsWith("\r\n", newline) ? 2 : 1;
      this.#buffer = this.#buffer.slice(newline + width);
      if (line === "") {
        const record = this.#record;
        this.#record = { event: "", data: [], id: null };
        if (record.data.length || record.event) {
          yield { event: record.event, data: record.data.join("\n"), id: record.id };
        }
        continue;
      }
      if (line.startsWith(":")) continue; // a comment (heartbeat)
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") this.#record.data.push(value);
      else if (field === "event") this.#record.event = value;
      else if (field === "id") this.#record.id = value;
      else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
    }
  }
}

/**
 * Follow one job: `url` is its stream, e.g. "/v1/jobs/build-42/stream" (absolute or relative
 * to the page). Calls onEvent(event, snapshot) once per event, in seq order, across drops and
 * restarts; onSnapshot(snapshot, event) with the folded snapshot; onStatus(state, watch);
 * onError(error). Stops by itself after the terminal event.
 */
export function watchJob(url, options = {}) {
  return new Watch("job", url, options);
}

/**
 * Follow the feed (many jobs, one cursor): `url` is the feed, e.g. "/v1/feed". `after` is an
 * event id (a list's `cursor`; absent: from now), `epoch` the one an earlier feed's hello
 * gave with it; `filters` {job, prefix, kind, type}; `jobs` seeds the snapshots that events
 * are folded into. Never ends by itself. On log_reset (the server's database was restored)
 * it calls onReset(error) and starts again from now (with `snapshots`, they come again).
 */
export function watchFeed(url, options = {}) {
  return new Watch("feed", url, options);
}

/** The stream URL of a job on a server (default: the page's own origin). */
export function jobStreamUrl(jobId, server = globalThis.location?.href) {
  return new URL(`/v1/jobs/${encodeURIComponent(jobId)}/stream`, server).href;
}

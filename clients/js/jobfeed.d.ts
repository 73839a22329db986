// Types for jobfeed.js (docs/protocol.md is the contract they describe). The frames' interfaces
// carry the names and fields of the server's JSON Schema, GET /v1/frames.schema.json
// (server/frame_schema.py); tests/test_client_js.py fails when the two name different fields.

export type JobStatus = "queued" | "running" | "completed" | "failed" | "cancelled";
export type TerminalType = "completed" | "failed" | "cancelled";

/** Fields every stored event carries; the server sets them. */
interface EventBase {
  job_id: string;
  /** Position in the job's log: 1, 2, 3, ... with no gaps (1 is `created`). */
  seq: number;
  /** Position in the whole server's log: strictly increasing, may have holes. */
  id: number;
  /** RFC 3339 UTC with microseconds, e.g. "2026-11-23T13:04:36.923160Z". */
  ts: string;
}

export interface CreatedEvent extends EventBase {
  type: "created";
  kind?: string;
  metadata?: Record<string, unknown>;
  /** Seconds without an event before the server fails the job as `worker_lost`. */
  heartbeat_timeout?: number;
}
export interface ProgressEvent extends EventBase {
  type: "progress";
  progress?: number;
  phase?: string;
  message?: string;
  current?: number;
  total?: number;
  data?: Record<string, unknown>;
}
export interface LogEvent extends EventBase {
  type: "log";
  message: string;
  level: "debug" | "info" | "warning" | "error";
  data?: Record<string, unknown>;
}
export interface ErrorInfo {
  message: string;
  code?: string;
  details?: unknown;
}
export interface CompletedEvent extends EventBase {
  type: "completed";
  result?: unknown;
  message?: string;
  data?: Record<string, unknown>;
}
export interface FailedEvent extends EventBase {
  type: "failed";
  error: ErrorInfo;
  data?: Record<string, unknown>;
  /** "server": the server failed the job itself (`error.code` "worker_lost"). */
  by?: "server";
}
export interface CancelledEvent extends EventBase {
  type: "cancelled";
  reason?: string;
  data?: Record<string, unknown>;
}
/** A producer's own type (`^[a-z][a-z0-9_.-]{0,63}$`, not a reserved word). */
export interface CustomEvent extends EventBase {
  type: string;
  message?: string;
  data?: Record<string, unknown>;
}
export type JobEvent =
  | CreatedEvent
  | ProgressEvent
  | LogEvent
  | CompletedEvent
  | FailedEvent
  | CancelledEvent
  | CustomEvent;

/** A job's snapshot (`GET /v1/jobs/{id}`): the fold of its log; null where there is no value. */
export interface Snapshot {
  job_id: string;
  kind: string | null;
  status: JobStatus;
  progress: number | null;
  phase: string | null;
  message: string | null;
  current: number | null;
  total: number | null;
  last_seq: number;
  created_at: string;
  updated_at: string;
  finished_at: string | null;
  metadata: Record<string, unknown> | null;
  result: unknown;
  error: ErrorInfo | null;
  /** The log's identity: send it back when resuming; compare only for equality. */
  epoch: string | null;
  /** The ts of the first event after `created`; null while there is none. */
  started_at: string | null;
  /** Units of `current` per second over the recent window; null when unknown (fewer than
   * two samples, less than a second measured, no `current`, finished). */
  rate: number | null;
  /** Seconds left as of `updated_at`, from the rate and what is left (`total - current`, or
   * `100 - progress` for a job that reports only fractions); null when unknown, 0 when
   * nothing is left. Never negative. */
  eta_seconds: number | null;
  /** The estimator's state: what `applyEvent` needs to go on from this snapshot. */
  rate_window: RateWindow | null;
  /** Seconds without an event before the server fails the job; null: not watched. */
  heartbeat_timeout: number | null;
}

/** Decayed sums of the position's gain and of the seconds passed (docs/protocol.md). */
export interface RateWindow {
  advance: number;
  seconds: number;
}

/** Control frames of a job stream (WebSocket; SSE sends the hello as `event: hello`). */
export interface JobHello {
  type: "hello";
  job_id: string;
  status: JobStatus;
  after: number;
  last_seq: number;
  epoch: string;
}
export interface JobHeartbeat {
  type: "heartbeat";
  last_seq: number;
}
/** Control frames of the feed. */
export interface FeedHello {
  type: "hello";
  after: number;
  last_id: number;
  /** The log's identity (the server database's generation): resume with it as `?epoch=`. */
  epoch: string;
}
export interface FeedHeartbeat {
  type: "heartbeat";
  last_id: number;
}
export interface SnapshotFrame {
  type: "snapshot";
  job: Snapshot;
}
/** @deprecated the schema's name is SnapshotFrame */
export type FeedSnapshotFrame = SnapshotFrame;
/** The answer to a client's {"type": "ping"} (WebSocket). */
export interface Pong {
  type: "pong";
}
export interface ErrorFrame {
  type: "error";
  code: string;
  message: string;
}

export type WatchState = "connecting" | "live" | "waiting" | "done" | "failed" | "stopped";
export type Transport = "websocket" | "sse";

export class JobfeedError extends Error {
  /** The protocol's error code: job_not_found, invalid_parameter, log_reset, job_deleted (4410, final), unauthorized, ... */
  code: string;
  /** The HTTP status of an SSE refusal, else null. */
  status: number | null;
  /** The WebSocket close code, else null. */
  closeCode: number | null;
  /** True when the watch stopped because of it (false for log_reset: it starts over). */
  final: boolean;
}

interface WatchOptions {
  /** "auto" (default): WebSocket first, Server-Sent Events while a WebSocket cannot connect. */
  transport?: "auto" | Transport;
  /** Backoff between attempts, ms: a uniform draw in [0, min(cap, base * 2^failures)). */
  backoff?: { base?: number; cap?: number };
  /** Resume when nothing arrived for this long, ms (default 45000; heartbeats come every 15 s). */
  idleTimeout?: number;
  /**
   * Where a stream ticket comes from when authentication is on (`?ticket=`): called before
   * the first attempt and again after a 4401 (then the watch resumes from its position).
   */
  getTicket?: () => string | null | Promise<string | null>;
  /**
   * Keep the position and epoch (and a job's snapshot) in sessionStorage, so that a reload
   * of the page resumes: `true` (a key made from the URL and filters) or a key of your own.
   * An explicit `after` wins over a stored one.
   */
  persist?: boolean | string;
  onStatus?: (state: WatchState, watch: Watch) => void;
  /** A final refusal (final: true), or a log_reset (final: false: the watch starts over). */
  onError?: (error: JobfeedError) => void;
  /**
   * The log this watch held is gone (re-created job, a restored or replaced database): a job
   * watch starts over from seq 0, a feed from now (what the page built from it is stale).
   */
  onReset?: (error: JobfeedError) => void;
}

export interface WatchJobOptions extends WatchOptions {
  /** The last seq you have (default 0: the whole log, so the snapshot is folded from it). */
  after?: number;
  /** The epoch of the log that `after` is in (from a hello or a snapshot). */
  epoch?: string;
  /** A snapshot you have (e.g. `GET /v1/jobs/{id}`): the watch resumes after its last_seq. */
  snapshot?: Snapshot;
  /** Each event once, in seq order; `snapshot` is the fold up to it (null when unknown). */
  onEvent?: (event: JobEvent, snapshot: Snapshot | null) => void;
  onSnapshot?: (snapshot: Snapshot, event: JobEvent) => void;
}

export interface FeedFilters {
  job?: string | string[];
  prefix?: string;
  kind?: string | string[];
  type?: string | string[];
}

export interface WatchFeedOptions extends WatchOptions {
  /** An event id, e.g. a `GET /v1/jobs` answer's `cursor`; absent: from now. */
  after?: number;
  /** The epoch of the feed that `after` is in (an earlier feed hello's `epoch`). */
  epoch?: string;
  filters?: FeedFilters;
  /** Ask for the unfinished jobs' snapshots first (only without `after`). */
  snapshots?: boolean;
  /** Snapshots you have (e.g. a `GET /v1/jobs` page): their events are folded into them. */
  jobs?: Snapshot[];
  /** Each event once, in id order; `snapshot` is its job's, when known and foldable. */
  onEvent?: (event: JobEvent, snapshot: Snapshot | null) => void;
  /** A job's new snapshot: from a snapshot frame (event null) or after folding an event. */
  onSnapshot?: (snapshot: Snapshot, event: JobEvent | null) => void;
}

export interface Watch {
  readonly state: WatchState;
  readonly transport: Transport;
  /** A job's last seq, or the feed's position (an event id; null before the first hello). */
  readonly after: number | null;
  readonly epoch: string | null;
  /** How many times the watch reconnected. */
  readonly resumes: number;
  readonly hello: JobHello | FeedHello | null;
  readonly error: JobfeedError | null;
  /** Settles with the final state: "done", "failed" or "stopped". */
  readonly closed: Promise<WatchState>;
  /** Stop for good; no callback is called after it returns. */
  stop(): void;
}
export interface JobWatch extends Watch {
  readonly after: number;
  readonly snapshot: Snapshot | null;
}
export interface FeedWatch extends Watch {
  /** Every job whose snapshot the feed knows (seeded, from snapshot frames or created events). */
  readonly snapshots: Map<string, Snapshot>;
}

export function watchJob(url: string | URL, options?: WatchJobOptions): JobWatch;
export function watchFeed(url: string | URL, options?: WatchFeedOptions): FeedWatch;
export function jobStreamUrl(jobId: string, server?: string | URL): string;

/** The server's fold (server/snapshot.py), tested against its own vectors. */
export function applyEvent(state: Snapshot | null, event: JobEvent): Snapshot;
export function fold(events: Iterable<JobEvent>, state?: Snapshot | null): Snapshot | null;
export function logEpoch(createdId: number, createdTs: string): string;
/** What ends a job's epoch in the generation a feed's hello names ("" in generation 0). */
export function jobEpochSuffix(feedEpoch: string | null | undefined): string;
export function timestampMicros(ts: string): number;
export function isTerminal(type: string): type is TerminalType;
export const TERMINAL_TYPES: readonly TerminalType[];
/** The rate estimator's constants (seconds): its window, the least it measures before giving
 * a rate, and the largest ETA it gives. */
export const RATE_WINDOW_SECONDS: number;
export const MIN_RATE_SECONDS: number;
export const MAX_ETA_SECONDS: number;

export class SSEParser {
  retry: number;
  feed(text: string): Generator<{ event: string; data: string; id: string | null }>;
}

// Types for react.js: the React hooks (React >= 18 is a peer dependency).
import type {
  FeedFilters,
  JobEvent,
  JobfeedError,
  Snapshot,
  WatchFeedOptions,
  WatchJobOptions,
  WatchState,
} from "./jobfeed.js";

export interface HookOptions {
  /** The jobfeed server (default: the page's origin). A change reconnects. */
  server?: string;
  /** How many of the newest events `events` keeps (default 1000). */
  keepEvents?: number;
}

export interface JobState {
  /** The job's snapshot, folded with the server's rules (null before `created` is seen). */
  snapshot: Snapshot | null;
  /** The newest events, oldest first (at most `keepEvents`). */
  events: JobEvent[];
  status: WatchState;
  /** The last error: final (the watch stopped) or a log_reset (it started over). */
  error: JobfeedError | null;
  /** How many times the watch reconnected. */
  resumes: number;
}

export interface FeedState {
  /** Snapshots by job id: seeded with `jobs`, from snapshot frames, or folded from events. */
  snapshots: Record<string, Snapshot>;
  events: JobEvent[];
  status: WatchState;
  error: JobfeedError | null;
  resumes: number;
}

/** Follow one job; reconnects only when `jobId` or `server` changes; stops on unmount. */
export function useJob(jobId: string | null | undefined, options?: WatchJobOptions & HookOptions): JobState;

/** Follow the feed; reconnects only when the filters (by value) or `server` change. */
export function useJobFeed(filters?: FeedFilters, options?: WatchFeedOptions & HookOptions): FeedState;

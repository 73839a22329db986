// Types for progress.js: the <jobfeed-progress> custom element.
import type { JobWatch, Snapshot } from "./jobfeed.js";

/**
 * `<jobfeed-progress job="build-42" server="http://jobfeed:8080" persist>`: a progress card
 * that follows one job (bar, percent, phase, message, time left and rate, elapsed, result
 * or error). Dispatches
 * `jobfeed-snapshot` (detail: the snapshot) after every event.
 */
export class JobfeedProgress extends HTMLElement {
  static observedAttributes: string[];
  /** The job's snapshot as folded so far (null before its created event). */
  readonly snapshot: Snapshot | null;
  /** The watch following the job (null while disconnected). */
  readonly watch: JobWatch | null;
  /** Set before the element connects, when authentication is on: where tickets come from. */
  getTicket?: () => string | null | Promise<string | null>;
}

export function formatDuration(ms: number): string;
/** Seconds left (a snapshot's `eta_seconds`) as "0:07", "2:31", "1:05:00", "3 days". */
export function formatEta(seconds: number): string;
/** A snapshot's `rate` as "12.5/s", "3/min" or "0.5/h". */
export function formatRate(rate: number): string;

declare global {
  interface HTMLElementTagNameMap {
    "jobfeed-progress": JobfeedProgress;
  }
}

// Types for progress.js: the <jobfeed-progress> custom element.
import type { JobWatch, Snapshot } from "./jobfeed.js";

/**
 * `<jobfeed-progress job="build-42" server="http://jobfeed:8080" persist>`: a progress card
 * that follows one job (bar, percent, phase, message, elapsed, result or error). Dispatches
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

declare global {
  interface HTMLElementTagNameMap {
    "jobfeed-progress": JobfeedProgress;
  }
}

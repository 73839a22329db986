// jobfeed/react: React hooks over watchJob and watchFeed (React is a peer dependency).
//
//   import { useJob } from "jobfeed/react";
//   function Build({ id }) {
//     const { snapshot, events, status, error } = useJob(id);
//     return <progress max={100} value={snapshot?.progress ?? undefined} />;
//   }
//
// A hook opens one watch when its component mounts (or when the job / filters change) and
// stops it on unmount. Re-renders do not reconnect: the options object may be new on every
// render; callbacks are read from the latest render, connection options at (re)connect.

import { useEffect, useRef, useState } from "react";
import { jobStreamUrl, watchFeed, watchJob } from "./jobfeed.js";

const KEEP_EVENTS = 1000; // the newest events kept in `events` (a long log would grow forever)

function initialState() {
  return { snapshot: null, snapshots: {}, events: [], status: "connecting", error: null, resumes: 0 };
}

function keepNewest(events, event, keep) {
  const next = events.length >= keep ? events.slice(events.length - keep + 1) : events.slice();
  next.push(event);
  return next;
}

// The callbacks every hook gives its watch: state updates plus the caller's own callbacks.
function callbacks(latest, setState) {
  const keep = () => latest.current.keepEvents ?? KEEP_EVENTS;
  return {
    onStatus: (status, watch) => {
      setState((s) => ({ ...s, status, resumes: watch.resumes }));
      latest.current.onStatus?.(status, watch);
    },
    onError: (error) => {
      setState((s) => ({ ...s, error }));
      latest.current.onError?.(error);
    },
    onReset: (error) => {
      setState((s) => ({ ...s, snapshot: null, events: [] }));
      latest.current.onReset?.(error);
    },
    getTicket: latest.current.getTicket ? () => latest.current.getTicket() : undefined,
    keep,
  };
}

function connectionOptions(options) {
  const { after, epoch, snapshot, transport, backoff, idleTimeout, persist } = options;
  return { after, epoch, snapshot, transport, backoff, idleTimeout, persist };
}

/**
 * Follow one job: `{snapshot, events, status, error, resumes}`. `options.server` is the
 * jobfeed server (default: the page's origin); the watch's options (after, persist,
 * getTicket, transport, ...) and callbacks (onEvent, onSnapshot, ...) are accepted too.
 */
export function useJob(jobId, options = {}) {
  const latest = useRef(options);
  latest.current = options;
  const [state, setState] = useState(initialState);
  const server = options.server;
  useEffect(() => {
    setState(initialState());
    if (!jobId) return undefined;
    const { keep, ...common } = callbacks(latest, setState);
    const watch = watchJob(jobStreamUrl(jobId, server ?? globalThis.location?.href), {
      ...connectionOptions(latest.current),
      ...common,
      onEvent: (event, snapshot) => {
        setState((s) => ({ ...s, snapshot: snapshot ?? s.snapshot, events: keepNewest(s.events, event, keep()) }));
        latest.current.onEvent?.(event, snapshot);
      },
      onSnapshot: (snapshot, event) => latest.current.onSnapshot?.(snapshot, event),
    });
    if (watch.snapshot) setState((s) => ({ ...s, snapshot: watch.snapshot })); // restored
    return () => watch.stop();
  }, [jobId, server]);
  return state;
}

/**
 * Follow the feed: `{snapshots, events, status, error, resumes}`, where `snapshots` maps
 * job ids to the snapshots known so far (from `options.jobs`, snapshot frames, or events
 * folded into them). `filters` is {job, prefix, kind, type}; it may be a new object on every
 * render (compared by value). `options.after` is an event id (a list's `cursor`).
 */
export function useJobFeed(filters = {}, options = {}) {
  const latest = useRef(options);
  latest.current = options;
  const [state, setState] = useState(initialState);
  const server = options.server;
  const filterKey = JSON.stringify(filters ?? {});
  useEffect(() => {
    const seeded = Object.fromEntries((latest.current.jobs ?? []).map((job) => [job.job_id, job]));
    setState({ ...initialState(), snapshots: seeded });
    const { keep, ...common } = callbacks(latest, setState);
    const watch = watchFeed(new URL("/v1/feed", server ?? globalThis.location?.href), {
      ...connectionOptions(latest.current),
      filters: JSON.parse(filterKey),
      snapshots: latest.current.snapshots,
      jobs: latest.current.jobs,
      ...common,
      onEvent: (event, snapshot) => {
        setState((s) => ({ ...s, events: keepNewest(s.events, event, keep()) }));
        latest.current.onEvent?.(event, snapshot);
      },
      onSnapshot: (snapshot, event) => {
        setState((s) => ({ ...s, snapshots: { ...s.snapshots, [snapshot.job_id]: snapshot } }));
        latest.current.onSnapshot?.(snapshot, event);
      },
    });
    return () => watch.stop();
  }, [filterKey, server]);
  return state;
}

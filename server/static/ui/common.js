// What the dashboard's pages share: requests (with the pasted token, when there is one), stream
// tickets for the module, and small formatting helpers. Plain ES module, no build step.

const TOKEN_KEY = "jobfeed:token";

/** The bearer token pasted into this tab (sessionStorage: gone when the tab closes). */
export function token() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** A request to jobfeed's API; resolves with the parsed JSON, rejects with its error body's message. */
export async function api(path, init = {}) {
  const headers = { Accept: "application/json", ...init.headers };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const response = await fetch(path, { ...init, headers });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error(body?.error?.message ?? `HTTP ${response.status}`);
    error.code = body?.error?.code ?? `http_${response.status}`;
    error.status = response.status;
    throw error;
  }
  return body;
}

/**
 * The module's getTicket when a token was pasted (auth.md: a browser's streams carry a
 * short-lived ticket, never the token): POST /v1/tickets with the token. Without a token
 * (authentication off) there is nothing to ask for.
 */
export const getTicket = token()
  ? async () => (await api("/v1/tickets", { method: "POST", body: "{}", headers: { "Content-Type": "application/json" } })).ticket
  : undefined;

/** Wire the header's token form (present on every page). */
export function setUpTokenForm() {
  const form = document.getElementById("token-form");
  if (!form) return;
  const input = form.querySelector("input");
  input.value = token();
  document.getElementById("token-state").textContent = token() ? "token set" : "no token";
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setToken(input.value.trim());
    location.reload();
  });
}

/** Milliseconds since 1970 of a jobfeed timestamp. */
export function tsMillis(ts) {
  return ts ? Date.parse(ts.replace(/(\.\d{3})\d*Z$/, "$1Z")) : NaN;
}

/** "4s", "3m 05s", "2h 01m", "5d 3h". */
export function formatSpan(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  const h = Math.floor(m / 60);
  if (h < 24) return `${h}h ${String(m % 60).padStart(2, "0")}m`;
  return `${Math.floor(h / 24)}d ${h % 24}h`;
}

/** An element with attributes, properties and children: el("a", {href: "/"}, "home"). */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

export function statusBadge(status) {
  return el("span", { class: `badge status-${status}`, text: status });
}

export function showProblem(message) {
  const banner = document.getElementById("problem");
  if (!banner) return;
  banner.textContent = message ?? "";
  banner.hidden = !message;
}

// Talking to the SegQuant Serve HTTP API from the browser: JSON requests with the optional API key,
// job events over fetch-based SSE (EventSource cannot send an Authorization header), reconnection with
// Last-Event-ID, a polling fallback, and error messages in plain words.

const KEY_STORAGE = "segquant.playground.apiKey";
export const TERMINAL_STATES = new Set(["succeeded", "failed", "canceled", "expired"]);

// The server pings every 15 s; a stream silent for this long is treated as lost.
const STREAM_IDLE_MS = 35000;
const STREAM_RETRIES = 3;

export function getApiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

export function setApiKey(value) {
  try {
    if (value) localStorage.setItem(KEY_STORAGE, value);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage disabled (private mode): the key lives for this page only
  }
}

/** The server answered with an error status; `body` is its JSON error envelope when there was one. */
export class ApiError extends Error {
  constructor(status, body, headers) {
    const envelope = body && typeof body === "object" && body.error ? body.error : {};
    super(envelope.message || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.body = body;
    this.code = envelope.code || null;
    this.param = envelope.param || null;
    this.valid = envelope.valid || null;
    this.detail = Array.isArray(body?.detail) ? body.detail : [];
    const retry = headers?.get("Retry-After");
    this.retryAfter = retry && /^\d+$/.test(retry.trim()) ? Number(retry) : null;
  }
}

/** The server could not be reached at all (no HTTP answer). */
export class NetworkError extends Error {
  constructor(cause) {
    super(cause?.message || "network error");
    this.name = "NetworkError";
    this.cause = cause;
  }
}

/** A job we were following could not be followed any more (the connection stayed down). */
export class LostJobError extends Error {
  constructor(jobId) {
    super(`lost the connection while following job ${jobId}`);
    this.name = "LostJobError";
    this.jobId = jobId;
  }
}

export function isAbort(err) {
  return err?.name === "AbortError";
}

function abortError() {
  return new DOMException("aborted", "AbortError");
}

export function apiUrl(path) {
  // Relative to the page, so the playground also works behind a path prefix.
  return new URL(path, document.baseURI).toString();
}

function authHeaders(extra = {}) {
  const headers = new Headers(extra);
  const key = getApiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return headers;
}

export function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(abortError());
      return;
    }
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    function onAbort() {
      clearTimeout(timer);
      reject(abortError());
    }
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/**
 * One JSON request. `body` is a string (already JSON) or an object; `headers` are added to the defaults
 * and the API key. Resolves to {status, data, headers};
 * rejects with ApiError (HTTP error), NetworkError (no answer) or an AbortError.
 */
export async function requestJson(path, { method = "GET", body, signal, headers: extra = {} } = {}) {
  const headers = { Accept: "application/json", ...extra };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  let text;
  try {
    response = await fetch(apiUrl(path), {
      method,
      headers: authHeaders(headers),
      body: body === undefined || typeof body === "string" ? body : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
    text = await response.text();
  } catch (err) {
    if (isAbort(err)) throw err;
    throw new NetworkError(err);
  }
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) throw new ApiError(response.status, data, response.headers);
  return { status: response.status, data, headers: response.headers };
}

// ------------------------------------------------------------------ errors in plain words

const FIELD_LABELS = {
  prompt: "Prompt",
  negative_prompt: "Negative prompt",
  model: "Model",
  variant: "Variant",
  width: "Width",
  height: "Height",
  num_inference_steps: "Steps",
  guidance_scale: "Guidance",
  seed: "Seed",
  n: "Number of images",
  output_format: "Output format",
  deadline_s: "Deadline",
  loras: "Adapters",
  adapter: "Adapter",
  adapter_scale: "Adapter scale",
  body: "Request",
};

export function fieldLabel(param) {
  if (/^loras\.\d+\.scale$/.test(param)) return "Adapter scale"; // the playground sends one adapter
  if (/^loras\.\d+\.name$/.test(param)) return "Adapter";
  return FIELD_LABELS[param] || param;
}

function fieldOf(loc) {
  const parts = (loc || []).filter((p) => !["body", "query", "path", "header"].includes(p));
  return parts.length ? parts.join(".") : "body";
}

function sentence(text) {
  const t = String(text || "").trim();
  if (!t) return t;
  return t[0].toUpperCase() + t.slice(1);
}

function stop(text) {
  return /[.!?]$/.test(text) ? text : `${text}.`;
}

/** 422 problems as [{field, message}] (from `detail`, else from the envelope's param/message). */
export function fieldErrors(err) {
  if (!(err instanceof ApiError) || err.status !== 422) return [];
  if (err.detail.length) {
    return err.detail.map((d) => ({ field: fieldOf(d.loc), message: sentence(d.msg) }));
  }
  const param = err.param || "body";
  const message = String(err.message || "").replace(new RegExp(`^${param}:\\s*`), "");
  return [{ field: param, message: sentence(message) }];
}

/** What went wrong, for people: never a stack trace, always what to do next when there is something. */
export function describeError(err) {
  if (isAbort(err)) return "Stopped.";
  if (err instanceof NetworkError) {
    return "Could not reach the server. Check that it is running and that you are online, then try again.";
  }
  if (err instanceof LostJobError) {
    return "Lost the connection to the server while waiting for this image. It may still finish on the server; "
      + "press Generate to try again.";
  }
  if (!(err instanceof ApiError)) return `Something went wrong in the page: ${err?.message || err}`;
  const message = err.message;
  switch (err.status) {
    case 401:
      return getApiKey()
        ? "The server did not accept the API key. Check the key in the “API key” field at the top of the page."
        : "This server needs an API key. Paste it in the “API key” field at the top of the page.";
    case 403:
      return `This API key may not do that: ${message}`;
    case 404:
      return err.valid ? `${sentence(message)}. Valid names: ${[].concat(err.valid).join(", ")}.` : sentence(message);
    case 409:
      return sentence(message);
    case 413:
      return `The request is too large (${message}). Use a shorter prompt.`;
    case 422: {
      const problems = fieldErrors(err).map((p) => stop(`${fieldLabel(p.field)}: ${p.message}`));
      return `Please fix the request. ${problems.join(" ")}`.trim();
    }
    case 503: {
      const wait = err.retryAfter != null ? ` Try again in ${err.retryAfter} s.` : "";
      if (err.code === "queue_full") return `The server is busy: its queue is full.${wait}`;
      if (err.code === "queue_unavailable") return `The server's job queue is unavailable right now.${wait}`;
      return `The service is unavailable: ${message}.${wait}`;
    }
    case 504:
      return `The server gave up waiting: ${message}`;
    default:
      if (err.status >= 500) return `The server had a problem (${err.status}): ${message}`;
      return `The server refused the request (${err.status}): ${message}`;
  }
}

const FAILURE_REASONS = {
  oom: "it ran out of memory",
  worker_lost: "the worker running it kept crashing, so the server gave up on it",
  model_unavailable: "this variant could not be built or loaded",
  invalid: "the model rejected these parameters",
  internal: "an internal error happened on the worker",
};

/** A finished job that produced no image, in plain words. */
export function describeJobFailure(job) {
  if (job.state === "canceled") return "Canceled.";
  if (job.state === "expired") return "Expired: the job did not start before its deadline.";
  const reason = job.error?.reason;
  const why = FAILURE_REASONS[reason] || (reason ? `reason “${reason}”` : "no reason was given");
  const detail = job.error?.message ? ` Server message: ${job.error.message}` : "";
  return `Generation failed: ${why}.${detail}`;
}

// ------------------------------------------------------------------ following a job

/** Parse a text/event-stream body; calls onEvent({type, data, id}) per event and onBytes() per chunk. */
async function readEventStream(body, onEvent, onBytes) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = { type: "", data: [], id: null };
  const dispatch = () => {
    if (event.data.length) {
      let data = event.data.join("\n");
      try {
        data = JSON.parse(data);
      } catch {
        // keep the raw text
      }
      if (onEvent({ type: event.type || "message", data, id: event.id }) === true) return true;
    }
    event = { type: "", data: [], id: null };
    return false;
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      onBytes();
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r\n|\r(?!$)|\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (dispatch()) return;
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") event.type = value;
        else if (field === "data") event.data.push(value);
        else if (field === "id") event.id = value;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/**
 * Follow a job to its end. Calls onEvent(type, data) for "queued", "started", "progress", "requeued",
 * "cancel_requested", "reconnecting", "polling", "connection_lost" and "snapshot" (a polled job), and
 * resolves to the final job. Reads the SSE stream with fetch; on a dropped stream it reconnects with
 * Last-Event-ID, and after repeated failures (or without streaming support) it polls GET /jobs/{id}.
 */
export async function followJob(jobId, { onEvent = () => {}, signal, retries = STREAM_RETRIES } = {}) {
  const path = `jobs/${encodeURIComponent(jobId)}/events`;
  let lastEventId = null;
  let failures = 0;
  while (failures < retries) {
    if (signal?.aborted) throw abortError();
    const controller = new AbortController();
    const relay = () => controller.abort();
    signal?.addEventListener("abort", relay, { once: true });
    let idle = null;
    const touch = () => {
      clearTimeout(idle);
      idle = setTimeout(() => controller.abort(), STREAM_IDLE_MS);
    };
    let final = null;
    try {
      touch();
      const headers = { Accept: "text/event-stream" };
      if (lastEventId) headers["Last-Event-ID"] = lastEventId;
      const response = await fetch(apiUrl(path), {
        headers: authHeaders(headers), signal: controller.signal, cache: "no-store",
      });
      if (!response.ok) {
        const data = await response.json().catch(() => null);
        throw new ApiError(response.status, data, response.headers);
      }
      if (!response.body || typeof response.body.getReader !== "function") break; // no streaming: poll
      await readEventStream(response.body, (ev) => {
        if (ev.id) lastEventId = ev.id;
        failures = 0; // the connection works; a later drop gets fresh retries
        if (TERMINAL_STATES.has(ev.type)) {
          final = ev.data;
          return true;
        }
        onEvent(ev.type, ev.data);
        return false;
      }, touch);
      if (final) return final;
      failures += 1; // the stream ended without a terminal event
    } catch (err) {
      if (signal?.aborted) throw abortError();
      if (err instanceof ApiError && [401, 403, 404].includes(err.status)) throw err;
      failures += 1;
    } finally {
      clearTimeout(idle);
      signal?.removeEventListener("abort", relay);
    }
    if (failures < retries) {
      onEvent("reconnecting", { attempt: failures });
      await sleep(250 * 2 ** (failures - 1), signal);
    }
  }
  onEvent("polling", {});
  return pollJob(jobId, { onEvent, signal });
}

/** Poll GET /jobs/{id} until the job ends; gives up (LostJobError) after `giveUpMs` without an answer. */
export async function pollJob(jobId, { onEvent = () => {}, signal, intervalMs = 500, giveUpMs = 120000 } = {}) {
  let lastAnswer = Date.now();
  let delay = intervalMs;
  for (;;) {
    try {
      const { data: job } = await requestJson(`jobs/${encodeURIComponent(jobId)}`, { signal });
      lastAnswer = Date.now();
      delay = intervalMs;
      if (TERMINAL_STATES.has(job.state)) return job;
      onEvent("snapshot", job);
    } catch (err) {
      if (isAbort(err)) throw err;
      const transient = err instanceof NetworkError || (err instanceof ApiError && err.status >= 500);
      if (!transient) throw err;
      if (Date.now() - lastAnswer > giveUpMs) throw new LostJobError(jobId);
      onEvent("connection_lost", { error: err });
      delay = Math.min(delay * 2, 5000);
    }
    await sleep(delay, signal);
  }
}

// The console speaks the service's public HTTP API, like any other client.
//
// URLs are resolved against the app's root, found from this module's own URL
// ({root}/console/assets/{digest}/js/api.js), so the console works unchanged behind a proxy that mounts the app
// under a prefix. The API key lives in sessionStorage: it survives a reload but not the browser session, and no
// other tab or site sees it.

const ROOT = new URL('../../../../', import.meta.url);
const KEY_ITEM = 'taskserve.key';

export class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

export const auth = {
  get key() {
    return sessionStorage.getItem(KEY_ITEM);
  },
  set key(value) {
    if (value) sessionStorage.setItem(KEY_ITEM, value);
    else sessionStorage.removeItem(KEY_ITEM);
  },
};

export function url(path) {
  return new URL(path, ROOT);
}

function headers(extra = {}, task = null) {
  const all = { ...extra };
  const key = auth.key;
  if (key) all.Authorization = `Bearer ${key}`;
  // Behind the task-affine proxy this sends the request to the replica that serves the task.
  if (task) all['X-Task-Id'] = task;
  return all;
}

async function failure(response) {
  const body = await response.json().catch(() => null);
  const error = body?.error;
  const message = error?.message ?? (typeof body?.detail === 'string' ? body.detail : `HTTP ${response.status}`);
  const problem = new ApiError(response.status, error?.type ?? 'http_error', message);
  if (response.status === 401) window.dispatchEvent(new CustomEvent('taskserve:unauthorized', { detail: problem }));
  return problem;
}

/** A JSON request; resolves to the parsed body (null for 204), rejects with ApiError. */
export async function api(path, { method = 'GET', json, task = null, signal } = {}) {
  const init = { method, headers: headers(json === undefined ? {} : { 'Content-Type': 'application/json' }, task), signal, cache: 'no-store' };
  if (json !== undefined) init.body = JSON.stringify(json);
  const response = await fetch(url(path), init);
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

export const taskPath = (id, ...rest) => ['v1/tasks', encodeURIComponent(id), ...rest].join('/');

/**
 * Tasks whose id starts with `prefix`, a page at a time, from GET /v1/tasks (ids in order, `after` exclusive).
 * The page starts just before `prefix`: ids are [A-Za-z0-9][A-Za-z0-9._-]*, so no id lies between
 * prefix[:-1] + (last char - 1) + '\x7f' and prefix. Reading stops at the first id without the prefix.
 */
export async function listTasks({ prefix = '', after = null, limit = 50 } = {}) {
  let start = after;
  if (!start && prefix) start = prefix.slice(0, -1) + String.fromCharCode(prefix.charCodeAt(prefix.length - 1) - 1) + '\x7f';
  const query = new URLSearchParams({ limit: String(limit) });
  if (start) query.set('after', start);
  const page = await api(`v1/tasks?${query}`);
  const tasks = page.tasks.filter((t) => t.task_id.startsWith(prefix));
  const more = page.next_after !== null && tasks.length === page.tasks.length;
  return { tasks, nextAfter: more ? page.next_after : null };
}

/**
 * POST /v1/tasks/{id}/generate with stream: true; calls onDelta({text, token_ids}) per event and resolves to
 * the last event ({finish_reason, usage, version}). `signal` aborts (the server then frees the row).
 */
export async function streamGenerate(taskId, body, { onDelta, signal }) {
  const response = await fetch(url(taskPath(taskId, 'generate')), {
    method: 'POST',
    headers: headers({ 'Content-Type': 'application/json', Accept: 'text/event-stream' }, taskId),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let end = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf('\n\n')) >= 0) {
      const event = parseEvent(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
      if (event.name === 'error') throw new ApiError(500, event.data?.error?.type ?? 'internal', event.data?.error?.message ?? 'generation failed');
      if (event.data?.finish_reason) end = event.data;
      else if (event.data) onDelta(event.data);
    }
  }
  if (end === null) throw new ApiError(0, 'stream_ended', 'the stream ended before the generation finished');
  return end;
}

function parseEvent(block) {
  let name = 'message';
  const data = [];
  for (const line of block.split('\n')) {
    if (line.startsWith('event:')) name = line.slice(6).trim();
    else if (line.startsWith('data:')) data.push(line.slice(5).trimStart());
  }
  return { name, data: data.length ? JSON.parse(data.join('\n')) : null };
}

/**
 * POST /v1/tasks/{id}/versions with a FormData or a JSON body, through XMLHttpRequest: fetch cannot report
 * upload progress. onProgress(sent, total) follows the request body; resolves to the new version, or to the
 * current one with `unchanged: true` when the server stored nothing (200: identical to the current version).
 */
export function upload(taskId, body, { onProgress } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', url(taskPath(taskId, 'versions')));
    const isJson = !(body instanceof FormData);
    for (const [name, value] of Object.entries(headers(isJson ? { 'Content-Type': 'application/json' } : {}, taskId))) {
      xhr.setRequestHeader(name, value);
    }
    xhr.responseType = 'json';
    if (onProgress) xhr.upload.addEventListener('progress', (e) => onProgress(e.loaded, e.lengthComputable ? e.total : null));
    xhr.addEventListener('load', () => {
      if (xhr.status === 201) return resolve(xhr.response);
      if (xhr.status === 200) return resolve({ ...xhr.response, unchanged: true });
      const error = xhr.response?.error;
      const problem = new ApiError(xhr.status, error?.type ?? 'http_error', error?.message ?? `HTTP ${xhr.status}`);
      if (xhr.status === 401) window.dispatchEvent(new CustomEvent('taskserve:unauthorized', { detail: problem }));
      reject(problem);
    });
    xhr.addEventListener('error', () => reject(new ApiError(0, 'network', 'the upload could not reach the server')));
    xhr.send(isJson ? JSON.stringify(body) : body);
  });
}

// Two tasks, two versions of one task, or a task and `base`, side by side on the same prompt or chat, streamed
// token by token, with the sampling settings exposed and each side's time to first token and decode speed
// measured in the browser. A pinned version is sent as the request's `version`: nothing is rolled back.

import { api, listTasks, streamGenerate, taskPath } from '../api.js';
import { h, clear, duration } from '../dom.js';

export function render(container, { session, query }) {
  const state = { mode: 'prompt', running: null };
  let suggesting = null; // the pending task-id suggestion lookup
  const options = h('datalist', { id: 'task-options' });

  const number = (id, value, attrs = {}) => h('input', { type: 'number', class: 'input', id, value: String(value), ...attrs });
  const settings = {
    max_new_tokens: number('s-max-new-tokens', Math.min(64, session.max_new_tokens), { min: '1', max: String(session.max_new_tokens) }),
    temperature: number('s-temperature', 0, { min: '0', max: '2', step: '0.05' }),
    top_p: number('s-top-p', 1, { min: '0.01', max: '1', step: '0.01' }),
    top_k: number('s-top-k', 0, { min: '0', step: '1' }),
    seed: h('input', { type: 'number', class: 'input', id: 's-seed', placeholder: 'random', min: '0' }),
    stop: h('input', { class: 'input', id: 's-stop', placeholder: 'comma-separated' }),
  };
  const system = h('textarea', { class: 'input', id: 's-system', rows: '3', placeholder: 'optional' });
  const systemField = h('label', { class: 'field', hidden: true }, h('span', { class: 'label' }, 'System message'), system);
  const modes = ['prompt', 'chat'].map((mode) => h('button', { type: 'button', class: 'seg', id: `mode-${mode}`, onclick: () => setMode(mode) }, mode === 'prompt' ? 'Prompt' : 'Chat'));
  const setting = (label, control, hint) => h('label', { class: 'field' }, h('span', { class: 'label' }, label), control, hint ? h('span', { class: 'hint' }, hint) : null);

  const panes = [pane('a', query.get('a') ?? '', query.get('av')), pane('b', query.get('b') ?? 'base', query.get('bv'))];
  const input = h('textarea', { class: 'input prompt', id: 'prompt', rows: '3', placeholder: 'Write a prompt… (Ctrl+Enter to run)' });
  const run = h('button', { class: 'btn btn-primary', id: 'run', onclick: start }, 'Generate');
  const stop = h('button', { class: 'btn', id: 'stop', disabled: true, onclick: () => state.running?.abort() }, 'Stop');
  const reset = h('button', { class: 'btn btn-ghost', id: 'reset', onclick: resetOutput }, 'Clear');
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) start();
  });

  container.append(
    h('div', { class: 'page-head' }, h('h1', {}, 'Playground')),
    h('div', { class: 'playground' },
      h('aside', { class: 'card settings' },
        h('div', { class: 'segmented' }, modes),
        systemField,
        setting('Max new tokens', settings.max_new_tokens),
        setting('Temperature', settings.temperature, '0 is greedy'),
        h('div', { class: 'two-col' }, setting('Top-p', settings.top_p), setting('Top-k', settings.top_k, '0 = off')),
        setting('Seed', settings.seed),
        setting('Stop strings', settings.stop)),
      h('div', { class: 'compare' },
        h('div', { class: 'panes' }, panes.map((p) => p.node)),
        h('div', { class: 'card composer' }, input, h('div', { class: 'composer-actions' }, reset, h('span', { class: 'grow' }), stop, run)))),
    options);
  setMode('prompt');
  suggest('');
  if (!panes[0].task.value) listTasks({ limit: 1 }).then((page) => { panes[0].task.value ||= page.tasks[0]?.task_id ?? 'base'; }).catch(() => {});

  function pane(name, task, pinned) {
    const taskInput = h('input', { class: 'input', id: `task-${name}`, list: 'task-options', value: task, placeholder: name === 'b' ? 'none: one side only' : 'task id or base', autocomplete: 'off', spellcheck: 'false' });
    const version = h('select', { class: 'input narrow', id: `version-${name}`, 'aria-label': `pane ${name.toUpperCase()} version`, hidden: true });
    const output = h('div', { class: 'output', id: `output-${name}` });
    const stats = h('div', { class: 'pane-stats', id: `stats-${name}` });
    const node = h('section', { class: 'card pane', dataset: { pane: name } },
      h('div', { class: 'pane-head' }, h('span', { class: 'pane-label' }, name.toUpperCase()), taskInput, version), output, stats);
    const p = { name, task: taskInput, version, output, stats, node, history: [], looking: null };
    taskInput.addEventListener('input', () => {
      suggest(taskInput.value);
      versionsOf(p, null);
    });
    versionsOf(p, pinned);
    return p;
  }

  /** The pane's version picker: "current" and each stored version of the task named, once it names one. */
  function versionsOf(p, pinned) {
    clearTimeout(p.looking);
    p.looking = setTimeout(async () => {
      const id = p.task.value.trim();
      const info = id && id !== 'base' ? await api(taskPath(id), { task: id }).catch(() => null) : null;
      if (id !== p.task.value.trim()) return; // typed on meanwhile
      const keep = pinned ?? p.version.value;
      clear(p.version, info ? [
        h('option', { value: '' }, `current (v${info.version})`),
        [...info.versions].reverse().map((v) => h('option', { value: String(v.version), selected: String(v.version) === String(keep) }, `v${v.version} · ${v.kind}`)),
      ] : []);
      p.version.hidden = !info;
    }, pinned === null ? 250 : 0);
  }

  function suggest(prefix) {
    clearTimeout(suggesting);
    suggesting = setTimeout(async () => {
      const page = await listTasks({ prefix, limit: 20 }).catch(() => ({ tasks: [] }));
      clear(options, h('option', { value: 'base' }, 'the backbone alone'), page.tasks.map((t) => h('option', { value: t.task_id }, `${t.kind} v${t.version}`)));
    }, 200);
  }

  function setMode(mode) {
    state.mode = mode;
    modes.forEach((button) => button.classList.toggle('active', button.id === `mode-${mode}`));
    systemField.hidden = mode !== 'chat';
    input.placeholder = mode === 'chat' ? 'Send a message to both… (Ctrl+Enter)' : 'Write a prompt… (Ctrl+Enter to run)';
    resetOutput();
  }

  function resetOutput() {
    for (const p of panes) {
      p.history = [];
      clear(p.output);
      clear(p.stats);
    }
  }

  function sampling() {
    const body = {
      max_new_tokens: Number(settings.max_new_tokens.value),
      temperature: Number(settings.temperature.value),
      top_p: Number(settings.top_p.value),
      top_k: Number(settings.top_k.value),
      stop: settings.stop.value.split(',').map((s) => s.trim()).filter(Boolean),
    };
    if (settings.seed.value !== '') body.seed = Number(settings.seed.value);
    return body;
  }

  async function start() {
    const text = input.value;
    const active = panes.filter((p) => p.task.value.trim());
    if (state.running || !text.trim() || !active.length) return;
    state.running = new AbortController();
    run.disabled = true;
    stop.disabled = false;
    if (state.mode === 'chat') input.value = '';
    await Promise.all(active.map((p) => generate(p, text, state.running.signal)));
    state.running = null;
    run.disabled = false;
    stop.disabled = true;
  }

  async function generate(p, text, signal) {
    const body = sampling();
    let target;
    if (state.mode === 'chat') {
      p.history.push({ role: 'user', content: text });
      body.messages = [...(system.value ? [{ role: 'system', content: system.value }] : []), ...p.history];
      p.output.append(h('div', { class: 'bubble user' }, text));
      target = h('div', { class: 'bubble assistant streaming' });
    } else {
      body.prompt = text;
      target = h('div', { class: 'completion streaming' });
      clear(p.output);
    }
    p.output.append(target);
    const started = performance.now();
    let first = null;
    let last = null;
    let tokens = 0;
    const show = (finish = null) => clear(p.stats,
      stat('TTFT', first === null ? '—' : duration((first - started) / 1000), 'ttft'),
      stat('tokens/s', tokens > 1 ? ((tokens - 1) / ((last - first) / 1000)).toFixed(1) : '—', 'tps'),
      stat('tokens', String(tokens), 'tokens'),
      finish);
    show();
    try {
      if (!p.version.hidden && p.version.value) body.version = Number(p.version.value);
      const end = await streamGenerate(p.task.value.trim(), body, {
        signal,
        onDelta(delta) {
          const now = performance.now();
          if (delta.token_ids.length) {
            first ??= now;
            last = now;
            tokens += delta.token_ids.length;
          }
          target.append(delta.text); // a text node: whatever the model says stays text
          p.output.scrollTop = p.output.scrollHeight;
          show();
        },
      });
      const served = end.version === null ? 'base' : `v${end.version}`;
      show(h('span', { class: 'finish' }, `${end.finish_reason} · ${served}`));
      if (state.mode === 'chat') p.history.push({ role: 'assistant', content: target.textContent });
    } catch (error) {
      if (state.mode === 'chat') p.history.pop();
      const stopped = error.name === 'AbortError';
      target.append(h('div', { class: stopped ? 'muted' : 'field-error' }, stopped ? '[stopped]' : error.message));
      show();
    } finally {
      target.classList.remove('streaming');
    }
  }

  return { dispose: () => state.running?.abort() };
}

function stat(label, value, id) {
  return h('span', { class: 'stat', dataset: { stat: id } }, h('span', { class: 'label' }, label), ' ', h('strong', {}, value));
}

// The task list: a page at a time from GET /v1/tasks (never the whole store), searched by id prefix; residency
// and last use for the page's rows in one more request.

import { api, listTasks } from '../api.js';
import { h, clear, route, badge, bytes, count, ago, datetime } from '../dom.js';

const PAGE_SIZES = [25, 50, 100];

export function render(container, { session, query }) {
  const state = {
    prefix: query.get('q') ?? '',
    limit: PAGE_SIZES.includes(Number(query.get('limit'))) ? Number(query.get('limit')) : 50,
    cursors: [null], // `after` of each page shown so far: Previous pops one
    next: null,
    seq: 0,
  };
  const search = h('input', { type: 'search', id: 'task-search', class: 'input search', placeholder: 'Search by task id prefix…', value: state.prefix, 'aria-label': 'search tasks' });
  const size = h('select', { class: 'input narrow', id: 'page-size', 'aria-label': 'tasks per page' },
    PAGE_SIZES.map((n) => h('option', { value: String(n), selected: n === state.limit }, `${n} per page`)));
  const body = h('tbody');
  const status = h('span', { class: 'muted', id: 'page-status' });
  const prev = h('button', { class: 'btn', id: 'prev-page', disabled: true }, '← Previous');
  const next = h('button', { class: 'btn', id: 'next-page', disabled: true }, 'Next →');

  container.append(
    h('div', { class: 'page-head' },
      h('h1', {}, 'Tasks'),
      session.scope === 'admin' ? h('a', { class: 'btn btn-primary', href: '#/upload' }, 'Upload a task') : null),
    h('div', { class: 'toolbar' }, search, size),
    h('div', { class: 'card table-card' },
      h('table', { class: 'table', id: 'task-table' },
        h('thead', {}, h('tr', {}, ['Task', 'Kind', 'Version', 'Parameters', 'Size', 'Updated', 'Resident', 'Last use'].map((c) => h('th', {}, c)))),
        body)),
    h('div', { class: 'pager' }, status, h('span', { class: 'grow' }), prev, next));

  async function load() {
    const seq = ++state.seq; // a slower earlier answer must not overwrite a newer one
    const after = state.cursors[state.cursors.length - 1];
    clear(body, h('tr', {}, h('td', { colspan: 8, class: 'muted' }, 'Loading…')));
    let page;
    try {
      page = await listTasks({ prefix: state.prefix, after, limit: state.limit });
    } catch (error) {
      if (seq === state.seq) clear(body, h('tr', {}, h('td', { colspan: 8, class: 'field-error' }, error.message)));
      return;
    }
    if (seq !== state.seq) return;
    state.next = page.nextAfter;
    const first = (state.cursors.length - 1) * state.limit + 1;
    status.textContent = page.tasks.length ? `Tasks ${count(first)}–${count(first + page.tasks.length - 1)}` : '';
    prev.disabled = state.cursors.length === 1;
    next.disabled = state.next === null;
    if (!page.tasks.length) {
      const none = state.prefix ? `No task id starts with “${state.prefix}”.` : 'No tasks yet.';
      clear(body, h('tr', {}, h('td', { colspan: 8, class: 'empty-row' }, none)));
      return;
    }
    const cells = new Map();
    clear(body, page.tasks.map((t) => {
      const resident = h('td', {}, '…');
      const used = h('td', { class: 'muted' }, '…');
      cells.set(`${t.task_id}@${t.version}`, { resident, used });
      return h('tr', { dataset: { task: t.task_id } },
        h('td', {}, h('a', { class: 'task-link', href: route(['tasks', t.task_id]) }, t.task_id),
          t.description ? h('div', { class: 'muted small ellipsis' }, t.description) : null),
        h('td', {}, badge(t.kind, `kind-${t.kind}`)),
        h('td', { class: 'num' }, `v${t.version}`),
        h('td', { class: 'num' }, count(t.parameters)),
        h('td', { class: 'num' }, bytes(t.bytes)),
        h('td', { title: datetime(t.created_at) }, ago(t.created_at)),
        resident, used);
    }));
    const usage = await api(`console/api/usage?versions=${encodeURIComponent([...cells.keys()].join(','))}`).catch(() => null);
    if (seq !== state.seq) return;
    for (const [key, { resident, used }] of cells) {
      const u = usage?.usage?.[key];
      clear(resident, u ? (u.resident ? badge('resident', 'ok') : badge('no', 'muted')) : '—');
      clear(used, u?.last_used ? ago(u.last_used) : '—');
    }
  }

  function restart() {
    state.cursors = [null];
    const params = new URLSearchParams();
    if (state.prefix) params.set('q', state.prefix);
    if (state.limit !== 50) params.set('limit', String(state.limit));
    history.replaceState(null, '', `#/tasks${params.size ? `?${params}` : ''}`);
    load();
  }

  let typing = null;
  search.addEventListener('input', () => {
    clearTimeout(typing);
    typing = setTimeout(() => {
      state.prefix = search.value.trim();
      restart();
    }, 250);
  });
  size.addEventListener('change', () => {
    state.limit = Number(size.value);
    restart();
  });
  next.addEventListener('click', () => {
    state.cursors.push(state.next);
    load();
  });
  prev.addEventListener('click', () => {
    state.cursors.pop();
    load();
  });
  load();
  return { dispose: () => clearTimeout(typing) };
}

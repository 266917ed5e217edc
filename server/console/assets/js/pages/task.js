// One task: its versions, its configuration, and (admin) rollback and delete.

import { api, taskPath } from '../api.js';
import { h, clear, route, badge, card, bytes, count, ago, datetime, toast, confirmDialog } from '../dom.js';

export function render(container, { session, taskId }) {
  const admin = session.scope === 'admin';
  let disposed = false;

  async function load() {
    let info;
    try {
      info = await api(taskPath(taskId), { task: taskId });
    } catch (error) {
      if (!disposed) clear(container, h('div', { class: 'empty' }, h('h1', {}, taskId), h('p', { class: 'field-error' }, error.message), h('a', { href: '#/tasks' }, 'Back to the tasks')));
      return;
    }
    const key = `${taskId}@${info.version}`;
    const usage = await api(`console/api/usage?versions=${encodeURIComponent(key)}`, { task: taskId }).catch(() => null);
    if (disposed) return;
    clear(container, header(info), summary(info, usage?.usage?.[key]?.last_used ?? null), versions(info), configuration(info));
  }

  function header(info) {
    return h('div', { class: 'page-head' },
      h('div', {},
        h('div', { class: 'crumbs' }, h('a', { href: '#/tasks' }, 'Tasks'), ' / '),
        h('h1', { id: 'task-title' }, info.task_id, ' ', badge(info.kind, `kind-${info.kind}`),
          info.resident ? badge('resident', 'ok') : badge('not resident', 'muted'))),
      h('div', { class: 'actions' },
        h('a', { class: 'btn', href: route(['playground'], { a: info.task_id, b: 'base' }) }, 'Open in playground'),
        admin ? h('a', { class: 'btn', href: route(['upload'], { task: info.task_id }) }, 'Upload a version') : null,
        admin ? h('button', { class: 'btn btn-danger', id: 'delete-task', onclick: () => remove(info) }, 'Delete task') : null));
  }

  function summary(info, lastUsed) {
    const current = info.versions.find((v) => v.version === info.version);
    const item = (label, value, extra = {}) => h('div', { class: 'fact' }, h('div', { class: 'label' }, label), h('div', { class: 'value', ...extra }, value));
    return h('section', { class: 'card facts' },
      item('Current version', `v${info.version}`, { id: 'current-version' }),
      item('Parameters', count(info.parameters)),
      item('Size', bytes(info.bytes)),
      item('Created', datetime(current?.created_at)),
      item('Last use here', lastUsed ? ago(lastUsed) : 'not since start', { id: 'last-use' }),
      item('Description', current?.description ?? '—', { class: 'value description', id: 'task-description' }),
      info.components ? item('Components', components(info.components), { id: 'task-components' }) : null);
  }

  function components(parts) {  // a composite task: its adapters in their stated order
    return parts.map((c) => `${c.name} (${c.kind}${c.scale === 1 ? '' : ` ×${c.scale}`})`).join(' + ');
  }

  function versions(info) {
    const rows = [...info.versions].reverse().map((v) => h('tr', { dataset: { version: String(v.version) }, class: v.version === info.version ? 'current' : '' },
      h('td', { class: 'num' }, `v${v.version}`, v.version === info.version ? badge('current', 'accent') : null),
      h('td', {}, badge(v.kind, `kind-${v.kind}`)),
      h('td', { class: 'num' }, count(v.parameters)),
      h('td', { class: 'num' }, bytes(v.bytes)),
      h('td', {}, h('code', { class: 'sha', title: v.sha256 }, v.sha256.slice(0, 12))),
      h('td', { title: datetime(v.created_at) }, ago(v.created_at)),
      h('td', { class: 'ellipsis muted' }, v.description ?? ''),
      h('td', { class: 'right actions' }, v.version === info.version ? null : [
        h('a', { class: 'btn btn-small compare', href: route(['playground'], { a: info.task_id, av: v.version, b: info.task_id }) }, 'Compare with current'),
        admin ? h('button', { class: 'btn btn-small rollback', onclick: () => rollback(info, v.version) }, `Make v${v.version} current`) : null,
      ])));
    return card('Versions', h('table', { class: 'table', id: 'versions' },
      h('thead', {}, h('tr', {}, ['Version', 'Kind', 'Parameters', 'Size', 'sha256', 'Created', 'Description', ''].map((c) => h('th', {}, c)))),
      h('tbody', {}, rows)));
  }

  function configuration(info) {
    const picker = h('select', { class: 'input narrow', id: 'config-version', 'aria-label': 'version' },
      [...info.versions].reverse().map((v) => h('option', { value: String(v.version), selected: v.version === info.version }, `v${v.version}`)));
    const file = h('span', { class: 'muted' });
    const body = h('pre', { class: 'code', id: 'config' }, 'Loading…');
    async function show() {
      try {
        const config = await api(`console/api/tasks/${encodeURIComponent(taskId)}/versions/${picker.value}/config`, { task: taskId });
        file.textContent = config.file;
        body.textContent = JSON.stringify(config.content, null, 2);
      } catch (error) {
        body.textContent = error.message;
      }
    }
    picker.addEventListener('change', show);
    show();
    return h('section', { class: 'card' },
      h('div', { class: 'card-head' }, h('h2', { class: 'card-title' }, 'Configuration'), file, h('span', { class: 'grow' }), picker),
      body);
  }

  async function rollback(info, version) {
    const ok = await confirmDialog({
      title: `Make version ${version} of ${info.task_id} current?`,
      body: h('p', {}, `New requests for ${info.task_id} will use v${version} instead of v${info.version}; rows already running finish on their version.`),
      action: `Make v${version} current`,
    });
    if (!ok) return;
    try {
      await api(taskPath(info.task_id, 'rollback'), { method: 'POST', json: { version }, task: info.task_id });
      toast(`${info.task_id}: v${version} is current`);
    } catch (error) {
      toast(error.message, 'error');
    }
    load();
  }

  async function remove(info) {
    const ok = await confirmDialog({
      title: `Delete task ${info.task_id}?`,
      body: h('p', {}, 'This deletes ', h('strong', {}, info.task_id),
        info.versions.length === 1 ? ' and its only version' : ` and all its ${info.versions.length} versions`,
        '. Requests already running finish first; it cannot be undone.'),
      action: `Delete ${info.task_id}`,
      danger: true,
      confirmText: info.task_id,
    });
    if (!ok) return;
    try {
      await api(taskPath(info.task_id), { method: 'DELETE', task: info.task_id });
      toast(`Deleted ${info.task_id}`);
      location.hash = '#/tasks';
    } catch (error) {
      toast(error.message, 'error');
    }
  }

  load();
  return { dispose: () => { disposed = true; } };
}

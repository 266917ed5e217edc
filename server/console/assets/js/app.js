// The console's shell: who is signed in, the navigation, and a hash router over the pages.
// Hash routes (#/tasks/my-task) need nothing from the server and survive any proxy prefix.

import { api, auth } from './api.js';
import { h, clear, badge } from './dom.js';
import * as login from './pages/login.js';
import * as tasks from './pages/tasks.js';
import * as task from './pages/task.js';
import * as upload from './pages/upload.js';
import * as playground from './pages/playground.js';
import * as live from './pages/live.js';

const view = document.getElementById('view');
const nav = document.getElementById('nav');
const who = document.getElementById('who');
let session = null;
let current = null; // the page on screen: {dispose?}

function parseHash() {
  const [path, search = ''] = location.hash.replace(/^#\/?/, '').split('?');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  return { parts, query: new URLSearchParams(search) };
}

function pick({ parts }) {
  const [first = 'tasks', second] = parts;
  if (first === 'tasks' && second !== undefined) return { page: task, name: 'task', nav: 'tasks', args: { taskId: second } };
  const pages = { tasks, upload, playground, live };
  return pages[first] ? { page: pages[first], name: first, nav: first, args: {} } : null;
}

function render() {
  current?.dispose?.();
  current = null;
  if (session === null) return;
  const location_ = parseHash();
  const chosen = pick(location_);
  for (const link of nav.querySelectorAll('a')) link.classList.toggle('active', link.dataset.page === chosen?.nav);
  if (chosen === null) {
    clear(view, h('div', { class: 'empty' }, h('h1', {}, 'Not found'), h('p', {}, 'No such page. ', h('a', { href: '#/tasks' }, 'Back to the tasks'))));
    return;
  }
  if (chosen.page.needs === 'admin' && session.scope !== 'admin') {
    clear(view, h('div', { class: 'empty', id: 'forbidden' }, h('h1', {}, 'Not allowed'),
      h('p', {}, 'This page needs an admin key; yours is an inference key.')));
    return;
  }
  const container = h('div', { class: 'page', dataset: { page: chosen.name } });
  clear(view, container);
  current = chosen.page.render(container, { session, query: location_.query, ...chosen.args }) ?? null;
}

function showSession() {
  nav.hidden = false;
  for (const link of nav.querySelectorAll('[data-needs="admin"]')) link.hidden = session.scope !== 'admin';
  const scope = session.open ? badge('open: no keys set', 'warn') : badge(`${session.scope} key`, session.scope === 'admin' ? 'accent' : '');
  const signOut = session.open ? null : h('button', { class: 'btn btn-ghost btn-small', id: 'sign-out', onclick: signOutNow }, 'Sign out');
  clear(who, h('span', { class: 'model', title: 'the backbone' }, session.model), scope, signOut);
}

function signOutNow() {
  auth.key = null;
  askForKey();
}

function askForKey(message) {
  current?.dispose?.();
  current = null;
  session = null;
  nav.hidden = true;
  clear(who);
  login.render(view, { message, onKey: start });
}

async function start() {
  try {
    session = await api('console/api/session');
  } catch (error) {
    session = null;
    if (error.status === 401) return askForKey(auth.key ? 'This key is not accepted.' : null);
    clear(view, h('div', { class: 'empty' }, h('h1', {}, 'The service is not ready'), h('p', {}, error.message),
      h('button', { class: 'btn', onclick: start }, 'Retry')));
    return;
  }
  showSession();
  render();
}

window.addEventListener('hashchange', render);
window.addEventListener('taskserve:unauthorized', () => {
  if (session !== null) askForKey('Your key was refused; sign in again.');
});
start();

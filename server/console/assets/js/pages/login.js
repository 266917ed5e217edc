// Asked once per browser session when the service has keys: the key is kept in sessionStorage only.

import { auth } from '../api.js';
import { h, clear } from '../dom.js';

export function render(view, { message, onKey }) {
  const key = h('input', { type: 'password', id: 'api-key', class: 'input', autocomplete: 'off', required: true, placeholder: 'API key' });
  const form = h('form', { class: 'login card', id: 'login' },
    h('h1', {}, 'Sign in'),
    h('p', { class: 'muted' }, 'This service needs an API key. An admin key can upload, roll back and delete tasks; an inference key can browse tasks and use the playground.'),
    h('label', { class: 'field' }, h('span', { class: 'label' }, 'API key'), key),
    message ? h('p', { class: 'field-error', role: 'alert' }, message) : null,
    h('button', { class: 'btn btn-primary', type: 'submit' }, 'Sign in'),
    h('p', { class: 'muted small' }, 'The key is kept in this tab until the browser session ends.'));
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    auth.key = key.value.trim();
    onKey();
  });
  clear(view, h('div', { class: 'login-wrap' }, form));
  key.focus();
}

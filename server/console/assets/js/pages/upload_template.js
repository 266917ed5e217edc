// The template form of the upload page: system, instruction, few-shot examples, input prefix and suffix, chat.

import { h } from '../dom.js';

/**
 * templateEditor(field, errorSlot) -> {node, value(), exampleRow(n)}. `field(label, control, name, hint)` and
 * `errorSlot(name)` come from the page, so server errors land next to these fields like any other.
 */
export function templateEditor(field, errorSlot) {
  const area = (id, rows, placeholder = '') => h('textarea', { class: 'input mono', id, rows: String(rows), placeholder, spellcheck: 'false' });
  const system = area('t-system', 2, 'You are a helpful assistant.');
  const instruction = area('t-instruction', 3, 'Answer with the capital city only.');
  const prefix = area('t-input-prefix', 1, 'Country: ');
  const suffix = area('t-input-suffix', 1, '\\nCapital:');
  const chat = h('input', { type: 'checkbox', id: 't-chat' });
  const examples = h('div', { class: 'examples', id: 't-examples' });
  let sent = []; // the example rows of the last value(): the server's examples.N is sent[N]

  function addExample() {
    const box = (role) => h('textarea', { class: 'input mono', rows: '2', dataset: { role } });
    const row = h('div', { class: 'example' },
      field('Input', box('input'), 'input'),
      field('Output', box('output'), 'output'),
      h('button', { type: 'button', class: 'btn btn-ghost btn-small', 'aria-label': 'remove example', onclick: () => row.remove() }, '✕'));
    examples.append(row);
  }

  const node = h('div', { class: 'panel', id: 'template-panel', hidden: true },
    errorSlot('template'),
    field('System', system, 'system', 'optional'),
    field('Instruction', instruction, 'instruction', 'placed before the examples'),
    h('div', { class: 'field' }, h('span', { class: 'label' }, 'Few-shot examples'), examples, errorSlot('examples'),
      h('button', { type: 'button', class: 'btn btn-small', id: 'add-example', onclick: addExample }, '+ Add example')),
    h('div', { class: 'two-col' },
      field('Input prefix', prefix, 'input_prefix', 'before each input'),
      field('Input suffix', suffix, 'input_suffix', 'after each input')),
    h('label', { class: 'check' }, chat, ' Render with the model’s chat template (examples become user/assistant turns)'),
    errorSlot('chat'));

  function value() {
    sent = [...examples.children].filter((row) => [...row.querySelectorAll('textarea')].some((t) => t.value)); // empty rows are left out
    return {
      system: system.value || null,
      instruction: instruction.value || null,
      examples: sent.map((row) => ({
        input: row.querySelector('[data-role=input]').value,
        output: row.querySelector('[data-role=output]').value,
      })),
      input_prefix: prefix.value,
      input_suffix: suffix.value,
      chat: chat.checked,
    };
  }

  return { node, value, exampleRow: (n) => sent[n] ?? null };
}

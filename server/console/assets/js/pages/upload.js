// Upload a task version: a PEFT save_pretrained folder (its files or the folder itself, dropped or chosen), an
// archive of it, or a template written here. The server validates; its message is shown next to the field it
// names (the task id, a file, a template field), or next to the drop zone when it names none.

import { upload } from '../api.js';
import { h, clear, route, bytes, toast } from '../dom.js';
import { droppedFiles, isArchive, basename, readConfigKeys, templateField, fileFor } from './upload_files.js';
import { templateEditor } from './upload_template.js';

export const needs = 'admin';

export function render(container, { session, query }) {
  const state = { mode: 'files', files: [], busy: false };

  function errorSlot(name) {
    return h('div', { class: 'field-error', role: 'alert', hidden: true, dataset: { errorFor: name } });
  }
  function field(label, control, name, hint) {
    return h('label', { class: 'field' }, h('span', { class: 'label' }, label), control,
      hint ? h('span', { class: 'hint' }, hint) : null, errorSlot(name));
  }
  /** The error slot of a field: by name, an example's input/output by its row, else the panel's own. */
  function slotFor(name) {
    const example = /^examples\.(\d+)\.(input|output)$/.exec(name);
    const scope = example ? editor.exampleRow(Number(example[1])) : container;
    const slot = scope?.querySelector(`[data-error-for="${CSS.escape(example ? example[2] : name)}"]`);
    return slot ?? container.querySelector(`[data-error-for="${state.mode === 'files' ? 'files' : 'template'}"]`);
  }
  function showError(name, message) {
    const slot = slotFor(name);
    slot.hidden = false;
    slot.append(h('div', {}, message));
    slot.closest('.field, .file-row, .dropzone-wrap')?.classList.add('invalid');
  }
  function clearErrors() {
    for (const slot of container.querySelectorAll('.field-error')) {
      clear(slot);
      slot.hidden = true;
    }
    for (const invalid of container.querySelectorAll('.invalid')) invalid.classList.remove('invalid');
  }

  const taskId = h('input', { class: 'input', id: 'task-id', value: query.get('task') ?? '', required: true, autocomplete: 'off', spellcheck: 'false' });
  const description = h('input', { class: 'input', id: 'description', autocomplete: 'off', placeholder: 'what changed in this version (optional)' });

  // --- files ---
  const fileInput = h('input', { type: 'file', id: 'file-input', multiple: true, hidden: true });
  const folderInput = h('input', { type: 'file', id: 'folder-input', webkitdirectory: true, hidden: true });
  const fileList = h('div', { class: 'file-list', id: 'file-list' });
  const zone = h('div', { class: 'dropzone', id: 'dropzone', tabindex: '0' },
    h('div', { class: 'dropzone-title' }, 'Drop a PEFT adapter here'),
    h('div', { class: 'muted' }, 'the files save_pretrained wrote (adapter_config.json, adapter_model.safetensors), their folder, or one .tar.gz / .zip'),
    h('div', { class: 'dropzone-actions' },
      h('button', { type: 'button', class: 'btn btn-small', onclick: () => fileInput.click() }, 'Choose files…'),
      h('button', { type: 'button', class: 'btn btn-small', onclick: () => folderInput.click() }, 'Choose a folder…')));
  const filesPanel = h('div', { class: 'panel', id: 'files-panel' },
    h('div', { class: 'dropzone-wrap' }, zone, errorSlot('files')), fileList, fileInput, folderInput);

  function setFiles(entries) {
    state.files = entries;
    readConfigKeys(entries);
    clearErrors();
    clear(fileList, entries.map((entry) => h('div', { class: 'file-row', dataset: { file: entry.path } },
      h('span', { class: 'file-name' }, entry.path),
      isArchive(entries) ? h('span', { class: 'badge' }, 'archive') : null,
      h('span', { class: 'muted num' }, bytes(entry.file.size)),
      h('button', { type: 'button', class: 'btn btn-ghost btn-small', 'aria-label': `remove ${entry.path}`, onclick: () => setFiles(state.files.filter((e) => e !== entry)) }, '✕'),
      errorSlot(`file:${entry.path}`))));
    const total = entries.reduce((sum, e) => sum + e.file.size, 0);
    if (total > session.max_upload_bytes) showError('files', `These files are ${bytes(total)}; the server takes at most ${bytes(session.max_upload_bytes)}.`);
  }

  zone.addEventListener('dragover', (event) => {
    event.preventDefault();
    zone.classList.add('over');
  });
  zone.addEventListener('dragleave', () => zone.classList.remove('over'));
  zone.addEventListener('drop', async (event) => {
    event.preventDefault();
    zone.classList.remove('over');
    setFiles(await droppedFiles(event.dataTransfer));
  });
  fileInput.addEventListener('change', () => setFiles([...fileInput.files].map((file) => ({ file, path: file.name }))));
  folderInput.addEventListener('change', () => setFiles([...folderInput.files].map((file) => ({ file, path: file.webkitRelativePath || file.name }))));

  // --- template ---
  const editor = templateEditor(field, errorSlot);
  const templatePanel = editor.node;

  // --- tabs, submit, progress ---
  const tabs = ['files', 'template'].map((mode) => h('button', {
    type: 'button', role: 'tab', class: 'tab', id: `tab-${mode}`,
    onclick: () => setMode(mode),
  }, mode === 'files' ? 'PEFT files or archive' : 'Template'));
  function setMode(mode) {
    state.mode = mode;
    clearErrors();
    tabs.forEach((tab) => tab.classList.toggle('active', tab.id === `tab-${mode}`));
    filesPanel.hidden = mode !== 'files';
    templatePanel.hidden = mode !== 'template';
  }
  const bar = h('progress', { max: '1', value: '0', id: 'upload-progress' });
  const progressText = h('span', { class: 'muted', id: 'upload-status' });
  const progress = h('div', { class: 'progress', hidden: true }, bar, progressText);
  const submit = h('button', { type: 'submit', class: 'btn btn-primary', id: 'upload-submit' }, 'Upload');

  const form = h('form', { class: 'card form', id: 'upload-form', novalidate: true },
    h('div', { class: 'two-col' },
      field('Task id', taskId, 'task_id', 'letters, digits, . _ - ; uploading to an existing task adds a version'),
      field('Description', description, 'description')),
    h('div', { class: 'tabs', role: 'tablist' }, tabs),
    filesPanel, templatePanel,
    h('div', { class: 'form-foot' }, progress, h('span', { class: 'grow' }), submit));

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (state.busy) return;
    clearErrors();
    const id = taskId.value.trim();
    if (!id) return showError('task_id', 'Give the task an id.');
    let body;
    if (state.mode === 'files') {
      if (!state.files.length) return showError('files', 'Drop or choose the adapter files first.');
      body = new FormData();
      if (isArchive(state.files)) body.append('archive', state.files[0].file, basename(state.files[0].path));
      else for (const { file, path } of state.files) body.append('files', file, path);
      if (description.value) body.append('description', description.value);
    } else {
      body = { template: editor.value(), description: description.value || null };
    }
    state.busy = true;
    submit.disabled = true;
    progress.hidden = false;
    bar.value = 0;
    progressText.textContent = 'Uploading…';
    try {
      const created = await upload(id, body, {
        onProgress(sent, total) {
          bar.value = total ? sent / total : 0;
          progressText.textContent = total && sent < total
            ? `Uploading ${bytes(sent)} of ${bytes(total)} (${Math.floor((100 * sent) / total)}%)`
            : 'Validating on the server…';
        },
      });
      toast(created.unchanged
        ? `Identical to ${created.task_id} v${created.version}, the current version: nothing stored`
        : `Uploaded ${created.task_id} v${created.version}`);
      location.hash = route(['tasks', created.task_id]);
    } catch (error) {
      progress.hidden = true;
      // a template's problems come one per field, joined by '; '; a file's message is one sentence
      const parts = state.mode === 'template' ? error.message.split('; ') : [error.message];
      for (const part of parts) showError(placeOf(part, error.message), part);
    } finally {
      state.busy = false;
      submit.disabled = false;
    }
  });

  /** The field a server message names. */
  function placeOf(part, whole) {
    if (/task id/i.test(whole)) return 'task_id';
    if (/^description\b/.test(part)) return 'description';
    if (state.mode === 'template') return templateField(part) ?? 'template';
    const file = fileFor(whole, state.files);
    return file ? `file:${file.path}` : 'files';
  }

  container.append(
    h('div', { class: 'page-head' }, h('h1', {}, 'Upload a task version')),
    form);
  setMode('files');
}

// What the upload page knows about files: reading a drop (files or whole folders), spotting an archive, and
// matching a server message to the file or template field it names.

const ARCHIVE = /\.(zip|tar\.gz|tgz)$/i;
const CONFIG = 'adapter_config.json';
const WEIGHTS = 'adapter_model.safetensors';
const TEMPLATE_FIELDS = /(?:^|[\s.:])(examples\.\d+\.(?:input|output)|examples|system|instruction|input_prefix|input_suffix|chat)(?:\.\w+)*\s*:/;

export const basename = (path) => path.slice(path.lastIndexOf('/') + 1);

export const isArchive = (entries) => entries.length === 1 && ARCHIVE.test(entries[0].path);

/** [{file, path}] from a drop: plain files, or every file under a dropped folder (path relative to the drop). */
export async function droppedFiles(transfer) {
  // entries must be taken while the drop event is being dispatched: the list is emptied after it
  const entries = [...(transfer.items ?? [])].map((item) => item.webkitGetAsEntry?.()).filter(Boolean);
  if (!entries.length) return [...transfer.files].map((file) => ({ file, path: file.name }));
  const found = [];
  for (const entry of entries) found.push(...(await walk(entry, '')));
  return found;
}

async function walk(entry, prefix) {
  if (entry.isFile) {
    const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
    return [{ file, path: prefix + entry.name }];
  }
  const reader = entry.createReader();
  const found = [];
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!batch.length) return found; // readEntries answers in batches until an empty one
    for (const child of batch) found.push(...(await walk(child, `${prefix}${entry.name}/`)));
  }
}

/** Remember the top-level keys of a dropped adapter_config.json: a message naming one of them is about it. */
export function readConfigKeys(entries) {
  for (const entry of entries.filter((e) => basename(e.path) === CONFIG)) {
    entry.keys = [];
    entry.file.text().then((text) => {
      const parsed = JSON.parse(text);
      if (parsed && typeof parsed === 'object') entry.keys = Object.keys(parsed);
    }).catch(() => {});
  }
}

/**
 * The file a server message is about: the archive when one was sent, else the file it names (by path or base
 * name), else the weights for a tensor, else the config when it names one of its keys.
 */
export function fileFor(message, entries) {
  if (isArchive(entries)) return entries[0];
  const byName = [...entries].sort((a, b) => b.path.length - a.path.length)
    .find((e) => message.includes(e.path) || message.includes(basename(e.path)));
  if (byName) return byName;
  if (/\btensors?\b/.test(message)) return entries.find((e) => basename(e.path) === WEIGHTS) ?? null;
  const config = entries.find((e) => basename(e.path) === CONFIG);
  const words = new Set(message.split(/[^A-Za-z0-9_]+/));
  return config?.keys?.some((key) => words.has(key)) ? config : null;
}

/** The template field a message part names ("examples.0.output: Field required" -> examples.0.output). */
export function templateField(part) {
  return TEMPLATE_FIELDS.exec(part)?.[1] ?? null;
}

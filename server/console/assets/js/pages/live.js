// The live view: GET /v1/stats every few seconds (the numbers of /metrics), turned into rates and charts.
//
// Counters are per replica and since its start, so rates come from two samples of the same `instance`. Behind the
// proxy, polls reach different replicas: the view keeps the latest numbers of every replica heard from in the last
// 30 s and shows their sum (latencies: the mean over all their tokens, and the worst p95).

import { api } from '../api.js';
import { h, clear, bytes, count, duration } from '../dom.js';
import { lineChart } from '../chart.js';

const PERIODS = [1, 2, 5, 10];
const FORGET_AFTER = 30; // seconds without news from a replica
const WINDOW = 120; // seconds shown

export function render(container) {
  const replicas = new Map(); // instance -> {sample, derived, seen}
  let period = 2;
  let timer = null;
  let disposed = false;

  const ms = (v) => duration(v);
  const charts = {
    throughput: lineChart({ title: 'Throughput (tokens/s)', series: [{ name: 'generated' }, { name: 'prompt' }], format: (v) => v.toFixed(v < 10 ? 1 : 0), window: WINDOW }),
    batch: lineChart({ title: 'Batch', series: [{ name: 'running rows' }, { name: 'queued requests' }], format: (v) => String(Math.round(v)), window: WINDOW, floor: 2 }),
    kv: lineChart({ title: 'KV cache (tokens)', series: [{ name: 'in use' }], format: (v) => count(Math.round(v)), window: WINDOW, floor: 2 }),
    ttft: lineChart({ title: 'Time to first token', series: [{ name: 'mean' }, { name: 'p95' }], format: ms, window: WINDOW, floor: 0.01 }),
    itl: lineChart({ title: 'Inter-token latency', series: [{ name: 'mean' }, { name: 'p95' }], format: ms, window: WINDOW, floor: 0.001 }),
    residency: lineChart({ title: 'Adapter bytes', series: [{ name: 'device' }, { name: 'host' }], format: bytes, window: WINDOW, floor: 1024 }),
  };
  for (const [name, chart] of Object.entries(charts)) chart.node.id = `chart-${name}`;
  const tiles = h('div', { class: 'tiles', id: 'tiles' });
  const status = h('span', { class: 'muted', id: 'live-status' }, 'Waiting for the first sample…');
  const every = h('select', { class: 'input narrow', id: 'refresh', 'aria-label': 'refresh period' },
    PERIODS.map((p) => h('option', { value: String(p), selected: p === period }, `every ${p} s`)));
  every.addEventListener('change', () => {
    period = Number(every.value);
    schedule(0);
  });

  container.append(
    h('div', { class: 'page-head' }, h('h1', {}, 'Live'), h('div', { class: 'actions' }, status, every)),
    tiles,
    h('div', { class: 'charts' }, Object.values(charts).map((c) => c.node)));

  async function poll() {
    try {
      const sample = await api('v1/stats');
      if (disposed) return;
      absorb(sample);
      draw();
    } catch (error) {
      if (!disposed) status.textContent = `Cannot read /v1/stats: ${error.message}`;
    }
    schedule(period * 1000);
  }

  function schedule(delay) {
    clearTimeout(timer);
    if (!disposed) timer = setTimeout(poll, delay);
  }

  function absorb(sample) {
    const previous = replicas.get(sample.instance)?.sample;
    replicas.set(sample.instance, { sample, derived: previous ? derive(previous, sample) : null, seen: Date.now() / 1000 });
    for (const [instance, entry] of replicas) {
      if (Date.now() / 1000 - entry.seen > FORGET_AFTER) replicas.delete(instance);
    }
  }

  function draw() {
    const now = Date.now() / 1000;
    const entries = [...replicas.values()];
    const sum = (f) => entries.reduce((total, e) => total + f(e.sample), 0);
    const rated = entries.filter((e) => e.derived);
    const rate = (f) => (rated.length ? rated.reduce((total, e) => total + f(e.derived), 0) : null);
    const latency = (which) => {
      const counted = rated.filter((e) => e.derived[which].count > 0);
      if (!counted.length) return [null, null];
      const n = counted.reduce((t, e) => t + e.derived[which].count, 0);
      const mean = counted.reduce((t, e) => t + e.derived[which].sum, 0) / n;
      return [mean, Math.max(...counted.map((e) => e.derived[which].p95))];
    };
    charts.throughput.push(now, [rate((d) => d.completionRate), rate((d) => d.promptRate)]);
    charts.batch.push(now, [sum((s) => s.running_rows), sum((s) => s.queued_requests)]);
    charts.kv.push(now, [sum((s) => s.kv_tokens)]);
    charts.ttft.push(now, latency('ttft'));
    charts.itl.push(now, latency('itl'));
    charts.residency.push(now, [sum((s) => s.adapter_bytes.device), sum((s) => s.adapter_bytes.host)]);
    const tile = (label, value, id) => h('div', { class: 'tile', dataset: { tile: id } }, h('div', { class: 'label' }, label), h('div', { class: 'value' }, value));
    clear(tiles,
      tile('Running rows', `${count(sum((s) => s.running_rows))} / ${count(sum((s) => s.max_batch_size))}`, 'rows'),
      tile('Queued', count(sum((s) => s.queued_requests)), 'queued'),
      tile('KV tokens', `${count(sum((s) => s.kv_tokens))} / ${count(sum((s) => s.max_kv_tokens))}`, 'kv'),
      tile('Resident tasks', count(sum((s) => s.resident_tasks)), 'resident'),
      tile('Device adapters', `${bytes(sum((s) => s.adapter_bytes.device))} / ${bytes(sum((s) => s.adapter_budget_bytes.device))}`, 'device'),
      tile('Loads · evictions', `${count(sum((s) => s.adapter_loads))} · ${count(sum((s) => s.adapter_evictions))}`, 'loads'),
      tile('Tokens generated', count(sum((s) => s.completion_tokens)), 'generated'));
    status.textContent = `${entries.length} replica${entries.length === 1 ? '' : 's'} · updated ${new Date().toLocaleTimeString()}`;
  }

  poll();
  return { dispose: () => { disposed = true; clearTimeout(timer); } };
}

/** Rates and interval latencies between two samples of one replica. */
function derive(before, after) {
  const restarted = after.started_at !== before.started_at; // counters began again at zero
  const base = restarted ? null : before;
  const seconds = Math.max(after.time - (base?.time ?? after.started_at), 1e-3);
  return {
    completionRate: (after.completion_tokens - (base?.completion_tokens ?? 0)) / seconds,
    promptRate: (after.prompt_tokens - (base?.prompt_tokens ?? 0)) / seconds,
    ttft: interval(base?.time_to_first_token, after.time_to_first_token),
    itl: interval(base?.inter_token_latency, after.inter_token_latency),
  };
}

/** Count, sum and p95 of the observations between two histogram readings (cumulative buckets). */
function interval(before, after) {
  const count = after.count - (before?.count ?? 0);
  const sum = after.sum - (before?.sum ?? 0);
  const buckets = after.buckets.map(([le, c], i) => [le, c - (before?.buckets[i]?.[1] ?? 0)]);
  return { count, sum, p95: quantile(buckets, count, 0.95) };
}

function quantile(buckets, total, q) {
  if (total <= 0) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const [le, cumulative] of buckets) {
    if (cumulative >= rank) return lower + ((le - lower) * (rank - below)) / Math.max(cumulative - below, 1e-9);
    lower = le;
    below = cumulative;
  }
  return lower; // past the last finite bucket: its bound is the best lower estimate
}

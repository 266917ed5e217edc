// A small SVG line chart: a rolling window of samples, one line per series, a few gridlines. Hand-written (about
// a hundred lines) rather than a vendored charting library: the live view needs nothing more.

import { h, svg, clear } from './dom.js';

const WIDTH = 480;
const HEIGHT = 150;
const PAD = { left: 52, right: 10, top: 10, bottom: 22 };

/**
 * lineChart({title, series: [{name}], format, window}) -> {node, push(time, values)}. Colours come from the
 * stylesheet (.line-0, .swatch-0, ...): the page's CSP allows no inline style.
 * `values` holds one number (or null: no data) per series; `format` renders a value for the axis and legend.
 */
export function lineChart({ title, series, format = String, window = 120, floor = 0 }) {
  const samples = [];
  const plot = svg('svg', { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: 'chart-svg', role: 'img', 'aria-label': title });
  const legend = h('div', { class: 'chart-legend' });
  const node = h('section', { class: 'card chart', dataset: { samples: '0' } },
    h('h2', { class: 'card-title' }, title), legend, plot);

  function draw() {
    const now = samples.length ? samples[samples.length - 1].time : 0;
    const start = now - window;
    const values = samples.flatMap((s) => s.values.filter((v) => v !== null));
    const top = niceCeiling(Math.max(floor, ...values, 0));
    const x = (t) => PAD.left + ((t - start) / window) * (WIDTH - PAD.left - PAD.right);
    const y = (v) => HEIGHT - PAD.bottom - (v / (top || 1)) * (HEIGHT - PAD.top - PAD.bottom);
    const parts = [];
    for (const fraction of [0, 0.5, 1]) {
      const value = top * fraction;
      parts.push(svg('line', { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(value), y2: y(value), class: 'grid' }));
      parts.push(svg('text', { x: PAD.left - 6, y: y(value) + 4, class: 'axis', 'text-anchor': 'end' }, format(value)));
    }
    parts.push(svg('text', { x: PAD.left, y: HEIGHT - 4, class: 'axis' }, `−${Math.round(window / 60)} min`));
    parts.push(svg('text', { x: WIDTH - PAD.right, y: HEIGHT - 4, class: 'axis', 'text-anchor': 'end' }, 'now'));
    series.forEach((s, i) => {
      // a gap (null) breaks the line; a lone sample between gaps is drawn as a dot
      for (const run of runs(samples, i)) {
        const points = run.map((p) => [x(p.time).toFixed(1), y(p.values[i]).toFixed(1)]);
        if (points.length === 1) parts.push(svg('circle', { cx: points[0][0], cy: points[0][1], r: 2.5, class: `dot dot-${i}` }));
        else parts.push(svg('polyline', { points: points.map((p) => p.join(',')).join(' '), class: `line line-${i}` }));
      }
    });
    clear(plot, parts);
    // the legend shows each series' latest value in the window (an interval with no data keeps the one before)
    clear(legend, series.map((s, i) => {
      const latest = samples.findLast((p) => p.values[i] !== null);
      return h('span', { class: 'legend-item' }, h('span', { class: `swatch swatch-${i}` }), `${s.name} `,
        h('strong', { class: 'legend-value', dataset: { series: s.name } }, latest ? format(latest.values[i]) : '—'));
    }));
  }

  function push(time, values) {
    samples.push({ time, values });
    while (samples.length && samples[0].time < time - window) samples.shift();
    node.dataset.samples = String(Number(node.dataset.samples) + 1);
    draw();
  }

  draw();
  return { node, push };
}

/** The samples of series `i` cut into runs without a missing value. */
function runs(samples, i) {
  const found = [[]];
  for (const sample of samples) {
    if (sample.values[i] === null) found.push([]);
    else found[found.length - 1].push(sample);
  }
  return found.filter((run) => run.length);
}

/** The smallest 1, 2 or 5 times a power of ten at or above `value`: round numbers on the axis. */
function niceCeiling(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) {
    if (step * power >= value) return step * power;
  }
  return 10 * power;
}

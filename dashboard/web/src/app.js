// The gateway dashboard: pool map, spend, live requests, rules and limits. Reads only
// the documented admin API (docs/gateway.md): /api/status, /api/exits, /api/market,
// /api/spend, /api/requests, /api/events (SSE), /api/limits, /api/sessions, /api/config.
import uPlot from 'uplot';
import world from '../gen/world.json';
import { getJson, el, card, fillTable, tokens, fmtTokens, fmtSecs, showError, every, ticks, timeScale } from './common.js';

const SVG = 'http://www.w3.org/2000/svg';
const byCode = new Map(world.map((c) => [c.code, c]));
const MAX_ROWS = 200;

function drawLand() {
  const g = document.getElementById('land');
  for (const c of world) {
    const p = document.createElementNS(SVG, 'path');
    p.setAttribute('d', c.d);
    p.setAttribute('data-country', c.code);
    const t = document.createElementNS(SVG, 'title');
    t.textContent = c.name;
    p.appendChild(t);
    g.appendChild(p);
  }
}

function country(exit) {
  return (exit.attrs && exit.attrs.country) || '';
}

async function refreshPool() {
  const { exits } = await getJson('/api/exits');
  // One marker per country with live exits; its tooltip lists them.
  const groups = new Map();
  for (const x of exits) {
    const cc = country(x);
    if (!cc) continue;
    if (!groups.has(cc)) groups.set(cc, []);
    groups.get(cc).push(x);
  }
  const markers = document.getElementById('markers');
  const frag = document.createDocumentFragment();
  for (const p of document.querySelectorAll('#land path.rented')) p.classList.remove('rented');
  for (const [cc, list] of groups) {
    const c = byCode.get(cc);
    if (!c) continue;
    const land = document.querySelector(`#land path[data-country="${cc}"]`);
    if (land) land.classList.add('rented');
    const healthy = list.filter((x) => x.healthy).length;
    const circle = document.createElementNS(SVG, 'circle');
    circle.setAttribute('cx', c.at[0]);
    circle.setAttribute('cy', c.at[1]);
    circle.setAttribute('r', String(4 + Math.min(6, list.length)));
    circle.setAttribute('class', healthy ? 'marker' : 'marker unhealthy');
    circle.setAttribute('data-country', cc);
    const t = document.createElementNS(SVG, 'title');
    t.textContent = `${c.name}: ${list.length} exit(s), ${healthy} healthy\n` + list.map((x) => `${x.id} ${x.healthy ? 'ok' : 'down'} ${x.latency_ewma_ms ? Math.round(x.latency_ewma_ms) + ' ms' : ''} ${x.requests} req`).join('\n');
    circle.appendChild(t);
    frag.appendChild(circle);
    const label = document.createElementNS(SVG, 'text');
    label.setAttribute('x', c.at[0] + 8);
    label.setAttribute('y', c.at[1] + 3);
    label.setAttribute('class', 'marker-label');
    label.textContent = `${cc.toUpperCase()} ${list.length}`;
    frag.appendChild(label);
  }
  markers.replaceChildren(frag);
  fillTable(
    document.querySelector('#exits tbody'),
    exits.map((x) => [
      x.id,
      country(x).toUpperCase(),
      (x.attrs && x.attrs.type) || '',
      x.path ? `tunnel (${x.path})` : x.transport || '',
      x.healthy ? { text: 'healthy', cls: 'ok' } : { text: 'down', cls: 'bad' },
      x.latency_ewma_ms ? `${Math.round(x.latency_ewma_ms)} ms` : '',
      x.requests,
      x.in_flight,
      x.failures,
      x.bans.length ? x.bans.map((b) => `${typeof b.scope === 'string' ? b.scope : JSON.stringify(b.scope)} ${fmtSecs(b.remaining_ms / 1000)}`).join(', ') : '',
    ]),
    (i) => ({ 'data-exit': exits[i].id }),
  );
}

async function refreshStatus() {
  const s = await getJson('/api/status');
  document.getElementById('status').textContent =
    `config generation ${s.generation} · ${s.open_connections} open connections · ${s.requests_total} requests · ${s.exits} configured exits` +
    (s.last_reload_error ? ` · last reload failed: ${s.last_reload_error}` : '');
}

let chart = null;

async function refreshSpend() {
  const spend = await getJson('/api/spend');
  if (!spend.market) {
    document.getElementById('spend-summary').replaceChildren(el('p', 'No [market] in the config: nothing is rented.', { class: 'muted' }));
    return;
  }
  const caps = spend.caps || {};
  const last = spend.points.length ? spend.points[spend.points.length - 1] : {};
  document.getElementById('spend-summary').replaceChildren(
    card('spent in the last hour', fmtTokens(last.spent_last_hour) + (caps.max_spend_per_hour ? ` / ${fmtTokens(caps.max_spend_per_hour)}` : '')),
    card('spent in total', fmtTokens(last.spent_total) + (caps.max_spend_total ? ` / ${fmtTokens(caps.max_spend_total)}` : '')),
    card('paid (proofs accepted)', fmtTokens(last.paid_total)),
    card('channels open', last.channels_open ?? 0),
  );
  const xs = spend.points.map((p) => p.t);
  const data = [xs, spend.points.map((p) => tokens(p.spent_total)), spend.points.map((p) => tokens(p.spent_last_hour)), spend.points.map((p) => tokens(p.paid_total))];
  const series = [{}, { label: 'spent total', stroke: '#2563eb', width: 2 }, { label: 'spent last hour', stroke: '#f59e0b', width: 2 }, { label: 'paid', stroke: '#2e7d32', width: 2 }];
  if (caps.max_spend_per_hour) {
    data.push(xs.map(() => tokens(caps.max_spend_per_hour)));
    series.push({ label: 'hourly cap', stroke: '#c62828', dash: [6, 4] });
  }
  if (caps.max_spend_total) {
    data.push(xs.map(() => tokens(caps.max_spend_total)));
    series.push({ label: 'total cap', stroke: '#7b1fa2', dash: [6, 4] });
  }
  const box = document.getElementById('spend-chart');
  if (!chart || chart.series.length !== series.length) {
    if (chart) chart.destroy();
    chart = new uPlot({ width: Math.max(320, Math.min(960, box.clientWidth || 960)), height: 260, series, axes: [{}, { label: 'tokens', values: ticks }], scales: { x: timeScale }, points: { show: true } }, data, box);
  } else {
    chart.setData(data);
  }
  box.setAttribute('data-points', String(xs.length));
  const m = await getJson('/api/market');
  fillTable(
    document.querySelector('#deals tbody'),
    m.deals.map((d) => [d.deal, d.exit, (d.country || '').toUpperCase(), d.phase, fmtTokens(d.price_per_ip_second), fmtTokens(d.value), fmtTokens(d.paid), fmtSecs(d.ends_in_s), d.note || '']),
  );
}

function requestRow(ev) {
  const tr = el('tr', null, { 'data-exit': ev.exit || '', 'data-status': String(ev.status) });
  const t = new Date(ev.time_ms);
  const cells = [t.toLocaleTimeString(), ev.account, ev.protocol, ev.host, ev.exit || '—', ev.status, `${ev.latency_ms} ms`];
  cells.forEach((c, i) => tr.appendChild(el('td', c, i === 5 && ev.status >= 400 ? { class: 'bad' } : undefined)));
  return tr;
}

function addRequests(events) {
  const tbody = document.querySelector('#requests tbody');
  for (const ev of events) tbody.prepend(requestRow(ev));
  while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(-1);
}

let lastSeq = 0;
function startLive() {
  const state = document.getElementById('live-state');
  getJson('/api/requests')
    .then(({ requests }) => {
      addRequests(requests.filter((r) => r.seq > lastSeq));
      if (requests.length) lastSeq = Math.max(lastSeq, requests[requests.length - 1].seq);
    })
    .catch((e) => showError(String(e.message || e)));
  const es = new EventSource(location.origin + '/api/events');
  es.addEventListener('request', (m) => {
    const ev = JSON.parse(m.data);
    if (ev.seq <= lastSeq) return;
    lastSeq = ev.seq;
    addRequests([ev]);
  });
  es.onopen = () => { state.textContent = 'streaming (newest first, last 200 kept)'; };
  es.onerror = () => { state.textContent = 'stream interrupted; reconnecting…'; };
}

async function refreshRules() {
  const [limits, sessions, config] = await Promise.all([getJson('/api/limits'), getJson('/api/sessions'), getJson('/api/config')]);
  document.getElementById('limits').textContent = JSON.stringify(limits, null, 2);
  fillTable(
    document.querySelector('#sessions tbody'),
    sessions.sessions.map((s) => [s.token_hint, s.session, s.exit, fmtSecs(s.remaining_ms / 1000)]),
  );
  document.getElementById('config').textContent = JSON.stringify(config, null, 2);
}

drawLand();
every(3000, refreshStatus);
every(3000, refreshPool);
every(5000, refreshSpend);
every(10000, refreshRules);
startLive();
showError('');

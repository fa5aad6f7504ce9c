// The provider's earnings page, served by `ipsx provider` on its status listener. Reads
// only GET /api/status (ProviderStatus, docs/provider.md).
import uPlot from 'uplot';
import { getJson, card, fillTable, fmtSecs, every, ticks, timeScale } from './common.js';

const MAX_POINTS = 720; // an hour at 5 s
const series = { t: [], earned: [], claimed: [], unclaimed: [] };
let chart = null;

const tok = (a) => (a && a.tokens !== undefined ? Number(a.tokens) : 0);
const fmt = (a) => (a && a.tokens !== undefined ? a.tokens : '0');
function bytes(n) {
  n = Number(n || 0);
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

async function refresh() {
  const s = await getJson('/api/status');
  const t = s.totals || {};
  document.getElementById('status').textContent = `wallet ${s.wallet} · NAT path ${s.nat_path} · status version ${s.version}`;
  document.getElementById('cards').replaceChildren(
    card('earned (verified proofs)', fmt(t.earned)),
    card('claimed on chain', fmt(t.claimed)),
    card('unclaimed', fmt(t.unclaimed)),
    card('bytes served (up / down)', `${bytes(t.bytes_up)} / ${bytes(t.bytes_down)}`),
    card('live deals', t.live_deals ?? 0),
    card('NAT path', s.nat_path || ''),
  );
  series.t.push(Math.round((s.generated_unix_ms || Date.now()) / 1000));
  series.earned.push(tok(t.earned));
  series.claimed.push(tok(t.claimed));
  series.unclaimed.push(tok(t.unclaimed));
  for (const k of Object.keys(series)) if (series[k].length > MAX_POINTS) series[k].shift();
  const data = [series.t, series.earned, series.claimed, series.unclaimed];
  const box = document.getElementById('earnings-chart');
  if (!chart) {
    chart = new uPlot({
      width: Math.max(320, Math.min(960, box.clientWidth || 960)),
      height: 240,
      series: [{}, { label: 'earned', stroke: '#2563eb', width: 2 }, { label: 'claimed', stroke: '#2e7d32', width: 2 }, { label: 'unclaimed', stroke: '#f59e0b', width: 2 }],
      axes: [{}, { label: 'tokens', values: ticks }],
      scales: { x: timeScale },
      points: { show: true },
    }, data, box);
  } else {
    chart.setData(data);
  }
  box.setAttribute('data-points', String(series.t.length));
  const now = Date.now() / 1000;
  fillTable(
    document.querySelector('#deals tbody'),
    (s.deals || []).map((d) => [d.id, d.requester, d.exit_address, d.stage, d.live ? fmtSecs(d.ends - now) : '', bytes(d.bytes_up), bytes(d.bytes_down), fmt(d.paid), fmt(d.claimed), fmt(d.unclaimed), d.end_reason || '']),
    (i) => ({ 'data-deal': String(s.deals[i].id) }),
  );
  fillTable(
    document.querySelector('#offers tbody'),
    (s.offers || []).map((o) => [o.exit_address, o.endpoint, (o.country || '').toUpperCase(), o.type || '', fmt(o.price_per_ip_second), o.capacity, o.live_deals, o.flows_live, o.flows_limited]),
  );
}

every(5000, refresh);

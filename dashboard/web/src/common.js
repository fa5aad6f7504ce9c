// Helpers shared by the gateway dashboard and the provider page.

/** GET a JSON endpoint of the same origin (credentials the browser holds go along). */
export async function getJson(path) {
  const r = await fetch(location.origin + path, { credentials: 'same-origin', cache: 'no-store' });
  if (!r.ok) {
    const e = new Error(`${path}: HTTP ${r.status}`);
    e.status = r.status;
    throw e;
  }
  return r.json();
}

/** An element with text content and attributes. */
export function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

/** A labelled figure for a row of cards. */
export function card(label, value) {
  const d = el('div', null, { class: 'card' });
  d.append(el('span', label, { class: 'muted' }), el('b', value));
  return d;
}

/** uPlot axis tick labels with three significant digits (token amounts are small). */
export const ticks = (u, vals) => vals.map((v) => +v.toPrecision(3));

/** uPlot time scale: a lone sample shows the minute before it, not years around it. */
export const timeScale = { time: true, range: (u, min, max) => (min === max ? [min - 60, max + 5] : [min, max]) };

/** Replaces a table body's rows: `rows` is a list of lists of cells (text or {text, cls}). */
export function fillTable(tbody, rows, rowAttrs) {
  const frag = document.createDocumentFragment();
  rows.forEach((cells, i) => {
    const tr = el('tr', null, rowAttrs ? rowAttrs(i) : undefined);
    for (const c of cells) {
      const td = typeof c === 'object' && c !== null ? el('td', c.text, c.cls ? { class: c.cls } : undefined) : el('td', c);
      tr.appendChild(td);
    }
    frag.appendChild(tr);
  });
  tbody.replaceChildren(frag);
}

/** Token base units (18 decimals, a decimal string) as a number of tokens. */
export function tokens(units) {
  if (units === undefined || units === null) return 0;
  try {
    const v = BigInt(units);
    return Number(v / 1000000000000n) / 1e6;
  } catch {
    return 0;
  }
}

export function fmtTokens(units) {
  const t = tokens(units);
  return t.toLocaleString(undefined, { maximumFractionDigits: 6 });
}

export function fmtSecs(s) {
  if (s === undefined || s === null) return '';
  s = Math.max(0, Math.round(s));
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

export function showError(msg) {
  const box = document.getElementById('error');
  if (!box) return;
  box.hidden = !msg;
  box.textContent = msg || '';
}

/** Runs `fn` now and every `ms`, showing (not throwing) its errors. */
export function every(ms, fn) {
  const run = async () => {
    try {
      await fn();
    } catch (e) {
      showError(String(e.message || e));
    }
  };
  run();
  return setInterval(run, ms);
}

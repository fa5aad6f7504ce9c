// Builds the dashboard into dist/: projects the world-atlas TopoJSON to SVG paths once
// (equirectangular, 720x300 px, Antarctica left out), bundles the pages' scripts with
// esbuild and copies the HTML and CSS. `npm ci && npm run build` (scripts/install-dashboard.sh).
import { build } from 'esbuild';
import { mkdirSync, readFileSync, writeFileSync, copyFileSync, rmSync } from 'node:fs';
import { feature } from 'topojson-client';

const here = new URL('.', import.meta.url).pathname;
const dist = here + 'dist/';
const gen = here + 'gen/';
rmSync(dist, { recursive: true, force: true });
mkdirSync(dist, { recursive: true });
mkdirSync(gen, { recursive: true });

// --- the map: one SVG path and one marker point per country, keyed by ISO alpha-2 ---
const topo = JSON.parse(readFileSync(here + 'node_modules/world-atlas/countries-110m.json', 'utf8'));
const alpha2 = JSON.parse(readFileSync(here + 'src/iso3166-numeric.json', 'utf8'));
const K = 2; // px per degree
const px = ([lon, lat]) => [Math.round((lon + 180) * K * 10) / 10, Math.round((84 - lat) * K * 10) / 10];
const ringArea = (r) => {
  let a = 0;
  for (let i = 0, j = r.length - 1; i < r.length; j = i++) a += (r[j][0] * r[i][1] - r[i][0] * r[j][1]);
  return a / 2;
};
const ringCentroid = (r) => {
  let x = 0, y = 0, a = 0;
  for (let i = 0, j = r.length - 1; i < r.length; j = i++) {
    const f = r[j][0] * r[i][1] - r[i][0] * r[j][1];
    x += (r[j][0] + r[i][0]) * f; y += (r[j][1] + r[i][1]) * f; a += f;
  }
  return a === 0 ? r[0] : [x / (3 * a), y / (3 * a)];
};
const countries = [];
for (const f of feature(topo, topo.objects.countries).features) {
  const code = alpha2[f.id];
  if (!code || code === 'aq') continue;
  const polys = f.geometry.type === 'Polygon' ? [f.geometry.coordinates] : f.geometry.coordinates;
  let d = '';
  let best = null;
  for (const poly of polys) {
    for (const ring of poly) {
      let prev = null;
      for (const p of ring) {
        const [x, y] = px(p);
        // A jump across the antimeridian starts a new sub-path instead of a line across.
        d += (prev === null || Math.abs(p[0] - prev[0]) > 180 ? 'M' : 'L') + x + ' ' + y;
        prev = p;
      }
      d += 'Z';
    }
    const area = Math.abs(ringArea(poly[0]));
    if (!best || area > best.area) best = { area, ring: poly[0] };
  }
  const at = px(ringCentroid(best.ring));
  countries.push({ code, name: f.properties.name, d, at });
}
writeFileSync(gen + 'world.json', JSON.stringify(countries));

// --- scripts and pages ---
await build({
  entryPoints: { app: here + 'src/app.js', provider: here + 'src/provider.js' },
  bundle: true,
  minify: true,
  format: 'iife',
  target: ['chrome110', 'firefox110'],
  outdir: dist,
  logLevel: 'warning',
});
const css = readFileSync(here + 'node_modules/uplot/dist/uPlot.min.css', 'utf8') + readFileSync(here + 'src/style.css', 'utf8');
writeFileSync(dist + 'style.css', css);
copyFileSync(here + 'src/index.html', dist + 'index.html');
copyFileSync(here + 'src/provider.html', dist + 'provider.html');
console.log('dashboard built into', dist);

#!/usr/bin/env node
// Compiles the contracts with solc-js (offline, from node_modules) and writes one
// artifact per contract to artifacts/<Name>.json: { contractName, sourceName, compiler,
// sourceHash, abi, bytecode, deployedBytecode }. The Rust crate reads them with `sol!`.
//
//   node build.js           rebuild the artifacts
//   node build.js --check   compile in memory; exit 1 if a committed artifact differs
'use strict';
const fs = require('fs');
const path = require('path');
const crypto = require('crypto');
const solc = require('solc');

const ROOT = __dirname;
const SOURCES = ['src/IPSXToken.sol', 'src/Centralizer.sol', 'test/ReentrantToken.sol'];
const OUT = path.join(ROOT, 'artifacts');
const SETTINGS = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: 'cancun',
  metadata: { bytecodeHash: 'none' },
  outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] } },
};

function findImport(p) {
  for (const base of [ROOT, path.join(ROOT, 'node_modules')]) {
    const full = path.join(base, p);
    if (full.startsWith(base) && fs.existsSync(full)) {
      return { contents: fs.readFileSync(full, 'utf8') };
    }
  }
  return { error: `import not found: ${p}` };
}

function sha256(s) {
  return crypto.createHash('sha256').update(s).digest('hex');
}

function compile() {
  const sources = {};
  for (const s of SOURCES) sources[s] = { content: fs.readFileSync(path.join(ROOT, s), 'utf8') };
  const input = { language: 'Solidity', sources, settings: SETTINGS };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImport }));
  const errors = (output.errors || []).filter((e) => e.severity === 'error');
  // Our own warnings and every error; OpenZeppelin's known notes (e.g. its transient
  // storage reentrancy guard) are not ours to fix.
  const ours = (e) => !(e.sourceLocation && e.sourceLocation.file.startsWith('@openzeppelin/'));
  for (const e of output.errors || []) if (e.severity === 'error' || ours(e)) console.error(e.formattedMessage);
  if (errors.length > 0) process.exit(1);
  const artifacts = {};
  for (const s of SOURCES) {
    for (const [name, c] of Object.entries(output.contracts[s])) {
      artifacts[name] = {
        contractName: name,
        sourceName: s,
        compiler: `solc-js ${solc.version()}`,
        settings: { optimizer: SETTINGS.optimizer, evmVersion: SETTINGS.evmVersion },
        sourceHash: sha256(sources[s].content),
        abi: c.abi,
        bytecode: '0x' + c.evm.bytecode.object,
        deployedBytecode: '0x' + c.evm.deployedBytecode.object,
      };
    }
  }
  return artifacts;
}

const check = process.argv.includes('--check');
const artifacts = compile();
let stale = 0;
if (!check) fs.mkdirSync(OUT, { recursive: true });
for (const [name, a] of Object.entries(artifacts)) {
  const file = path.join(OUT, `${name}.json`);
  const text = JSON.stringify(a, null, 2) + '\n';
  if (check) {
    const old = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
    if (old !== text) {
      console.error(`stale artifact: artifacts/${name}.json differs from ${a.sourceName}; run \`node build.js\``);
      stale++;
    }
  } else {
    fs.writeFileSync(file, text);
    console.log(`wrote artifacts/${name}.json (${(a.deployedBytecode.length - 2) / 2} bytes deployed)`);
  }
}
if (stale > 0) process.exit(1);
if (check) console.log('artifacts match the sources');

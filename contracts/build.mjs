#!/usr/bin/env node
// Compile the reference contracts with the pinned npm `solc` package and write
// deterministic artifacts to contracts/artifacts/<ContractName>.json.
//
//   node contracts/build.mjs           # (re)write artifacts
//   node contracts/build.mjs --check   # compile in memory, exit 1 if any
//                                      # committed artifact differs or is missing
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const require = createRequire(import.meta.url);
const solc = require("solc");

const CONTRACTS_DIR = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.dirname(CONTRACTS_DIR);
const SRC_DIR = path.join(CONTRACTS_DIR, "src");
const ARTIFACTS_DIR = path.join(CONTRACTS_DIR, "artifacts");

// Contracts that get an artifact: name -> source unit (path relative to repo root).
const TARGETS = [
  ["OrderRouter", "contracts/src/gen1/OrderRouter.sol"],
  ["OrderBook", "contracts/src/gen1/OrderBook.sol"],
  ["MultiMarketCaller", "contracts/src/gen1/MultiMarketCaller.sol"], // one transaction, several markets
  ["AluminumOrderBook", "contracts/src/gen2/AluminumOrderBook.sol"],
  ["EventSpammer", "contracts/src/bench/EventSpammer.sol"], // load generator for bench/ only
];

function toPosix(p) {
  return p.split(path.sep).join("/");
}

function listSolFiles(dir) {
  const out = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) out.push(...listSolFiles(full));
    else if (entry.isFile() && entry.name.endsWith(".sol")) out.push(full);
  }
  return out;
}

function compile() {
  const sources = {};
  for (const file of listSolFiles(SRC_DIR).sort()) {
    sources[toPosix(path.relative(ROOT, file))] = { content: readFileSync(file, "utf8") };
  }
  const input = {
    language: "Solidity",
    sources,
    settings: {
      optimizer: { enabled: true, runs: 200 },
      evmVersion: "cancun",
      outputSelection: { "*": { "*": ["abi", "evm.bytecode.object"] } },
    },
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const diagnostics = output.errors ?? [];
  const errors = diagnostics.filter((e) => e.severity === "error");
  for (const w of diagnostics.filter((e) => e.severity !== "error")) {
    process.stderr.write(w.formattedMessage ?? `${w.severity}: ${w.message}\n`);
  }
  if (errors.length > 0) {
    for (const e of errors) process.stderr.write(e.formattedMessage ?? `Error: ${e.message}\n`);
    process.stderr.write(`build.mjs: compilation failed with ${errors.length} error(s)\n`);
    process.exit(2);
  }

  const solcVersion = solc.version().replace(/\.Emscripten\.clang$/, "");
  const artifacts = new Map();
  for (const [name, sourcePath] of TARGETS) {
    const contract = output.contracts?.[sourcePath]?.[name];
    if (!contract) {
      process.stderr.write(`build.mjs: contract ${name} not found in ${sourcePath}\n`);
      process.exit(2);
    }
    const artifact = {
      contractName: name,
      sourcePath,
      solcVersion,
      sourceSha256: createHash("sha256").update(sources[sourcePath].content, "utf8").digest("hex"),
      abi: contract.abi,
      bytecode: "0x" + contract.evm.bytecode.object,
    };
    artifacts.set(name, JSON.stringify(artifact, null, 2) + "\n");
  }
  return artifacts;
}

function main() {
  const args = process.argv.slice(2);
  const check = args.includes("--check");
  const unknown = args.filter((a) => a !== "--check");
  if (unknown.length > 0) {
    process.stderr.write(`usage: node contracts/build.mjs [--check]\n`);
    process.exit(2);
  }

  const artifacts = compile();

  if (check) {
    const stale = [];
    for (const [name, text] of artifacts) {
      const file = path.join(ARTIFACTS_DIR, `${name}.json`);
      const rel = toPosix(path.relative(ROOT, file));
      if (!existsSync(file)) stale.push(`${rel} (missing)`);
      else if (readFileSync(file, "utf8") !== text) stale.push(`${rel} (differs)`);
    }
    if (stale.length > 0) {
      process.stderr.write("Contract artifacts are out of date; run `make contracts`:\n");
      for (const s of stale) process.stderr.write(`  ${s}\n`);
      process.exit(1);
    }
    process.stdout.write(`Contract artifacts up to date (${artifacts.size} checked).\n`);
    return;
  }

  mkdirSync(ARTIFACTS_DIR, { recursive: true });
  for (const [name, text] of artifacts) {
    const file = path.join(ARTIFACTS_DIR, `${name}.json`);
    writeFileSync(file, text);
    process.stdout.write(`wrote ${toPosix(path.relative(ROOT, file))}\n`);
  }
}

main();

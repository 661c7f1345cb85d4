// Compiles Hearth's Solidity sources with the pinned solc-js and OpenZeppelin from node_modules.
//
// Usage: node payments/contracts/compile.mjs [--out DIR] [SOURCE_DIR ...]
// Defaults: sources in payments/contracts, artifacts in payments/contracts/artifacts.
// Writes <Name>.json ({contractName, sourceName, abi, bytecode, deployedBytecode, compiler, settings}) for
// every deployable contract named like its file. Source units are named relative to the repository root
// and imports are read through a callback, so no absolute path reaches the metadata and the output is the
// same byte for byte on every machine.
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const require = createRequire(import.meta.url);
const solc = require("solc");

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const NODE_MODULES = join(ROOT, "node_modules");
// Fixed for reproducible artifacts; changing any of these changes every committed bytecode.
const SETTINGS = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: "cancun",
  metadata: { bytecodeHash: "ipfs", appendCBOR: true },
  outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
};

function parseArgs(argv) {
  let out = join(ROOT, "payments", "contracts", "artifacts");
  const dirs = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--out") out = resolve(argv[++i]);
    else dirs.push(resolve(argv[i]));
  }
  if (dirs.length === 0) dirs.push(join(ROOT, "payments", "contracts"));
  return { out, dirs };
}

function readImport(path) {
  // Package imports (@openzeppelin/...) come from node_modules; everything else is repository-relative.
  const base = path.startsWith("@") ? NODE_MODULES : ROOT;
  try {
    return { contents: readFileSync(join(base, path), "utf8") };
  } catch (err) {
    return { error: `cannot read ${path}: ${err.message}` };
  }
}

function main() {
  const { out, dirs } = parseArgs(process.argv.slice(2));
  const sources = {};
  for (const dir of dirs) {
    for (const file of readdirSync(dir).filter((f) => f.endsWith(".sol")).sort()) {
      const name = relative(ROOT, join(dir, file)).split("\\").join("/");
      sources[name] = { content: readFileSync(join(dir, file), "utf8") };
    }
  }
  const input = { language: "Solidity", sources, settings: SETTINGS };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: readImport }));
  const errors = (output.errors ?? []).filter((e) => e.severity === "error");
  for (const e of output.errors ?? []) process.stderr.write(`${e.formattedMessage}\n`);
  if (errors.length > 0) process.exit(1);

  mkdirSync(out, { recursive: true });
  for (const sourceName of Object.keys(sources)) {
    const contractName = sourceName.split("/").pop().replace(/\.sol$/, "");
    const contract = output.contracts[sourceName]?.[contractName];
    if (!contract || contract.evm.bytecode.object === "") continue; // interfaces have no bytecode
    const artifact = {
      contractName,
      sourceName,
      abi: contract.abi,
      bytecode: `0x${contract.evm.bytecode.object}`,
      deployedBytecode: `0x${contract.evm.deployedBytecode.object}`,
      compiler: { name: "solc", version: solc.version() },
      settings: { optimizer: SETTINGS.optimizer, evmVersion: SETTINGS.evmVersion, metadata: SETTINGS.metadata },
    };
    writeFileSync(join(out, `${contractName}.json`), `${JSON.stringify(artifact, null, 2)}\n`);
    process.stdout.write(`${contractName}: ${contract.evm.deployedBytecode.object.length / 2} bytes\n`);
  }
}

main();

// Checks that the built .wasm imports nothing but wasm-bindgen's own glue module: no WASI, no
// stray `env` imports that a bundler could not satisfy. Prints `check: 1 passed, 0 failed`.
import { readFileSync } from "node:fs";

const file = new URL("./pkg/ivy_client_wasm_bg.wasm", import.meta.url);
const module = new WebAssembly.Module(readFileSync(file));
const imports = WebAssembly.Module.imports(module);
const allowed = new Set(["./ivy_client_wasm_glue_bg.js", "wbg", "__wbindgen_placeholder__", "__wbindgen_externref_xform__"]);
const bad = imports.filter((i) => !allowed.has(i.module));
const modules = [...new Set(imports.map((i) => i.module))];
if (bad.length > 0) {
  console.error("unexpected imports:", bad);
  console.log("check: 0 passed, 1 failed (wasm imports)");
  process.exit(1);
}
console.log(`wasm imports ${imports.length} functions, all from ${modules.join(", ")}`);
console.log("check: 1 passed, 0 failed (wasm imports)");

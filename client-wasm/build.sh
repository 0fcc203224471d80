#!/usr/bin/env bash
# Builds the npm package of the WebAssembly client into client-wasm/pkg/, installing what it
# needs where missing (wasm32 target, the exact wasm-bindgen CLI, wasm-opt from npm's
# binaryen, terser), and prints the gzipped size of what a web app loads.
#
# The package: ivy_client_wasm.js (the entry, from js/: the public API over wasm-bindgen's
# classes) with its types ivy_client_wasm.d.ts (js/, written by hand); ivy_client_wasm_glue.js
# (wasm-bindgen's glue); ivy_client_wasm_wasm.js (the .wasm, gzipped and in base64: inlined,
# so that no bundler or dev server has to find a separate file). All three are minified.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"

WASM_BINDGEN_VERSION=0.2.130   # must equal the `wasm-bindgen = "=..."` pin in client-wasm/Cargo.toml
BINARYEN_VERSION=132
TERSER_VERSION=5.51.2

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown
fi
if ! wasm-bindgen --version 2>/dev/null | grep -qx "wasm-bindgen $WASM_BINDGEN_VERSION"; then
  echo "installing wasm-bindgen-cli $WASM_BINDGEN_VERSION (a few minutes, once)"
  cargo install wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION"
fi
tools="$here/.tools"
if [ ! -x "$tools/node_modules/.bin/wasm-opt" ] || [ ! -x "$tools/node_modules/.bin/terser" ]; then
  echo "installing wasm-opt and terser (npm binaryen@$BINARYEN_VERSION, terser@$TERSER_VERSION)"
  npm install --prefix "$tools" --no-audit --no-fund --silent "binaryen@$BINARYEN_VERSION" "terser@$TERSER_VERSION"
fi

cargo build -p ivy-client-wasm --target wasm32-unknown-unknown --profile wasm-release
target_dir="${CARGO_TARGET_DIR:-$root/target}"
out="$here/pkg"
rm -rf "$out"
wasm-bindgen --target web --out-dir "$out" --out-name ivy_client_wasm_glue \
  "$target_dir/wasm32-unknown-unknown/wasm-release/ivy_client_wasm.wasm"
# --converge repeats -Oz while it still shrinks the module.
"$tools/node_modules/.bin/wasm-opt" -Oz --converge --strip-debug --strip-producers \
  --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext --enable-mutable-globals \
  --enable-reference-types --enable-multivalue \
  -o "$out/ivy_client_wasm_bg.wasm" "$out/ivy_client_wasm_glue_bg.wasm"
rm "$out/ivy_client_wasm_glue_bg.wasm" "$out/ivy_client_wasm_glue_bg.wasm.d.ts" "$out/ivy_client_wasm_glue.d.ts"
# The glue is always given the module's bytes: its fallback, a fetch of
# `new URL("..._bg.wasm", import.meta.url)`, is removed (bundlers would try to resolve it).
glue="$out/ivy_client_wasm_glue.js"
grep -q "new URL('ivy_client_wasm_glue_bg.wasm', import.meta.url)" "$glue"
sed -i "s|new URL('ivy_client_wasm_glue_bg.wasm', import.meta.url)|undefined|" "$glue"
if grep -q "import.meta.url" "$glue"; then echo "build.sh: the glue still refers to import.meta.url" >&2; exit 1; fi
# The .wasm, gzipped, in base64 (decompressed with DecompressionStream when loaded).
printf 'export default "%s";\n' "$(gzip -9 -n -c "$out/ivy_client_wasm_bg.wasm" | base64 -w0)" > "$out/ivy_client_wasm_wasm.js"
cp "$here/js/ivy_client_wasm.js" "$here/js/ivy_client_wasm.d.ts" "$out/"
# Shipped minified, as a bundler would produce them (exports and the .d.ts are unchanged).
for f in ivy_client_wasm.js ivy_client_wasm_glue.js; do
  "$tools/node_modules/.bin/terser" "$out/$f" --module --compress passes=2 --mangle -o "$out/$f"
done

version=$(cargo metadata --no-deps --format-version 1 | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const p=JSON.parse(s).packages.find(p=>p.name==="ivy-client-wasm");process.stdout.write(p.version)})')
cat > "$out/package.json" <<JSON
{
  "name": "ivy-client-wasm",
  "version": "$version",
  "description": "Browser client for Ivy, the hierarchical pub/sub server with persistent event logs (WebAssembly)",
  "license": "MIT OR Apache-2.0",
  "type": "module",
  "main": "./ivy_client_wasm.js",
  "module": "./ivy_client_wasm.js",
  "types": "./ivy_client_wasm.d.ts",
  "exports": {
    ".": {
      "types": "./ivy_client_wasm.d.ts",
      "default": "./ivy_client_wasm.js"
    },
    "./package.json": "./package.json"
  },
  "files": [
    "ivy_client_wasm.js",
    "ivy_client_wasm.d.ts",
    "ivy_client_wasm_glue.js",
    "ivy_client_wasm_wasm.js",
    "README.md"
  ],
  "sideEffects": false,
  "keywords": ["pubsub", "websocket", "realtime", "ivy", "wasm"]
}
JSON
cp "$here/js/README.md" "$out/README.md"
rm -f "$out/.gitignore"

# What a web app loads: the three modules (a bundler joins them), each gzipped as a server
# would send it. The .wasm itself (kept in pkg/ for measurements, not packed) is shown too.
wasm_raw=$(wc -c < "$out/ivy_client_wasm_bg.wasm")
wasm_gz=$(gzip -9 -c "$out/ivy_client_wasm_bg.wasm" | wc -c)
inlined_gz=$(gzip -9 -c "$out/ivy_client_wasm_wasm.js" | wc -c)
glue_gz=$(gzip -9 -c "$out/ivy_client_wasm_glue.js" | wc -c)
api_gz=$(gzip -9 -c "$out/ivy_client_wasm.js" | wc -c)
js_gz=$((glue_gz + api_gz))
echo "package: $out"
echo "size: wasm ${wasm_raw} bytes raw, ${wasm_gz} gzipped, ${inlined_gz} inlined (gzip, base64, gzipped); glue ${js_gz} gzipped (wasm-bindgen ${glue_gz}, API ${api_gz}); total $((inlined_gz + js_gz)) bytes gzipped ($(( (inlined_gz + js_gz + 512) / 1024 )) KiB)"

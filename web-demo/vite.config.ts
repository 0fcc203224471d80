import { defineConfig } from "vite";

// The app is served by ivy-server (`--static-dir web-demo/dist`), next to /ws and /log/.
// `npm run dev` proxies those two to a server on 127.0.0.1:8080 (override with IVY_URL).
const server = process.env.IVY_URL ?? "http://127.0.0.1:8080";

export default defineConfig({
  base: "./",
  build: {
    // Top-level await (the wasm module is initialized before the app starts) and modern
    // syntax without transpiling; every browser that runs WebAssembly with reference types
    // supports es2022.
    target: "es2022",
    assetsInlineLimit: 0,
  },
  server: {
    proxy: {
      "/ws": { target: server.replace(/^http/, "ws"), ws: true },
      "/log": { target: server },
      // The demo-only token endpoint (ivy-server --demo-token-endpoint).
      "/demo": { target: server },
    },
  },
});

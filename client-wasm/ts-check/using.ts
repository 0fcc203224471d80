// `using` with the package's classes, type-checked with `"lib": [..., "esnext.disposable"]`
// (tsconfig.using.json); consumer.ts is checked without that lib.
import { IvyClient } from "ivy-client-wasm";

export function scoped(): void {
  using client = new IvyClient("/");
  using sub = client.subscribe("/chat", (e) => console.log(e.data));
  console.log(sub.path, client.status);
}

// The app is served by syncbridge at /ui (src/control/ui.rs): every asset URL starts there.
import { defineConfig } from "vite";

export default defineConfig({
  base: "/ui/",
  oxc: { jsx: { runtime: "automatic", importSource: "preact" } },
  build: {
    outDir: "dist",
    emptyOutDir: true,
    // Small enough to inline nothing: the CSP allows files from this origin only.
    assetsInlineLimit: 0,
    sourcemap: false,
    target: "es2022",
  },
  server: {
    // `npm run dev`: the API of a local syncbridge (control.listen) behind the dev server.
    proxy: Object.fromEntries(
      ["/pipelines", "/runs", "/inventory", "/catalog", "/whoami", "/openapi.json", "/ready"].map((p) => [
        p,
        process.env.SYNCBRIDGE_API ?? "http://127.0.0.1:9090",
      ]),
    ),
  },
});

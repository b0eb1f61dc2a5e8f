// Writes a .gz beside each text file of dist/: syncbridge embeds both and sends the .gz to
// clients that accept gzip (nothing is compressed per request). Prints the first-load size.
import { readdirSync, readFileSync, writeFileSync, statSync } from "node:fs";
import { join, relative } from "node:path";
import { gzipSync, constants } from "node:zlib";

const dist = new URL("../dist/", import.meta.url).pathname;
const TEXT = /\.(html|js|mjs|css|svg|json|txt)$/;

function walk(dir) {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    return statSync(p).isDirectory() ? walk(p) : [p];
  });
}

let plain = 0;
let zipped = 0;
for (const file of walk(dist)) {
  if (!TEXT.test(file)) continue;
  const body = readFileSync(file);
  const gz = gzipSync(body, { level: constants.Z_BEST_COMPRESSION });
  writeFileSync(`${file}.gz`, gz);
  plain += body.length;
  zipped += gz.length;
  console.log(`${relative(dist, file)}: ${body.length} B, gzip ${gz.length} B`);
}
console.log(`text assets: ${plain} B, gzip ${zipped} B`);

// Logic tests of the UI's pure modules (run by `npm run build` before bundling, and by
// `npm run test:unit`): each .ts module is transpiled with TypeScript (no extra dependency) and
// imported. Exit 1 on the first failure.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import assert from "node:assert/strict";
import ts from "typescript";

const dir = mkdtempSync(join(tmpdir(), "sb-ui-unit-"));
async function load(module) {
  const src = readFileSync(new URL(`../src/${module}.ts`, import.meta.url), "utf8");
  const js = ts.transpileModule(src, { compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 } }).outputText;
  const file = join(dir, `${module}.mjs`);
  writeFileSync(file, js);
  return import(file);
}

const { addField, columnAtLine, editField, setRoutes, lineDiff } = await load("mapping_yaml");
let failed = 0;
function test(name, f) {
  try {
    f();
    console.log(`ok: ${name}`);
  } catch (e) {
    failed++;
    console.error(`FAILED: ${name}\n${e.stack ?? e}`);
  }
}
const text = (r) => {
  assert.ok("text" in r, `an edit, not: ${r.error}`);
  return r.text;
};

const BLOCK = `version: 1
sync:
  - table: public.a # the first
    list: A
    fields:
      title: Title   # kept
      link:
        field: Link
        type: hyperlink
      note: { field: Note, type: note }
    conflict: manual
  - table: public.b
    list: B
    fields: { x: X, y: { field: Y, type: number } }
control:
  listen: 127.0.0.1:1
`;
const spec = (column, field, type = "text", direction = "bidirectional", more = {}) => ({ column, field, type, direction, ...more });

test("add a field after the last one of a block, or inside a one-line map", () => {
  const a = text(addField(BLOCK, "public.a", spec("n", "N", "number", "push_only")));
  assert.match(a, /note: \{ field: Note, type: note \}\n      n: \{ field: N, type: number, direction: push_only \}\n    conflict: manual/);
  const b = text(addField(BLOCK, "b", spec("z", "Z")));
  assert.match(b, /fields: \{ x: X, y: \{ field: Y, type: number \}, z: \{ field: Z, type: text, direction: bidirectional \} \}/);
});

test("remove a field: its continuation lines go, comments and other lines stay", () => {
  const a = text(editField(BLOCK, "public.a", "link", undefined));
  assert.equal(a, BLOCK.replace("      link:\n        field: Link\n        type: hyperlink\n", ""));
  const b = text(editField(BLOCK, "public.b", "x", undefined));
  assert.match(b, /fields: \{ y: \{ field: Y, type: number \} \}\n/);
  assert.ok("error" in editField(BLOCK, "public.a", "nope", undefined), "an unknown column is an error");
});

test("change a field's type and direction; choices only for a choice type", () => {
  const a = text(editField(BLOCK, "public.a", "title", spec("title", "Title", "choice", "pull_only", { choices: ["a b", "yes"], conflict: "target_wins" })));
  assert.match(a, /\n      title: \{ field: Title, type: choice, direction: pull_only, choices: \[a b, "yes"\], conflict: target_wins \}\n      link:/);
  const b = text(editField(BLOCK, "public.a", "title", spec("title", "Title", "note", "bidirectional", { choices: ["a"] })));
  assert.ok(!b.includes("choices"), b);
  const d = lineDiff(BLOCK, b).filter((l) => l.kind !== " ");
  assert.equal(d.length, 2, "one line out, one in");
});

test("routes: written in order after the fields, replaced, removed; the default list set", () => {
  const a = text(setRoutes(BLOCK, "public.a", "A all", [{ when: "status == 'x'", list: "X" }, { when: 'n > 2', list: "Big: n" }]));
  assert.match(a, /    list: A all\n/);
  assert.match(a, /note: \{ field: Note, type: note \}\n    routes:\n      - \{ when: "status == 'x'", list: X \}\n      - \{ when: "n > 2", list: "Big: n" \}\n    conflict: manual/);
  const b = text(setRoutes(a, "public.a", "A", [{ when: "n > 2", list: "Y" }]));
  assert.match(b, /    routes:\n      - \{ when: "n > 2", list: Y \}\n    conflict: manual/);
  const c = text(setRoutes(b, "public.a", "A", []));
  assert.equal(c, BLOCK);
});

test("an unknown table or a layout it does not know is an error, not a wrong edit", () => {
  assert.ok("error" in addField(BLOCK, "public.zz", spec("a", "A")));
  const odd = BLOCK.replace("fields: { x: X, y: { field: Y, type: number } }", "fields: &f\n      x: X");
  assert.ok("error" in addField(odd, "public.b", spec("a", "A")));
});

test("a problem's line names the field written there", () => {
  // Lines 6 (title), 7-9 (link and its continuation lines), 10 (note); 3 is the table line.
  assert.deepEqual([3, 6, 8, 9, 10, 11].map((l) => columnAtLine(BLOCK, "public.a", l)), [undefined, "title", "link", "link", "note", undefined]);
  assert.equal(columnAtLine(BLOCK, "public.b", 15), undefined, "a one-line map: not told apart");
});

rmSync(dir, { recursive: true, force: true });
if (failed) {
  console.error(`${failed} unit test(s) failed`);
  process.exit(1);
}
console.log("unit: all passed");

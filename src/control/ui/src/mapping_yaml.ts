// Text edits of a pipeline file for the mapping editor: adding, changing and removing a sync
// entry's fields and setting its routes while keeping the rest of the file (comments, order,
// style) as written, and a line diff to show the change.

export interface NewField {
  column: string;
  field: string;
  type: string;
  direction: string;
}

const indentOf = (line: string) => line.length - line.trimStart().length;

/** A field as the form edits it; the optional members are kept from the file's mapping. */
export interface FieldSpec extends NewField {
  choices?: string[];
  lookup_list?: string | null;
  conflict?: string | null;
}

export interface RouteSpec {
  when: string;
  list: string;
}

type Edit = { text: string } | { error: string };

const escapeRe = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
/** A YAML scalar: plain when that reads back the same, else double-quoted (JSON is valid YAML). */
const scalar = (s: string) => (/^[A-Za-z_][A-Za-z0-9_ .-]*$/.test(s) && s.trim() === s && !/^(true|false|null|yes|no|on|off)$/i.test(s) ? s : JSON.stringify(s));
const meaningful = (l: string) => l.trim() !== "" && !l.trim().startsWith("#");

/** YAML flow text of a field: `column: { field: F, type: t, direction: d, … }`. */
export function fieldYaml(f: FieldSpec): string {
  const parts = [`field: ${scalar(f.field)}`, `type: ${f.type}`, `direction: ${f.direction}`];
  if ((f.type === "choice" || f.type === "multichoice") && f.choices?.length) parts.push(`choices: [${f.choices.map(scalar).join(", ")}]`);
  if (f.type === "lookup" && f.lookup_list) parts.push(`list: ${scalar(f.lookup_list)}`);
  if (f.conflict) parts.push(`conflict: ${f.conflict}`);
  return `${scalar(f.column)}: { ${parts.join(", ")} }`;
}

/** The lines of the sync entry of `table` (`schema.table`): where it starts and the key indent. */
function entryOf(lines: string[], table: string): { start: number; end: number; keyIndent: number } | string {
  const name = table.replace(/^public\./, "");
  const tableLine = new RegExp(`^(\\s*)-\\s+table:\\s*['"]?(public\\.)?${escapeRe(name)}['"]?\\s*(#.*)?$`);
  const start = lines.findIndex((l) => tableLine.test(l));
  if (start < 0) return `no "- table: ${table}" line in the file`;
  const keyIndent = lines[start].indexOf("-") + 2;
  let end = start + 1;
  for (let i = start + 1; i < lines.length; i++) {
    if (!meaningful(lines[i])) continue;
    if (indentOf(lines[i]) < keyIndent) break;
    end = i + 1;
  }
  return { start, end, keyIndent };
}

/** Where `key:` of the entry is: its line, the end of its block (exclusive) and its inline rest. */
function keyOf(lines: string[], e: { start: number; end: number; keyIndent: number }, key: string) {
  const at = lines.findIndex((l, i) => i > e.start && i < e.end && indentOf(l) === e.keyIndent && new RegExp(`^\\s*${key}:`).test(l));
  if (at < 0) return undefined;
  let end = at + 1;
  for (let j = at + 1; j < e.end; j++) {
    if (!meaningful(lines[j])) continue;
    if (indentOf(lines[j]) <= e.keyIndent) break;
    end = j + 1;
  }
  const rest = lines[at].replace(new RegExp(`^\\s*${key}:\\s*`), "").replace(/\s+#.*$/, "");
  return { at, end, rest };
}

/** Splits flow text `a: 1, b: { c: 2 }` at its top-level commas (quotes and brackets respected). */
function splitFlow(inner: string): string[] {
  const out: string[] = [];
  let depth = 0;
  let quote = "";
  let cur = "";
  for (const ch of inner) {
    if (quote) {
      if (ch === quote) quote = "";
    } else if (ch === "'" || ch === '"') quote = ch;
    else if (ch === "{" || ch === "[") depth++;
    else if (ch === "}" || ch === "]") depth--;
    else if (ch === "," && depth === 0) {
      out.push(cur.trim());
      cur = "";
      continue;
    }
    cur += ch;
  }
  if (cur.trim()) out.push(cur.trim());
  return out;
}

const columnOf = (item: string) => item.slice(0, item.indexOf(":")).trim().replace(/^['"]|['"]$/g, "");

/**
 * `text` with the field of `column` in the entry of `table` replaced by `f` (`undefined`:
 * removed), or appended when there is none; or an error saying why the YAML must be edited by
 * hand (a layout this does not know). The rest of the file stays as written.
 */
export function editField(text: string, table: string, column: string | undefined, f: FieldSpec | undefined): Edit {
  const lines = text.split("\n");
  const e = entryOf(lines, table);
  if (typeof e === "string") return { error: e };
  const fields = keyOf(lines, e, "fields");
  if (!fields) return { error: `the entry of ${table} has no "fields:" line` };
  const { rest } = fields;
  if (rest.startsWith("{") && rest.endsWith("}")) {
    // One line `fields: { … }`: its items rewritten, the rest of the line kept.
    const line = lines[fields.at];
    const items = splitFlow(rest.slice(1, -1));
    const i = column === undefined ? -1 : items.findIndex((it) => columnOf(it) === column);
    if (column !== undefined && i < 0) return { error: `no field of column ${column} in the entry of ${table}` };
    if (i < 0) items.push(fieldYaml(f!));
    else if (f) items[i] = fieldYaml(f);
    else items.splice(i, 1);
    const open = line.indexOf("{");
    lines[fields.at] = `${line.slice(0, open)}{ ${items.join(", ")} }${line.slice(line.lastIndexOf("}") + 1)}`;
    return { text: lines.join("\n") };
  }
  if (rest !== "") return { error: `the fields of ${table} are written in a form this editor does not change; edit the YAML below` };
  // A block mapping: one item per line at the first item's indent, continuation lines deeper.
  const itemIndent = fields.end > fields.at + 1 ? indentOf(lines.slice(fields.at + 1, fields.end).find(meaningful)!) : e.keyIndent + 2;
  if (column === undefined) {
    lines.splice(fields.end, 0, `${" ".repeat(itemIndent)}${fieldYaml(f!)}`);
    return { text: lines.join("\n") };
  }
  const at = lines.findIndex((l, j) => j > fields.at && j < fields.end && indentOf(l) === itemIndent && meaningful(l) && columnOf(l) === column);
  if (at < 0) return { error: `no field of column ${column} in the entry of ${table}` };
  let end = at + 1;
  while (end < fields.end && (!meaningful(lines[end]) || indentOf(lines[end]) > itemIndent)) end++;
  lines.splice(at, end - at, ...(f ? [`${" ".repeat(itemIndent)}${fieldYaml(f)}`] : []));
  return { text: lines.join("\n") };
}

/** The column of the field written at 1-based `line` of `text` in the entry of `table`, if any. */
export function columnAtLine(text: string, table: string, line: number): string | undefined {
  const lines = text.split("\n");
  const e = entryOf(lines, table);
  if (typeof e === "string") return undefined;
  const fields = keyOf(lines, e, "fields");
  const at = line - 1;
  if (!fields || at <= fields.at || at >= fields.end) return undefined;
  const itemIndent = indentOf(lines.slice(fields.at + 1, fields.end).find(meaningful)!);
  for (let j = at; j > fields.at; j--) if (meaningful(lines[j]) && indentOf(lines[j]) === itemIndent) return columnOf(lines[j].trim());
  return undefined;
}

/** `text` with `f` added to the `fields:` of the sync entry of `table` (`schema.table`). */
export function addField(text: string, table: string, f: NewField): Edit {
  return editField(text, table, undefined, f);
}

/**
 * `text` with the entry of `table` sending rows to `routes` (in order, first match wins) and
 * the others to `defaultList`: its `list:` value replaced and its `routes:` block written anew
 * (after `fields:` when there was none; removed when `routes` is empty).
 */
export function setRoutes(text: string, table: string, defaultList: string, routes: RouteSpec[]): Edit {
  const lines = text.split("\n");
  const e = entryOf(lines, table);
  if (typeof e === "string") return { error: e };
  const pad = " ".repeat(e.keyIndent);
  const list = keyOf(lines, e, "list");
  if (!list) return { error: `the entry of ${table} has no "list:" line of its own` };
  if (list.end !== list.at + 1) return { error: `the list of ${table} spans several lines; edit the YAML below` };
  lines[list.at] = `${pad}list: ${scalar(defaultList)}`;
  const block = routes.map((r) => `${pad}  - { when: ${JSON.stringify(r.when)}, list: ${scalar(r.list)} }`);
  const body = block.length ? [`${pad}routes:`, ...block] : [];
  const old = keyOf(lines, e, "routes");
  if (old) lines.splice(old.at, old.end - old.at, ...body);
  else {
    const fields = keyOf(lines, e, "fields");
    lines.splice(fields ? fields.end : e.end, 0, ...body);
  }
  return { text: lines.join("\n") };
}

export interface DiffLine {
  kind: " " | "+" | "-";
  text: string;
}

/** The lines of `a` and `b` as a unified diff (longest common subsequence; files are small). */
export function lineDiff(a: string, b: string): DiffLine[] {
  const x = a.split("\n");
  const y = b.split("\n");
  const n = x.length;
  const m = y.length;
  // lcs[i][j]: common lines of x[i..] and y[j..].
  const lcs: number[][] = Array.from({ length: n + 1 }, () => new Array<number>(m + 1).fill(0));
  for (let i = n - 1; i >= 0; i--)
    for (let j = m - 1; j >= 0; j--) lcs[i][j] = x[i] === y[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
  const out: DiffLine[] = [];
  let i = 0;
  let j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && x[i] === y[j]) {
      out.push({ kind: " ", text: x[i] });
      i++;
      j++;
    } else if (j < m && (i === n || lcs[i][j + 1] >= lcs[i + 1][j])) out.push({ kind: "+", text: y[j++] });
    else out.push({ kind: "-", text: x[i++] });
  }
  return out;
}

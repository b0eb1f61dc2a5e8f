// Text edits of a pipeline file for the mapping editor: adding a field to a sync entry while
// keeping the rest of the file (comments, order, style) as written, and a line diff to show it.

export interface NewField {
  column: string;
  field: string;
  type: string;
  direction: string;
}

const indentOf = (line: string) => line.length - line.trimStart().length;

/** YAML flow text of a field: `column: { field: F, type: t, direction: d }`. */
export function fieldYaml(f: NewField): string {
  const q = (s: string) => (/^[A-Za-z_][A-Za-z0-9_ ]*$/.test(s) && s.trim() === s ? s : JSON.stringify(s));
  return `${q(f.column)}: { field: ${q(f.field)}, type: ${f.type}, direction: ${f.direction} }`;
}

/**
 * `text` with `f` added to the `fields:` of the sync entry of `table` (`schema.table`), or an
 * error saying why the file must be edited by hand (a layout this does not know).
 */
export function addField(text: string, table: string, f: NewField): { text: string } | { error: string } {
  const lines = text.split("\n");
  const name = table.replace(/^public\./, "");
  const tableLine = new RegExp(`^(\\s*)-\\s+table:\\s*['"]?(public\\.)?${name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}['"]?\\s*(#.*)?$`);
  const start = lines.findIndex((l) => tableLine.test(l));
  if (start < 0) return { error: `no "- table: ${table}" line in the file` };
  const keyIndent = lines[start].indexOf("-") + 2;
  let i = start + 1;
  let fieldsAt = -1;
  for (; i < lines.length; i++) {
    const l = lines[i];
    if (l.trim() === "" || l.trim().startsWith("#")) continue;
    if (indentOf(l) < keyIndent) break;
    if (indentOf(l) === keyIndent && /^\s*fields:/.test(l)) fieldsAt = i;
  }
  if (fieldsAt < 0) return { error: `the entry of ${table} has no "fields:" line` };
  const rest = lines[fieldsAt].replace(/^\s*fields:\s*/, "").replace(/\s+#.*$/, "");
  if (rest.startsWith("{") && rest.endsWith("}")) {
    const line = lines[fieldsAt];
    const close = line.lastIndexOf("}");
    const inner = rest.slice(1, -1).trim();
    lines[fieldsAt] = `${line.slice(0, close).trimEnd()}${inner ? "," : ""} ${fieldYaml(f)} }${line.slice(close + 1)}`;
    return { text: lines.join("\n") };
  }
  if (rest !== "") return { error: `the fields of ${table} are written in a form this editor does not change; edit the YAML below` };
  // A block mapping: its lines are indented deeper than "fields:"; add after the last one.
  let last = fieldsAt;
  let indent = keyIndent + 2;
  for (let j = fieldsAt + 1; j < lines.length; j++) {
    const l = lines[j];
    if (l.trim() === "") continue;
    if (indentOf(l) <= keyIndent) break;
    if (last === fieldsAt) indent = indentOf(l);
    last = j;
  }
  lines.splice(last + 1, 0, `${" ".repeat(indent)}${fieldYaml(f)}`);
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

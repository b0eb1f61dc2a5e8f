// Mapping editor: a table's columns (catalog) beside its list's fields (the pipeline file); add a
// field, see the file's change as a diff, save (written by the process and reloaded at once).
import { useEffect, useState } from "preact/hooks";
import { api, call, message, type Schemas } from "../api/client";
import { useLoad } from "../hooks";
import { addField, lineDiff } from "../mapping_yaml";
import { ErrorBox, PipelinePicker, ReadOnlyNote, Table, show, usePipeline, useSession } from "../widgets";

interface Field {
  column: string;
  field: string;
  type: string;
  direction: string;
}
interface Entry {
  table: { schema: string; name: string };
  list: string;
  fields: Field[];
}

const TYPES = ["text", "note", "number", "currency", "date", "datetime", "boolean", "choice", "multichoice", "person", "lookup", "hyperlink"];
const DIRECTIONS = ["bidirectional", "push_only", "pull_only"];
const tableName = (e: Entry) => `${e.table.schema}.${e.table.name}`;

export function Mapping() {
  const { canOperate } = useSession();
  const [pipeline, setPipeline] = usePipeline();
  const file = useLoad(
    async () => (pipeline ? call(api.GET("/pipelines/{name}/config", { params: { path: { name: pipeline } } })) : undefined),
    [pipeline],
  );
  const [draft, setDraft] = useState("");
  const [table, setTable] = useState<string | undefined>();
  const [result, setResult] = useState<Schemas["ConfigWritten"] | undefined>();
  const [failure, setFailure] = useState<string | undefined>();
  const [saving, setSaving] = useState(false);
  useEffect(() => setDraft(file.data?.yaml ?? ""), [file.data]);

  const entries = (file.data?.mapping ?? []) as unknown as Entry[];
  const entry = entries.find((e) => tableName(e) === table) ?? entries[0];
  const columns = useLoad(
    async () =>
      file.data && entry
        ? call(api.GET("/catalog/{database}/tables/{table}", { params: { path: { database: file.data.database, table: tableName(entry) } } }))
        : undefined,
    [file.data?.database, entry && tableName(entry)],
  );
  const changed = file.data !== undefined && draft !== file.data.yaml;

  const save = async () => {
    setSaving(true);
    setFailure(undefined);
    setResult(undefined);
    try {
      setResult(
        await call(api.PUT("/pipelines/{name}/config", { params: { path: { name: pipeline! } }, body: { yaml: draft, base_version: file.data!.version } })),
      );
      file.reload();
    } catch (e) {
      setFailure(message(e));
    } finally {
      setSaving(false);
    }
  };

  return (
    <>
      <h1>Mapping</h1>
      <form class="filters" onSubmit={(e) => e.preventDefault()}>
        <PipelinePicker value={pipeline} onChange={(p) => { setPipeline(p); setTable(undefined); setResult(undefined); }} />
        <label>
          Table
          <select value={entry ? tableName(entry) : ""} onChange={(e) => setTable((e.target as HTMLSelectElement).value)}>
            {entries.map((e) => (
              <option key={tableName(e)}>{tableName(e)}</option>
            ))}
          </select>
        </label>
      </form>
      <ErrorBox error={file.error} />
      {file.data && !file.data.writable && <p class="muted" data-testid="not-writable">Saving is off: {file.data.why_not}</p>}
      {entry && (
        <div class="grid">
          <section class="card" aria-labelledby="cols-h">
            <h2 id="cols-h">Columns of {tableName(entry)}</h2>
            <ErrorBox error={columns.error} />
            <Table head={["Column", "Type", "Mapped to"]} caption="Table columns">
              {(columns.data?.columns ?? []).map((c) => (
                <tr key={c.name} data-testid={`column-${c.name}`}>
                  <td>{c.name}</td>
                  <td>{c.type}</td>
                  <td>{show(entry.fields.find((f) => f.column === c.name)?.field)}</td>
                </tr>
              ))}
            </Table>
          </section>
          <section class="card" aria-labelledby="fields-h">
            <h2 id="fields-h">Fields of list {entry.list}</h2>
            <Table head={["Field", "Column", "Type", "Direction"]} caption="List fields">
              {entry.fields.map((f) => (
                <tr key={f.field} data-testid={`field-${f.field}`}>
                  <td>{f.field}</td>
                  <td>{f.column}</td>
                  <td>{f.type}</td>
                  <td>{f.direction}</td>
                </tr>
              ))}
            </Table>
          </section>
        </div>
      )}
      {entry && canOperate && (
        <AddField
          key={tableName(entry)}
          columns={(columns.data?.columns ?? []).map((c) => c.name).filter((c) => !entry.fields.some((f) => f.column === c))}
          onAdd={(f) => {
            const r = addField(draft, tableName(entry), f);
            if ("error" in r) setFailure(r.error);
            else {
              setFailure(undefined);
              setDraft(r.text);
            }
          }}
        />
      )}
      <ReadOnlyNote />
      {file.data && (
        <section class="card" aria-labelledby="yaml-h">
          <h2 id="yaml-h">Pipeline file {file.data.file}</h2>
          <p class="muted">Secrets show as &lt;redacted:N&gt; and are kept when saving.</p>
          <label>
            YAML
            <textarea class="yaml" rows={16} value={draft} readOnly={!canOperate} onInput={(e) => setDraft((e.target as HTMLTextAreaElement).value)} />
          </label>
        </section>
      )}
      {changed && (
        <section class="card" aria-labelledby="diff-h" data-testid="yaml-diff">
          <h2 id="diff-h">Changes to save</h2>
          <pre class="diff">
            {lineDiff(file.data!.yaml, draft)
              .filter((l, i, all) => l.kind !== " " || all.slice(Math.max(0, i - 2), i + 3).some((n) => n.kind !== " "))
              .map((l, i) => (
                <span key={i} class={l.kind === "+" ? "add" : l.kind === "-" ? "del" : ""}>{`${l.kind} ${l.text}\n`}</span>
              ))}
          </pre>
          {canOperate && (
            <p class="actions">
              <button type="button" disabled={saving || !file.data!.writable} onClick={() => void save()}>Save and reload</button>
              <button type="button" class="link" onClick={() => setDraft(file.data!.yaml)}>Discard changes</button>
            </p>
          )}
        </section>
      )}
      <ErrorBox error={failure} />
      {result && (
        <p role="status" class="ok" data-testid="mapping-saved">
          Saved; reload {result.reload.outcome}
          {Object.entries(result.reload.changed).map(([p, c]) => ` (${p}: ${c.join("; ")})`)}
          {result.reload.error ? `: ${result.reload.error}` : ""}
        </p>
      )}
    </>
  );
}

function AddField({ columns, onAdd }: { columns: string[]; onAdd: (f: Field) => void }) {
  const [column, setColumn] = useState("");
  const [field, setField] = useState("");
  const [type, setType] = useState("text");
  const [direction, setDirection] = useState("bidirectional");
  const col = column || columns[0] || "";
  const submit = (e: Event) => {
    e.preventDefault();
    if (!col || !field.trim()) return;
    onAdd({ column: col, field: field.trim(), type, direction });
    setField("");
    setColumn("");
  };
  const pick = (label: string, value: string, options: string[], set: (v: string) => void) => (
    <label>
      {label}
      <select value={value} onChange={(e) => set((e.target as HTMLSelectElement).value)}>
        {options.map((o) => (
          <option key={o}>{o}</option>
        ))}
      </select>
    </label>
  );
  return (
    <form class="card filters" onSubmit={submit} aria-label="Add a field">
      {pick("Column", col, columns, setColumn)}
      <label>
        Field name
        <input value={field} onInput={(e) => setField((e.target as HTMLInputElement).value)} required />
      </label>
      {pick("Field type", type, TYPES, setType)}
      {pick("Direction", direction, DIRECTIONS, setDirection)}
      <button type="submit" disabled={!col}>Add field</button>
    </form>
  );
}

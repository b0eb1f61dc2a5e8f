// Mapping editor: a table's columns (catalog) beside its list's fields (the pipeline file) and the
// list's live columns (Graph); add, remove and change fields (type, direction) and edit routes
// with form controls, each an edit of the YAML below (also editable by hand); every change is
// checked by the process (config, catalog, live list) and its problems shown beside the fields,
// blocking the save; see the file's change as a diff, save (written and reloaded at once).
import { useEffect, useState } from "preact/hooks";
import { api, call, message, type Schemas } from "../api/client";
import { useLoad } from "../hooks";
import { addField, columnAtLine, editField, lineDiff, setRoutes, type FieldSpec, type RouteSpec } from "../mapping_yaml";
import { ErrorBox, PipelinePicker, ReadOnlyNote, Table, show, usePipeline, useSession } from "../widgets";

type Field = FieldSpec;
interface Entry {
  table: { schema: string; name: string };
  list: string;
  fields: Field[];
  routes: RouteSpec[];
}

const TYPES = ["text", "note", "number", "currency", "date", "datetime", "boolean", "choice", "multichoice", "person", "lookup", "hyperlink"];
const DIRECTIONS = ["bidirectional", "push_only", "pull_only"];
const tableName = (e: Entry) => `${e.table.schema}.${e.table.name}`;
/** Quiet time after an edit before the draft is checked (one check per pause in typing). */
const CHECK_DELAY_MS = 600;

type Finding = Schemas["ConfigFinding"];
/** The last check of a draft: its findings, whether any blocks saving. */
interface Check {
  draft: string;
  findings: Finding[];
  blocked: boolean;
  error?: string;
}

/** Checks `draft` (POST …/config/validate): 200 notes, 422 problems; anything else an error. */
async function checkDraft(pipeline: string, draft: string): Promise<Check & { mapping?: Entry[] }> {
  const r = await api.POST("/pipelines/{name}/config/validate", { params: { path: { name: pipeline } }, body: { yaml: draft } });
  if (r.response.status === 422 && r.error && "problems" in r.error) {
    const e = r.error as Schemas["ConfigProblems"];
    return { draft, findings: e.problems, blocked: true, mapping: (e.mapping ?? undefined) as unknown as Entry[] | undefined };
  }
  const ok = await call(Promise.resolve(r));
  return { draft, findings: ok.findings, blocked: false, mapping: ok.mapping as unknown as Entry[] };
}

const located = (f: Finding) => (f.line ? `line ${f.line}: ${f.message}` : f.message);

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
  // The entries as the form last left them (the file's, then each form edit applied).
  const [entries, setEntries] = useState<Entry[]>([]);
  useEffect(() => {
    setDraft(file.data?.yaml ?? "");
    setEntries((file.data?.mapping ?? []) as unknown as Entry[]);
  }, [file.data]);

  const entry = entries.find((e) => tableName(e) === table) ?? entries[0];
  const [check, setCheck] = useState<Check | undefined>();
  useEffect(() => {
    if (!pipeline || !file.data || !canOperate || draft === file.data.yaml) return setCheck(undefined);
    let live = true;
    const t = window.setTimeout(() => {
      checkDraft(pipeline, draft).then(
        (c) => {
          if (!live) return;
          setCheck(c);
          // The form follows the text (also after an edit by hand).
          if (c.mapping) setEntries(c.mapping);
        },
        (e) => live && setCheck({ draft, findings: [], blocked: true, error: message(e) }),
      );
    }, CHECK_DELAY_MS);
    return () => {
      live = false;
      window.clearTimeout(t);
    };
  }, [pipeline, file.data, draft, canOperate]);
  const checked = check?.draft === draft ? check : undefined;
  /** The findings about field `f` (by column, field name or the line they point at). */
  const findingsOf = (f: Field) =>
    (checked?.findings ?? []).filter(
      (x) => x.column === f.column || (x.field === f.field && x.source === "graph") || (x.line && entry && columnAtLine(draft, tableName(entry), x.line) === f.column),
    );
  const live = useLoad(
    async () => (pipeline && entry ? call(api.GET("/pipelines/{name}/lists/{list}/columns", { params: { path: { name: pipeline, list: entry.list } } })) : undefined),
    [pipeline, entry?.list, file.data],
  );
  const columns = useLoad(
    async () =>
      file.data && entry
        ? call(api.GET("/catalog/{database}/tables/{table}", { params: { path: { database: file.data.database, table: tableName(entry) } } }))
        : undefined,
    [file.data?.database, entry && tableName(entry)],
  );
  const changed = file.data !== undefined && draft !== file.data.yaml;

  /** Applies a form edit: the YAML text and the form's entry, or says why it cannot. */
  const edit = (r: { text: string } | { error: string }, next: Entry) => {
    if ("error" in r) return setFailure(r.error);
    setFailure(undefined);
    setDraft(r.text);
    setEntries(entries.map((e) => (e === entry ? next : e)));
  };
  const changeField = (old: Field, f: Field | undefined) =>
    edit(editField(draft, tableName(entry!), old.column, f), {
      ...entry!,
      fields: f ? entry!.fields.map((x) => (x === old ? f : x)) : entry!.fields.filter((x) => x !== old),
    });

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
          <section class="card" aria-labelledby="live-h" data-testid="live-columns">
            <h2 id="live-h">Live columns of list {entry.list}</h2>
            <ErrorBox error={live.error} />
            <p class="muted">Writable columns (read-only system columns left out).</p>
            {live.data && !live.data.exists && <p class="muted">The list does not exist yet: starting the pipeline creates it.</p>}
            {live.data?.exists && (
              <Table head={["Column", "Display name", "Type", "Required"]} caption="The list's writable columns in SharePoint">
                {live.data.columns
                  .filter((c) => !c.read_only && (!c.hidden || c.name === "SyncKey"))
                  .map((c) => (
                    <tr key={c.name} data-testid={`live-${c.name}`}>
                      <td>{c.name}</td>
                      <td>{show(c.display_name)}</td>
                      <td>{show(c.type)}</td>
                      <td>{c.required ? "yes" : "no"}</td>
                    </tr>
                  ))}
              </Table>
            )}
          </section>
          <section class="card wide" aria-labelledby="fields-h">
            <h2 id="fields-h">Fields of list {entry.list}</h2>
            <Table head={["Field", "Column", "Type", "Direction", "In the list", ...(canOperate ? ["Problems", ""] : [])]} caption="List fields">
              {entry.fields.map((f) => (
                <tr key={f.column} data-testid={`field-${f.field}`}>
                  <td>{f.field}</td>
                  <td>{f.column}</td>
                  {canOperate ? (
                    <>
                      <td>{pick(`${f.field} type`, f.type, TYPES, (type) => changeField(f, { ...f, type }), true)}</td>
                      <td>{pick(`${f.field} direction`, f.direction, DIRECTIONS, (direction) => changeField(f, { ...f, direction }), true)}</td>
                      <td>{liveType(live.data, f.field)}</td>
                      <td data-testid={`field-problems-${f.field}`}>
                        {findingsOf(f).map((x, i) => (
                          <p key={i} class={x.blocking ? "error" : "muted"}>{x.message}</p>
                        ))}
                      </td>
                      <td>
                        <button type="button" class="link" aria-label={`Remove field ${f.field}`} onClick={() => changeField(f, undefined)}>
                          Remove
                        </button>
                      </td>
                    </>
                  ) : (
                    <>
                      <td>{f.type}</td>
                      <td>{f.direction}</td>
                      <td>{liveType(live.data, f.field)}</td>
                    </>
                  )}
                </tr>
              ))}
            </Table>
          </section>
        </div>
      )}
      {entry && canOperate && (
        <>
          <AddField
            key={tableName(entry)}
            columns={(columns.data?.columns ?? []).map((c) => c.name).filter((c) => !entry.fields.some((f) => f.column === c))}
            onAdd={(f) => edit(addField(draft, tableName(entry), f), { ...entry, fields: [...entry.fields, f] })}
          />
          <Routes
            key={`routes-${tableName(entry)}`}
            entry={entry}
            onChange={(list, routes) => edit(setRoutes(draft, tableName(entry), list, routes), { ...entry, list, routes })}
          />
        </>
      )}
      {entry && !canOperate && entry.routes.length > 0 && (
        <section class="card" aria-labelledby="routes-h">
          <h2 id="routes-h">Routes</h2>
          <Table head={["When", "List"]} caption="Routes, first match wins">
            {entry.routes.map((r, i) => (
              <tr key={i}>
                <td><code>{r.when}</code></td>
                <td>{r.list}</td>
              </tr>
            ))}
          </Table>
        </section>
      )}
      <ReadOnlyNote />
      {file.data && (
        <section class="card" aria-labelledby="yaml-h">
          <h2 id="yaml-h">Pipeline file {file.data.file}</h2>
          <p class="muted">Secrets show as &lt;redacted:N&gt; and are kept when saving. The form above edits this text; an edit by hand here is not shown in the form.</p>
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
          {canOperate && <CheckResult check={checked} />}
          {canOperate && (
            <p class="actions">
              <button type="button" disabled={saving || !file.data!.writable || !checked || checked.blocked} onClick={() => void save()}>
                Save and reload
              </button>
              <button
                type="button"
                class="link"
                onClick={() => {
                  setDraft(file.data!.yaml);
                  setEntries(file.data!.mapping as unknown as Entry[]);
                }}
              >
                Discard changes
              </button>
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

/** The list's live column `field`: its type, or that the reload adds it. */
function liveType(live: Schemas["ListColumns"] | undefined, field: string): string {
  if (!live) return "…";
  const c = live.columns.find((x) => x.name === field);
  return c ? show(c.type) : "missing (added on save)";
}

/** The check of the current draft: pending, its problems (they block saving) and notes. */
function CheckResult({ check }: { check?: Check }) {
  if (!check) return <p class="muted" role="status">Checking the change (config, catalog, live list)…</p>;
  if (check.error) return <ErrorBox error={`The change could not be checked: ${check.error}`} />;
  const problems = check.findings.filter((f) => f.blocking);
  const notes = check.findings.filter((f) => !f.blocking);
  return (
    <div data-testid="check-result">
      {problems.length > 0 ? (
        <div class="error" role="alert" data-testid="check-problems">
          <p>{problems.length} problem(s): fix them to save.</p>
          <ul>
            {problems.map((f, i) => (
              <li key={i}>
                {f.source}: {located(f)}
              </li>
            ))}
          </ul>
        </div>
      ) : (
        <p class="ok" role="status" data-testid="check-ok">Checked: no problem (config, catalog, live list).</p>
      )}
      {notes.length > 0 && (
        <ul class="muted" data-testid="check-notes">
          {notes.map((f, i) => (
            <li key={i}>
              {f.source}: {located(f)}
            </li>
          ))}
        </ul>
      )}
    </div>
  );
}

/** A labelled select; `hidden`: the label is for screen readers only (inside a table row). */
function pick(label: string, value: string, options: string[], set: (v: string) => void, hidden = false) {
  return (
    <label>
      <span class={hidden ? "sr-only" : undefined}>{label}</span>
      <select value={value} onChange={(e) => set((e.target as HTMLSelectElement).value)}>
        {options.map((o) => (
          <option key={o}>{o}</option>
        ))}
      </select>
    </label>
  );
}

/** The entry's routes in order (first match wins) and its default list. */
function Routes({ entry, onChange }: { entry: Entry; onChange: (list: string, routes: RouteSpec[]) => void }) {
  const routes = entry.routes;
  const set = (i: number, r: RouteSpec | undefined) => onChange(entry.list, r ? routes.map((x, j) => (j === i ? r : x)) : routes.filter((_, j) => j !== i));
  const move = (i: number, by: number) => {
    const next = [...routes];
    [next[i], next[i + by]] = [next[i + by], next[i]];
    onChange(entry.list, next);
  };
  return (
    <section class="card" aria-labelledby="routes-h" data-testid="routes">
      <h2 id="routes-h">Routes</h2>
      <p class="muted">A row goes to the list of the first rule whose condition (CEL over the row's columns) holds, else to the default list.</p>
      <ol class="routes">
        {routes.map((r, i) => (
          <li key={i} class="filters" data-testid="route">
            <label>
              When (rule {i + 1})
              <input value={r.when} onInput={(e) => set(i, { ...r, when: (e.target as HTMLInputElement).value })} />
            </label>
            <label>
              List (rule {i + 1})
              <input value={r.list} onInput={(e) => set(i, { ...r, list: (e.target as HTMLInputElement).value })} />
            </label>
            <span class="actions">
              <button type="button" class="link" disabled={i === 0} onClick={() => move(i, -1)} aria-label={`Move rule ${i + 1} up`}>Up</button>
              <button type="button" class="link" disabled={i === routes.length - 1} onClick={() => move(i, 1)} aria-label={`Move rule ${i + 1} down`}>Down</button>
              <button type="button" class="link" onClick={() => set(i, undefined)} aria-label={`Remove rule ${i + 1}`}>Remove</button>
            </span>
          </li>
        ))}
      </ol>
      <div class="filters">
        <label>
          Default list
          <input value={entry.list} onInput={(e) => onChange((e.target as HTMLInputElement).value, routes)} />
        </label>
        <button type="button" onClick={() => onChange(entry.list, [...routes, { when: "", list: "" }])}>Add rule</button>
      </div>
    </section>
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

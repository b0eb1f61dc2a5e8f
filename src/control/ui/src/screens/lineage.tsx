// Row lineage: a row's history by table and key, newest first: source commit → log position →
// the processor's decision → the Graph request → list item and eTag.
import { useState } from "preact/hooks";
import { api, call, message, type Schemas } from "../api/client";
import { href, navigate, useLocation } from "../router";
import { ErrorBox, PipelinePicker, show, time, usePipeline } from "../widgets";
import { useLoad } from "../hooks";

type Entry = Schemas["HistoryEntry"];

export function Lineage() {
  const loc = useLocation();
  const [pipeline, setPipeline] = usePipeline();
  const [table, setTable] = useState(loc.query.get("table") ?? "");
  const [key, setKey] = useState(loc.query.get("key") ?? "");
  const [entries, setEntries] = useState<Entry[] | undefined>();
  const [next, setNext] = useState<string | null | undefined>();
  const [error, setError] = useState<string | undefined>();
  const inventory = useLoad(() => call(api.GET("/inventory")), []);
  const tables = (inventory.data?.applications ?? [])
    .flatMap((a) => a.databases)
    .flatMap((d) => d.tables)
    .filter((t) => t.pipeline === pipeline)
    .map((t) => `${t.schema}.${t.name}`);

  const search = async (before?: string) => {
    if (!pipeline) return;
    setError(undefined);
    try {
      const page = await call(
        api.GET("/pipelines/{name}/rows/{table}/{key}/history", {
          params: { path: { name: pipeline, table: table.trim(), key: key.trim() }, query: { before, limit: 50 } },
        }),
      );
      setEntries(before ? [...(entries ?? []), ...page.entries] : page.entries);
      setNext(page.next);
      if (!before) navigate(href("/lineage", { pipeline, table: table.trim(), key: key.trim() }), true);
    } catch (e) {
      setError(message(e));
    }
  };

  return (
    <>
      <h1>Row lineage</h1>
      <form
        class="filters"
        onSubmit={(e) => {
          e.preventDefault();
          void search();
        }}
      >
        <PipelinePicker value={pipeline} onChange={setPipeline} />
        <label>
          Table
          <input list="lineage-tables" required value={table} placeholder="schema.table" onInput={(e) => setTable((e.target as HTMLInputElement).value)} />
          <datalist id="lineage-tables">
            {tables.map((t) => <option key={t} value={t} />)}
          </datalist>
        </label>
        <label>
          Key
          <input required value={key} placeholder="SyncKey, e.g. 42" onInput={(e) => setKey((e.target as HTMLInputElement).value)} />
        </label>
        <button type="submit">Show lineage</button>
      </form>
      <ErrorBox error={error} />
      {entries && entries.length === 0 && <p>No history for this row (none yet, or pruned).</p>}
      {entries && entries.length > 0 && (
        <ol class="timeline" aria-label="History, newest first" data-testid="lineage">
          {entries.map((e) => <Step key={e.event_id} e={e} />)}
        </ol>
      )}
      {next && <button type="button" onClick={() => void search(next)}>Older entries</button>}
    </>
  );
}

function Step({ e }: { e: Entry }) {
  return (
    <li>
      <p>
        <strong>{e.operation}</strong> · <time dateTime={e.at}>{time(e.at_ms)}</time>
      </p>
      <p class="muted">
        {e.lsn && <>commit LSN {e.lsn} → </>}
        {e.source && <>log {e.source.topic}[{e.source.partition}]@{e.source.offset} → </>}
        {e.graph ? <>Graph {show(e.graph.status)} (request {show(e.graph.request_id)}) → </> : <>no Graph request → </>}
        item {show(e.item_id)} eTag {show(e.etag)}
      </p>
      {e.detail && <p>{e.detail}</p>}
    </li>
  );
}

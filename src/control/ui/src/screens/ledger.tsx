// Ledger browser: per list, what the ledger knows of each row (item id, last synced hash and
// time, anything pending), a page at a time.
import { useState } from "preact/hooks";
import { api, call } from "../api/client";
import type { Cursors } from "../api/types";
import { useLoad } from "../hooks";
import { Busy, ErrorBox, PipelinePicker, Table, show, time, usePipeline } from "../widgets";

const PAGE = 50;

export function LedgerScreen() {
  const [pipeline, setPipeline] = usePipeline();
  const lists = useLoad(
    async () => (pipeline ? ((await call(api.GET("/pipelines/{name}/cursors", { params: { path: { name: pipeline } } }))) as Cursors).lists : []),
    [pipeline],
  );
  const [chosen, setChosen] = useState<string | undefined>();
  const list = chosen ?? lists.data?.[0]?.list_id;
  // The `after` cursor of each page seen, so "Previous" goes back without the API keeping state.
  const [pages, setPages] = useState<(string | undefined)[]>([undefined]);
  const after = pages[pages.length - 1];
  // Each answer with the number of its page: the last page stays shown while the next loads, and
  // the caption must describe what is shown.
  const page = useLoad(
    async () =>
      pipeline && list
        ? {
            index: pages.length - 1,
            ...(await call(api.GET("/pipelines/{name}/lists/{list}/ledger", { params: { path: { name: pipeline, list }, query: { after, limit: PAGE } } }))),
          }
        : undefined,
    [pipeline, list, after],
  );
  const { data, error, loading, reload } = page;
  const choose = (l: string) => {
    setChosen(l);
    setPages([undefined]);
  };
  return (
    <>
      <h1>Ledger</h1>
      <form class="filters" onSubmit={(e) => e.preventDefault()}>
        <PipelinePicker value={pipeline} onChange={(p) => { setPipeline(p); setChosen(undefined); setPages([undefined]); }} />
        <label>
          List
          <select value={list ?? ""} onChange={(e) => choose((e.target as HTMLSelectElement).value)}>
            {(lists.data ?? []).map((l) => (
              <option key={l.list_id} value={l.list_id}>
                {l.list}
              </option>
            ))}
          </select>
        </label>
        <button type="button" onClick={reload}>Refresh</button>
      </form>
      <ErrorBox error={lists.error ?? error} />
      <Busy when={loading && !data} />
      {data && (
        <p data-testid="ledger-total">
          {data.total} row(s) in list {data.list}; showing {data.rows.length} from row {data.index * PAGE + 1}.
        </p>
      )}
      <Table head={["Table", "Key", "Item", "Hash", "By", "Written", "Read", "Pending"]} caption="Ledger entries">
        {(data?.rows ?? []).map((r) => (
          <tr key={`${r.table}/${r.key}`} data-testid="ledger-row" data-key={r.key}>
            <td>{r.table}</td>
            <td>{r.key}</td>
            <td>{show(r.item_id)}</td>
            <td title={r.hash ?? undefined}>{r.hash ? r.hash.slice(0, 12) : "–"}</td>
            <td>{r.provenance}</td>
            <td>{time(r.pushed_at_ms)}</td>
            <td>{time(r.pulled_at_ms)}</td>
            <td>{r.pending.length ? `${r.pending.join(", ")}${r.in_flight.length ? ` (${r.in_flight.join(", ")})` : ""}` : "–"}</td>
          </tr>
        ))}
      </Table>
      <p>
        <button type="button" disabled={pages.length < 2} onClick={() => setPages(pages.slice(0, -1))}>Previous page</button>{" "}
        <button type="button" disabled={!data?.next} onClick={() => data?.next && setPages([...pages, data.next])}>Next page</button>
      </p>
    </>
  );
}

// Dead letters: why each row could not be written, and replaying them (after fixing the cause).
import { useState } from "preact/hooks";
import { api, call, message, type Schemas } from "../api/client";
import { useLoad } from "../hooks";
import { Busy, ErrorBox, PipelinePicker, ReadOnlyNote, show, usePipeline, useSession, Table } from "../widgets";

export function Dlq() {
  const { canOperate } = useSession();
  const [pipeline, setPipeline] = usePipeline();
  const { data, error, loading, reload } = useLoad(
    async () => (pipeline ? call(api.GET("/pipelines/{name}/dlq", { params: { path: { name: pipeline }, query: { limit: 200 } } })) : undefined),
    [pipeline],
  );
  const [confirming, setConfirming] = useState(false);
  const [result, setResult] = useState<Schemas["DlqReplayed"] | undefined>();
  const [failure, setFailure] = useState<string | undefined>();
  const replay = async () => {
    setConfirming(false);
    setFailure(undefined);
    try {
      setResult(await call(api.POST("/pipelines/{name}/dlq/replay", { params: { path: { name: pipeline! } } })));
      reload();
    } catch (e) {
      setFailure(message(e));
    }
  };
  const entries = data?.entries ?? [];
  return (
    <>
      <h1>Dead letters</h1>
      <form class="filters" onSubmit={(e) => e.preventDefault()}>
        <PipelinePicker value={pipeline} onChange={setPipeline} />
        <button type="button" onClick={reload}>Refresh</button>
      </form>
      <ErrorBox error={error} />
      <Busy when={loading && !data} />
      {data && <p data-testid="dlq-pending">{data.pending} pending</p>}
      <ReadOnlyNote />
      {canOperate && data && data.pending > 0 && !confirming && (
        <p><button type="button" onClick={() => setConfirming(true)}>Replay {data.pending} dead letter(s)…</button></p>
      )}
      {confirming && (
        <div class="confirm" role="group" aria-label="Confirm replay">
          <p>
            Each dead letter's original change event is sent again. Fix the cause first (mapping, list or data); a row
            changed since is not rolled back, and letters that fail again come back here.
          </p>
          <button type="button" onClick={() => void replay()}>Replay now</button>{" "}
          <button type="button" class="link" onClick={() => setConfirming(false)}>Cancel</button>
        </div>
      )}
      {result && <p role="status" class="ok" data-testid="dlq-replayed">Replayed {result.replayed} dead letter(s) (run {result.run_id}).</p>}
      <ErrorBox error={failure} />
      <Table head={["Offset", "Table", "Key", "Kind", "Reason", "List", "Graph request"]}>
            {entries.map((e) => {
              const d = e.dead_letter as Record<string, unknown>;
              return (
                <tr key={e.offset}>
                  <td>{e.offset}</td>
                  <td>{show(d.table)}</td>
                  <td>{show(d.key)}</td>
                  <td>{show(d.kind)}</td>
                  <td>{show(d.reason)}</td>
                  <td>{show(d.list)}</td>
                  <td>{d.status ? `${show(d.status)} ` : ""}{show(d.request_id)}</td>
                </tr>
              );
            })}
          </Table>
    </>
  );
}

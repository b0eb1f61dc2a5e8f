// Conflicts: both sides' values side by side; an operator keeps one side of a parked conflict.
import { useState } from "preact/hooks";
import { api, call, message } from "../api/client";
import type { Conflict } from "../api/types";
import { useLoad } from "../hooks";
import { Busy, ErrorBox, PipelinePicker, ReadOnlyNote, show, time, usePipeline, useSession, Table } from "../widgets";

export function Conflicts() {
  const [pipeline, setPipeline] = usePipeline();
  const [parkedOnly, setParkedOnly] = useState(true);
  // Said here, not in the card: a resolved conflict leaves the parked list at the reload.
  const [notice, setNotice] = useState<string | undefined>();
  const { data, error, loading, reload } = useLoad(
    async () =>
      pipeline
        ? ((await call(
            api.GET("/pipelines/{name}/conflicts", { params: { path: { name: pipeline }, query: { parked: parkedOnly } } }),
          )) as Conflict[])
        : [],
    [pipeline, parkedOnly],
  );
  return (
    <>
      <h1>Conflicts</h1>
      <form class="filters" onSubmit={(e) => e.preventDefault()}>
        <PipelinePicker value={pipeline} onChange={setPipeline} />
        <label class="check">
          <input type="checkbox" checked={parkedOnly} onChange={(e) => setParkedOnly((e.target as HTMLInputElement).checked)} />
          Parked (open) only
        </label>
        <button type="button" onClick={reload}>Refresh</button>
      </form>
      <ReadOnlyNote />
      {notice && (
        <p role="status" class="ok" data-testid="conflict-notice">
          {notice}
        </p>
      )}
      <ErrorBox error={error} />
      <Busy when={loading && !data} />
      {data?.length === 0 && <p>{parkedOnly ? "No parked conflict." : "No conflict recorded."}</p>}
      {data?.map((c) => (
        <ConflictCard
          key={c.id}
          c={c}
          pipeline={pipeline!}
          onDone={(said) => {
            setNotice(said);
            reload();
          }}
        />
      ))}
    </>
  );
}

function ConflictCard({ c, pipeline, onDone }: { c: Conflict; pipeline: string; onDone: (said: string) => void }) {
  const { canOperate, who } = useSession();
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | undefined>();
  const resolve = async (take: "source" | "target") => {
    setBusy(true);
    setError(undefined);
    try {
      await call(
        api.POST("/pipelines/{name}/conflicts/{id}/resolve", {
          params: { path: { name: pipeline, id: c.id }, query: { take, by: who.name ?? undefined } },
        }),
      );
      const kept = take === "source" ? "the database's values" : "the list's values";
      onDone(`Conflict on ${c.table} key ${c.key}: kept ${kept}.`);
    } catch (e) {
      setError(message(e));
    } finally {
      setBusy(false);
    }
  };
  const headingId = `conflict-${c.id}`;
  return (
    <section class="card" aria-labelledby={headingId} data-testid="conflict">
      <h2 id={headingId}>
        {c.table} · key {c.key} <span class={`badge ${c.state}`}>{c.state}</span>
      </h2>
      <p class="muted">
        recorded {time(c.at_ms)} · item {c.item_id}
        {c.resolution && <> · resolved ({c.resolution.take}) by {c.resolution.resolved_by ?? "?"}</>}
      </p>
      <Table head={["Field", "Database (source)", "List (target)", "Policy"]}>
            {c.fields.map((f) => (
              <tr key={f.field}>
                <th scope="row">{f.field} <span class="muted">({f.column})</span></th>
                <td data-testid="source-value">{show(f.source)}</td>
                <td data-testid="target-value">{show(f.target)}</td>
                <td>{f.policy}{f.winner !== "parked" && ` → ${f.winner}`}</td>
              </tr>
            ))}
          </Table>
      {canOperate && c.state === "open" && (
        <p class="actions">
          <button type="button" disabled={busy} onClick={() => void resolve("source")}>Keep database values</button>
          <button type="button" disabled={busy} onClick={() => void resolve("target")}>Keep list values</button>
        </p>
      )}
      <ErrorBox error={error} />
    </section>
  );
}

// Drift: a check (a dry run: it changes nothing) and its report, then a heal after confirming.
import { useState } from "preact/hooks";
import { api, call, message, type Schemas } from "../api/client";
import { useLoad } from "../hooks";
import { ErrorBox, Facts, PipelinePicker, ReadOnlyNote, num, show, time, usePipeline, useSession, Table } from "../widgets";

type Report = Schemas["DriftReport"];
const CLASSES = ["missing", "orphaned", "divergent", "misrouted", "duplicate", "stale_ledger"] as const;

export function Drift() {
  const { canOperate } = useSession();
  const [pipeline, setPipeline] = usePipeline();
  const [report, setReport] = useState<Report | undefined>();
  const [busy, setBusy] = useState<string | undefined>();
  const [error, setError] = useState<string | undefined>();
  const [confirming, setConfirming] = useState(false);
  // The last check's run, from the run history: the report itself is kept only by the process
  // that ran it (GET …/drift answers 404 before the first check).
  const last = useLoad(
    async () =>
      pipeline
        ? (await call(api.GET("/runs", { params: { query: { pipeline, kind: "drift_check", limit: 1 } } }))).runs[0]
        : undefined,
    [pipeline, report],
  );
  const act = async (what: "check" | "heal" | "latest") => {
    setBusy(what);
    setError(undefined);
    setConfirming(false);
    const path = { name: pipeline! };
    try {
      const r =
        what === "check"
          ? await call(api.POST("/pipelines/{name}/drift", { params: { path } }))
          : what === "heal"
            ? await call(api.POST("/pipelines/{name}/drift/heal", { params: { path } }))
            : await call(api.GET("/pipelines/{name}/drift", { params: { path } }));
      setReport(r);
    } catch (e) {
      setError(message(e));
    } finally {
      setBusy(undefined);
    }
  };
  const total = report ? CLASSES.reduce((n, c) => n + report.counts[c], 0) : 0;
  return (
    <>
      <h1>Drift</h1>
      <form class="filters" onSubmit={(e) => e.preventDefault()}>
        <PipelinePicker value={pipeline} onChange={(p) => { setReport(undefined); setPipeline(p); }} />
      </form>
      <p class="muted">
        Last check: {last.data ? `${time(last.data.started_ms)} (${last.data.status})` : "none recorded"}
        {last.data && !report && (
          <>
            {" "}
            <button type="button" class="link" onClick={() => void act("latest")}>show its report</button>
          </>
        )}
      </p>
      <p class="actions">
        <button type="button" disabled={!!busy} onClick={() => void act("check")}>
          {busy === "check" ? "Checking…" : "Check for drift (dry run)"}
        </button>
        {canOperate && report && total > 0 && !confirming && !report.healed && (
          <button type="button" disabled={!!busy} onClick={() => setConfirming(true)}>Heal…</button>
        )}
      </p>
      <ReadOnlyNote />
      {confirming && (
        <div class="confirm" role="group" aria-label="Confirm heal">
          <p>
            The heal checks again and fixes what it finds through the writer: {total} difference(s) in the last check.
            Orphaned, duplicate and misrouted items are deleted from the lists.
          </p>
          <button type="button" onClick={() => void act("heal")}>Heal now</button>{" "}
          <button type="button" class="link" onClick={() => setConfirming(false)}>Cancel</button>
        </div>
      )}
      {busy === "heal" && <p role="status">Healing…</p>}
      <ErrorBox error={error} />
      {report && <ReportView r={report} total={total} />}
    </>
  );
}

function ReportView({ r, total }: { r: Report; total: number }) {
  return (
    <section class="card" aria-labelledby="drift-report" data-testid="drift-report">
      <h2 id="drift-report">
        {r.healed ? "Heal" : "Check"} of {time(r.started_ms)}: {total === 0 ? "no drift" : `${total} difference(s)`}
      </h2>
      <Facts
        id="drift"
        items={[
          ...CLASSES.map((c): [string, string] => [c, num(r.counts[c])]),
          ["Graph requests", num(r.graph_requests)],
          ["Resource units", num(r.resource_units)],
          ["In flight (skipped)", num(r.in_flight)],
        ]}
      />
      {r.healed && <p class="ok">Healed: {show(r.healed)}</p>}
      <h3>Rows and items per list</h3>
      <Table head={["List", "Rows", "Items"]}>
          {r.lists.map((l) => <tr key={l.list}><td>{l.list}</td><td>{num(l.rows)}</td><td>{num(l.items)}</td></tr>)}
        </Table>
      {r.differences.length > 0 && (
        <>
          <h3>Differences</h3>
          <Table head={["Class", "Table", "Key", "List", "Item", "Fields"]}>
                {r.differences.map((d, i) => (
                  <tr key={i}><td>{d.class}</td><td>{d.table}</td><td>{d.key}</td><td>{d.list}</td><td>{show(d.item_id)}</td><td>{show(d.fields)}</td></tr>
                ))}
              </Table>
        </>
      )}
    </section>
  );
}

// Run history with filters (pipeline, kind, status, started after) and one run's detail.
import { useState } from "preact/hooks";
import { api, call, type Schemas } from "../api/client";
import { useLoad } from "../hooks";
import { href, navigate, useLocation } from "../router";
import { Busy, Choice, ErrorBox, Facts, num, show, Table, time, useSession } from "../widgets";

type RunKind = Schemas["RunKind"];
type RunStatus = Schemas["RunStatus"];
const KINDS: RunKind[] = ["stream", "snapshot", "resnapshot", "dlq_replay", "cursor_reset", "drift_check", "drift_heal", "scheduled", "list_columns", "reload", "failover"];
const STATUSES: RunStatus[] = ["running", "succeeded", "failed", "cancelled"];

export function Runs() {
  const loc = useLocation();
  const id = loc.path.startsWith("/runs/") ? decodeURIComponent(loc.path.slice("/runs/".length)) : undefined;
  return id ? <RunDetail id={id} /> : <RunList />;
}

function RunList() {
  const { pipelines } = useSession();
  const loc = useLocation();
  const q = loc.query;
  const filters = {
    pipeline: q.get("pipeline") ?? undefined,
    kind: (q.get("kind") ?? undefined) as RunKind | undefined,
    status: (q.get("status") ?? undefined) as RunStatus | undefined,
    since: q.get("since") ?? undefined,
  };
  const [before, setBefore] = useState<string[]>([]);
  const page = before[before.length - 1];
  const { data, error, loading } = useLoad(
    () =>
      call(
        api.GET("/runs", {
          params: { query: { pipeline: filters.pipeline, kind: filters.kind, status: filters.status, before: page, limit: 50 } },
        }),
      ),
    [filters.pipeline, filters.kind, filters.status, page],
  );
  const set = (k: string, v: string) => {
    setBefore([]);
    navigate(href("/runs", { ...filters, [k]: v || undefined }), true);
  };
  // The API pages newest first; "started after" narrows what is shown.
  const since = filters.since ? Date.parse(filters.since) : NaN;
  const runs = (data?.runs ?? []).filter((r) => Number.isNaN(since) || r.started_ms >= since);
  return (
    <>
      <h1>Runs</h1>
      <form class="filters" onSubmit={(e) => e.preventDefault()} aria-label="Filters">
        <Choice label="Pipeline" value={filters.pipeline} options={pipelines} onChange={(v) => set("pipeline", v)} />
        <Choice label="Kind" value={filters.kind} options={KINDS} onChange={(v) => set("kind", v)} />
        <Choice label="Status" value={filters.status} options={STATUSES} onChange={(v) => set("status", v)} />
        <label>
          Started after
          <input type="datetime-local" value={filters.since ?? ""} onChange={(e) => set("since", (e.target as HTMLInputElement).value)} />
        </label>
      </form>
      <ErrorBox error={error} />
      <Busy when={loading && !data} />
      <Table caption="Runs, newest first" head={["Started", "Pipeline", "Kind", "Status", "Subject", "Events", "Errors"]}>
            {runs.map((r) => (
              <tr key={r.run_id}>
                <td><a href={href(`/runs/${encodeURIComponent(r.run_id)}`)}>{time(r.started_ms)}</a></td>
                <td>{r.pipeline}</td>
                <td>{r.kind}</td>
                <td><span class={`badge ${r.status}`}>{r.status}</span></td>
                <td>{r.subject ?? ""}</td>
                <td>{num(r.counts.events)}</td>
                <td>{r.errors.length}</td>
              </tr>
            ))}
          </Table>
      {data && runs.length === 0 && <p>No run matches.</p>}
      <p>
        {before.length > 0 && <button type="button" onClick={() => setBefore(before.slice(0, -1))}>Newer</button>}{" "}
        {data?.next && <button type="button" onClick={() => setBefore([...before, data.next!])}>Older</button>}
      </p>
    </>
  );
}

function RunDetail({ id }: { id: string }) {
  const { data, error } = useLoad(() => call(api.GET("/runs/{id}", { params: { path: { id } } })), [id]);
  const r = data as Schemas["RunEvent"] | undefined;
  return (
    <>
      <p><a href={href("/runs")}>← All runs</a></p>
      <h1>Run {id}</h1>
      <ErrorBox error={error} />
      {r && (
        <>
          <Facts
            items={[
              ["Pipeline", r.pipeline],
              ["Kind", r.kind],
              ["Status", r.status],
              ["Subject", r.subject ?? "–"],
              ["Started", time(r.started_ms)],
              ["Ended", time(r.ended_ms)],
              ["By", r.by ?? "–"],
              ["Owner", r.owner],
              ["Reason", r.reason ?? "–"],
            ]}
          />
          <h2>Counts</h2>
          <Facts
            id="run"
            items={Object.entries(r.counts)
              .filter(([, v]) => typeof v === "number" && v !== 0)
              .map(([k, v]) => [k, num(v as number)])}
          />
          <h2>Errors</h2>
          {r.errors.length === 0 ? <p>None.</p> : (
            <ul>{r.errors.map((e, i) => <li key={i}>{time(e.at_ms)}: {e.message}</li>)}</ul>
          )}
          {r.detail !== undefined && r.detail !== null && (
            <>
              <h2>Detail</h2>
              <pre>{show(r.detail)}</pre>
            </>
          )}
        </>
      )}
    </>
  );
}

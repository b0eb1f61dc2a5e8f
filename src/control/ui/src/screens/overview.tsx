// Pipelines overview: stages, counts, lag, throughput, budget, dead letters and parked
// conflicts of every running pipeline, refreshed every 2 s.
import { api, call, type Schemas } from "../api/client";
import type { Conflict, Cursors } from "../api/types";
import { useLoad } from "../hooks";
import { href } from "../router";
import { ErrorBox, Facts, bytes, num, pct, time } from "../widgets";

/** Often enough to see counts move, rarely enough to cost the process nothing noticeable. */
const REFRESH_MS = 2000;
/** The slot's lag needs a query on the source database: less often. */
const SLOT_REFRESH_MS = 10_000;

interface Row {
  status: Schemas["PipelineStatus"];
  pendingDlq?: number;
  parked?: number;
}

async function load(): Promise<Row[]> {
  const list = await call(api.GET("/pipelines"));
  return Promise.all(
    list.pipelines.map(async (status) => {
      const path = { name: status.name };
      const [dlq, conflicts] = await Promise.allSettled([
        call(api.GET("/pipelines/{name}/dlq", { params: { path, query: { limit: 1 } } })),
        call(api.GET("/pipelines/{name}/conflicts", { params: { path, query: { parked: true } } })),
      ]);
      return {
        status,
        pendingDlq: dlq.status === "fulfilled" ? dlq.value.pending : undefined,
        parked: conflicts.status === "fulfilled" ? (conflicts.value as Conflict[]).length : undefined,
      };
    }),
  );
}

export function Overview() {
  const { data, error } = useLoad(load, [], REFRESH_MS);
  return (
    <>
      <h1>Pipelines</h1>
      <p class="muted">Refreshes every {REFRESH_MS / 1000} s.</p>
      <ErrorBox error={error} />
      {data?.length === 0 && <p>No pipeline runs in this process.</p>}
      <div class="grid">
        {data?.map((r) => <PipelineCard key={r.status.name} row={r} />)}
      </div>
    </>
  );
}

/** The replication slot's lag behind the server's WAL, in bytes (absent: unknown). */
function useSlotLag(name: string): number | undefined {
  const { data } = useLoad(
    async () => {
      const c = (await call(api.GET("/pipelines/{name}/cursors", { params: { path: { name } } }))) as Cursors;
      const lag = c.slot.lag_bytes;
      return typeof lag === "number" ? lag : undefined;
    },
    [name],
    SLOT_REFRESH_MS,
  );
  return data;
}

function PipelineCard({ row }: { row: Row }) {
  const s = row.status;
  const slotLag = useSlotLag(s.name);
  const c = s.counts;
  const id = `p-${s.name}`;
  const state = s.paused ? "paused" : s.ready ? "running" : "starting";
  return (
    <section class="card" aria-labelledby={id} data-testid={`pipeline-${s.name}`}>
      <h2 id={id}>
        {s.name} <span class={`badge ${state}`}>{state}</span>
      </h2>
      <p class="muted">
        {s.log} log · started {time(s.started_ms)}
      </p>
      <ul class="stages" aria-label="Stages">
        {Object.entries(s.stages as Record<string, boolean>).map(([stage, up]) => (
          <li key={stage} class={up ? "up" : "down"}>
            {stage}: {up ? "up" : "not ready"}
          </li>
        ))}
      </ul>
      {Object.entries((s.reasons ?? {}) as Record<string, string>).map(([k, v]) => (
        <p key={k} class="error">
          {k}: {v}
        </p>
      ))}
      <Facts
        id="count"
        items={[
          ["Events", num(c.events)],
          ["Creates", num(c.creates)],
          ["Updates", num(c.updates)],
          ["Deletes", num(c.deletes)],
          ["Pulled", num(c.pulled)],
          ["Slot lag", bytes(slotLag)],
          ["Log lag (events)", s.lag ? num(s.lag.events) : (s.lag_error ?? "–")],
          ["Events/s", num(s.throughput.events_per_second)],
          ["RU/min", num(s.throughput.resource_units_per_minute)],
          ["Budget use", pct(s.budget.use_ratio)],
          ["429/503 answers", num(c.throttled)],
          [
            "Dead letters",
            <a href={href("/dlq", { pipeline: s.name })}>{num(row.pendingDlq ?? c.dead_letters)}</a>,
          ],
          ["Parked conflicts", <a href={href("/conflicts", { pipeline: s.name })}>{num(row.parked)}</a>],
        ]}
      />
      <p>
        <a href={href("/runs", { pipeline: s.name })}>Runs</a> ·{" "}
        <a href={href("/cursors", { pipeline: s.name })}>Cursors and slot lag</a> ·{" "}
        <a href={href("/drift", { pipeline: s.name })}>Drift</a>
      </p>
    </section>
  );
}

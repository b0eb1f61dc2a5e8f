// Cursors: the slot, consumer groups and delta links; a reset always shows its dry run (blast
// radius) first and moves the cursor only on confirmation.
import { useState } from "preact/hooks";
import { api, call, message, type Schemas } from "../api/client";
import type { Cursors } from "../api/types";
import { useLoad } from "../hooks";
import { ErrorBox, ObjectFacts, PipelinePicker, ReadOnlyNote, Table, ago, num, show, usePipeline, useSession } from "../widgets";

type Body = Schemas["ResetBody"];

function describe(b: Body): string {
  if (b.list) return `drop the delta link of list ${b.list} (the list is enumerated again)`;
  if (b.slot) return `move the replication slot to ${b.slot}`;
  return `move consumer group ${b.group} to ${b.to}`;
}

export function CursorsScreen() {
  const { canOperate, who } = useSession();
  const [pipeline, setPipeline] = usePipeline();
  const { data, error, reload } = useLoad(
    async () => (pipeline ? ((await call(api.GET("/pipelines/{name}/cursors", { params: { path: { name: pipeline } } }))) as Cursors) : undefined),
    [pipeline],
  );
  const [plan, setPlan] = useState<{ body: Body; radius: Record<string, unknown> } | undefined>();
  const [done, setDone] = useState<Record<string, unknown> | undefined>();
  const [failure, setFailure] = useState<string | undefined>();
  const [busy, setBusy] = useState(false);

  const reset = async (body: Body, dryRun: boolean) => {
    setBusy(true);
    setFailure(undefined);
    try {
      const answer = (await call(
        api.POST("/pipelines/{name}/cursors/reset", {
          params: { path: { name: pipeline! }, query: { dry_run: dryRun } },
          body: { ...body, by: who.name ?? undefined },
        }),
      )) as Record<string, unknown>;
      if (dryRun) {
        setDone(undefined);
        setPlan({ body, radius: answer });
      } else {
        setPlan(undefined);
        setDone(answer);
        reload();
      }
    } catch (e) {
      setFailure(message(e));
    } finally {
      setBusy(false);
    }
  };

  return (
    <>
      <h1>Cursors</h1>
      <form class="filters" onSubmit={(e) => e.preventDefault()}>
        <PipelinePicker value={pipeline} onChange={setPipeline} />
        <button type="button" onClick={reload}>Refresh</button>
      </form>
      <ReadOnlyNote />
      <ErrorBox error={error} />
      {plan && (
        <section class="card confirm" aria-labelledby="plan-h" data-testid="reset-plan">
          <h2 id="plan-h">Dry run: {describe(plan.body)}</h2>
          <p>Nothing has changed yet. The blast radius:</p>
          <ObjectFacts id="radius" value={plan.radius} />
          <button type="button" disabled={busy} onClick={() => void reset(plan.body, false)}>Confirm reset</button>{" "}
          <button type="button" class="link" onClick={() => setPlan(undefined)}>Cancel</button>
        </section>
      )}
      {done && (
        <section class="card" aria-labelledby="done-h" data-testid="reset-done">
          <h2 id="done-h" class="ok">Reset done</h2>
          <ObjectFacts value={done} />
        </section>
      )}
      <ErrorBox error={failure} />
      {data && (
        <>
          <section class="card" aria-labelledby="slot-h">
            <h2 id="slot-h">Replication slot</h2>
            <ObjectFacts id="slot" value={data.slot} />
            {canOperate && (
              <button type="button" disabled={busy} onClick={() => void reset({ slot: "now" }, true)}>Reset slot to now…</button>
            )}
          </section>
          <section class="card" aria-labelledby="groups-h">
            <h2 id="groups-h">Consumer groups</h2>
            <Table head={["Role", "Group", "Lag", "Partitions (committed / end)", ...(canOperate ? ["Reset"] : [])]}>
                  {data.groups.map((g) => (
                    <tr key={g.group}>
                      <td>{g.role}</td>
                      <td>{g.group}</td>
                      <td>{g.error ?? num(g.lag)}</td>
                      <td>{(g.partitions ?? []).map((p) => `${p.topic}[${p.partition}] ${show(p.committed)}/${show(p.end)}`).join(", ")}</td>
                      {canOperate && (
                        <td>
                          {g.resettable && (
                            <>
                              <button type="button" disabled={busy} onClick={() => void reset({ group: g.role, to: "earliest" }, true)} aria-label={`Reset ${g.role} to earliest`}>earliest…</button>{" "}
                              <button type="button" disabled={busy} onClick={() => void reset({ group: g.role, to: "latest" }, true)} aria-label={`Reset ${g.role} to latest`}>latest…</button>
                            </>
                          )}
                        </td>
                      )}
                    </tr>
                  ))}
                </Table>
          </section>
          <section class="card" aria-labelledby="lists-h">
            <h2 id="lists-h">Lists (delta links)</h2>
            <Table head={["List", "Pulls", "Delta link", "Phase", "Age", ...(canOperate ? ["Reset"] : [])]}>
                  {data.lists.map((l) => (
                    <tr key={l.list_id}>
                      <td>{l.list}</td>
                      <td>{l.pulls ? "yes" : "no"}</td>
                      <td>{l.error ?? (l.delta_link ? "stored" : "none")}</td>
                      <td>{l.phase ?? "–"}</td>
                      <td>{ago(l.age_ms)}</td>
                      {canOperate && (
                        <td>
                          {l.pulls && (
                            <button type="button" disabled={busy} onClick={() => void reset({ list: l.list, to: "none" }, true)} aria-label={`Reset delta link of ${l.list}`}>
                              Reset delta link…
                            </button>
                          )}
                        </td>
                      )}
                    </tr>
                  ))}
                </Table>
          </section>
        </>
      )}
    </>
  );
}

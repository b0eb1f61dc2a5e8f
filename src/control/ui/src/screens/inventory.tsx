// Inventory (applications → databases → instances → tables and lists) and the catalog of a
// source database (tables, columns, keys, replica identity, publications).
import { useState } from "preact/hooks";
import { api, call, message, type Schemas } from "../api/client";
import { useLoad } from "../hooks";
import { Busy, ErrorBox, show, Table } from "../widgets";

export function InventoryScreen() {
  const { data, error, loading } = useLoad(() => call(api.GET("/inventory")), []);
  const [db, setDb] = useState<string | undefined>();
  return (
    <>
      <h1>Inventory</h1>
      <ErrorBox error={error} />
      <Busy when={loading && !data} />
      {data?.applications.map((a) => (
        <section class="card" key={a.name ?? "-"} aria-label={`Application ${a.name ?? "(none)"}`}>
          <h2>{a.name ?? "(no application label)"}</h2>
          {a.databases.map((d) => (
            <div key={d.name}>
              <h3>
                Database {d.name}{" "}
                <button type="button" onClick={() => setDb(d.name)} aria-label={`Show catalog of ${d.name}`}>Catalog</button>
              </h3>
              <p class="muted">
                {d.instances.map((i) => `${i.host}:${i.port}`).join(", ")} · pipelines {d.pipelines.map((p) => p.name).join(", ")}
              </p>
              <ul>
                {d.tables.map((t) => (
                  <li key={`${t.schema}.${t.name}`}>
                    {t.schema}.{t.name} → {t.lists.join(", ")} <span class="muted">({t.pipeline})</span>
                  </li>
                ))}
              </ul>
            </div>
          ))}
        </section>
      ))}
      {db && <Catalog db={db} />}
    </>
  );
}

function Catalog({ db }: { db: string }) {
  const { data, error } = useLoad(() => call(api.GET("/catalog/{database}/tables", { params: { path: { database: db } } })), [db]);
  const [open, setOpen] = useState<string | undefined>();
  const [detail, setDetail] = useState<Schemas["CatalogTable"] | string | undefined>();
  const show1 = async (t: Schemas["CatalogTable"]) => {
    const name = `${t.schema}.${t.name}`;
    setOpen(name);
    setDetail(t);
    try {
      setDetail(await call(api.GET("/catalog/{database}/tables/{table}", { params: { path: { database: db, table: name } } })));
    } catch (e) {
      setDetail(message(e));
    }
  };
  return (
    <section class="card" aria-labelledby="catalog-h" data-testid="catalog">
      <h2 id="catalog-h">Catalog of {db}</h2>
      <ErrorBox error={error} />
      <Table head={["Table", "Kind", "Primary key", "Replica identity", "Publications", "Synced by"]}>
            {data?.tables.map((t) => (
              <tr key={`${t.schema}.${t.name}`}>
                <td><button type="button" class="link" onClick={() => void show1(t)}>{t.schema}.{t.name}</button></td>
                <td>{show(t.kind)}</td>
                <td>{show(t.primary_key)}</td>
                <td>{show(t.replica_identity)}</td>
                <td>{t.publications.join(", ")}</td>
                <td>{show(t.synced_by)}</td>
              </tr>
            ))}
          </Table>
      {open && typeof detail === "string" && <ErrorBox error={detail} />}
      {open && detail && typeof detail !== "string" && (
        <>
          <h3>Columns of {open}</h3>
          <Table head={["Column", "Type", "Nullable", "Default"]}>
              {detail.columns.map((c) => (
                <tr key={c.name}><td>{c.name}</td><td>{c.type}</td><td>{c.nullable ? "yes" : "no"}</td><td>{show(c.default)}</td></tr>
              ))}
            </Table>
        </>
      )}
    </section>
  );
}

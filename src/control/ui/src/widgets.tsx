// Small pieces every screen uses: errors, numbers, times, the pipeline picker, key/value lists.
import type { ComponentChildren } from "preact";
import { createContext } from "preact";
import { useContext } from "preact/hooks";
import type { Whoami } from "./api/types";

export interface Session {
  who: Whoami;
  canOperate: boolean;
  pipelines: string[];
}

export const SessionContext = createContext<Session>({
  who: { role: "read", open: false },
  canOperate: false,
  pipelines: [],
});

export const useSession = () => useContext(SessionContext);

export function ErrorBox({ error }: { error?: string }) {
  if (!error) return null;
  return (
    <p class="error" role="alert">
      {error}
    </p>
  );
}

export function Busy({ when, children }: { when: boolean; children?: ComponentChildren }) {
  return when ? (
    <p class="muted" role="status">
      {children ?? "Loading…"}
    </p>
  ) : null;
}

const nf = new Intl.NumberFormat("en", { maximumFractionDigits: 2 });

export function num(v: number | null | undefined): string {
  return v === null || v === undefined ? "–" : nf.format(v);
}

export function bytes(v: number | null | undefined): string {
  if (v === null || v === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${nf.format(v)} ${units[i]}`;
}

export function pct(v: number | null | undefined): string {
  return v === null || v === undefined ? "–" : `${nf.format(v * 100)} %`;
}

export function time(ms: number | null | undefined): string {
  if (!ms) return "–";
  return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

export function ago(ms: number | null | undefined): string {
  if (ms === null || ms === undefined) return "–";
  const s = Math.round(ms / 1000);
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${Math.round(s / 3600)} h`;
}

export function show(v: unknown): string {
  if (v === null || v === undefined) return "–";
  return typeof v === "string" ? v : JSON.stringify(v);
}

/** A definition list of label → value; `id` prefixes each value's data-testid. */
export function Facts({ items, id }: { items: [string, ComponentChildren][]; id?: string }) {
  return (
    <dl class="facts">
      {items.map(([k, v]) => (
        <div key={k}>
          <dt>{k}</dt>
          <dd data-testid={id ? `${id}-${k.toLowerCase().replace(/[^a-z0-9]+/g, "-")}` : undefined}>{v}</dd>
        </div>
      ))}
    </dl>
  );
}

/** A JSON object's scalar members as facts, nested values as JSON text. */
export function ObjectFacts({ value, id }: { value: Record<string, unknown>; id?: string }) {
  return <Facts id={id} items={Object.entries(value).map(([k, v]) => [k, show(v)])} />;
}

export function PipelinePicker({ value, onChange }: { value?: string; onChange: (p: string) => void }) {
  const { pipelines } = useSession();
  return (
    <label>
      Pipeline
      <select value={value ?? ""} onChange={(e) => onChange((e.target as HTMLSelectElement).value)}>
        {pipelines.map((p) => (
          <option key={p} value={p}>
            {p}
          </option>
        ))}
      </select>
    </label>
  );
}

/** Shown instead of an action for a read-only token. */
export function ReadOnlyNote() {
  const { canOperate } = useSession();
  if (canOperate) return null;
  return <p class="muted">Read-only token: actions need an operate token.</p>;
}

export function Section({ title, children, id }: { title: string; children: ComponentChildren; id?: string }) {
  return (
    <section aria-labelledby={id} class="card">
      <h2 id={id}>{title}</h2>
      {children}
    </section>
  );
}

import { href, navigate, useLocation } from "./router";

/** The pipeline a screen shows (`?pipeline=`, else the first), and a setter that keeps the URL. */
export function usePipeline(): [string | undefined, (p: string) => void] {
  const { pipelines } = useSession();
  const loc = useLocation();
  const chosen = loc.query.get("pipeline") ?? pipelines[0];
  const set = (p: string) => {
    const q = Object.fromEntries(loc.query.entries());
    navigate(href(loc.path, { ...q, pipeline: p }), true);
  };
  return [chosen, set];
}

/** A table that scrolls sideways on a narrow window; `head` are the column headers. */
export function Table({ head, caption, children }: { head: ComponentChildren[]; caption?: string; children: ComponentChildren }) {
  return (
    <div class="scroll">
      <table>
        {caption && <caption class="sr-only">{caption}</caption>}
        <thead>
          <tr>
            {head.map((h, i) => (
              <th scope="col" key={i}>
                {h}
              </th>
            ))}
          </tr>
        </thead>
        <tbody>{children}</tbody>
      </table>
    </div>
  );
}

/** A labelled select whose first option ("all") means no choice. */
export function Choice({ label, value, options, onChange }: { label: string; value?: string; options: readonly string[]; onChange: (v: string) => void }) {
  return (
    <label>
      {label}
      <select value={value ?? ""} onChange={(e) => onChange((e.target as HTMLSelectElement).value)}>
        <option value="">all</option>
        {options.map((o) => (
          <option key={o}>{o}</option>
        ))}
      </select>
    </label>
  );
}

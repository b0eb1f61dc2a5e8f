// The shell: sign-in, the session (token role, pipeline names), navigation and the screens.
import { useEffect, useRef, useState } from "preact/hooks";
import { api, ApiFailure, call, message, token, UNAUTHORIZED_EVENT } from "./api/client";
import type { Whoami } from "./api/types";
import { href, navigate, onLinkClick, useLocation } from "./router";
import { SessionContext, type Session } from "./widgets";
import { Overview } from "./screens/overview";
import { Runs } from "./screens/runs";
import { Lineage } from "./screens/lineage";
import { Conflicts } from "./screens/conflicts";
import { Dlq } from "./screens/dlq";
import { Drift } from "./screens/drift";
import { CursorsScreen } from "./screens/cursors";
import { InventoryScreen } from "./screens/inventory";
import { LedgerScreen } from "./screens/ledger";
import { Mapping } from "./screens/mapping";

const SCREENS: { path: string; label: string; view: () => preact.JSX.Element }[] = [
  { path: "/", label: "Pipelines", view: Overview },
  { path: "/runs", label: "Runs", view: Runs },
  { path: "/lineage", label: "Row lineage", view: Lineage },
  { path: "/conflicts", label: "Conflicts", view: Conflicts },
  { path: "/dlq", label: "Dead letters", view: Dlq },
  { path: "/drift", label: "Drift", view: Drift },
  { path: "/ledger", label: "Ledger", view: LedgerScreen },
  { path: "/mapping", label: "Mapping", view: Mapping },
  { path: "/cursors", label: "Cursors", view: CursorsScreen },
  { path: "/inventory", label: "Inventory", view: InventoryScreen },
];

/** The token's role and the pipelines, or why they could not be had. */
async function openSession(): Promise<Session> {
  const who = (await call(api.GET("/whoami"))) as Whoami;
  const list = await call(api.GET("/pipelines"));
  return {
    who,
    canOperate: who.role === "operate",
    pipelines: list.pipelines.map((p) => p.name),
  };
}

function refusal(e: unknown): string {
  if (e instanceof ApiFailure && e.status === 401)
    return "This token was refused: it is not one of the tokens in control.tokens. Check it and sign in again.";
  return message(e);
}

export function App() {
  const [session, setSession] = useState<Session | null>(null);
  const [problem, setProblem] = useState<string | undefined>();
  const [checking, setChecking] = useState(true);

  // A token stored in this tab signs in by itself (a reload keeps the session). Without one
  // nothing is asked: a refused call would only say what the form says.
  useEffect(() => {
    if (!token.get()) {
      setChecking(false);
      return;
    }
    openSession()
      .then(setSession, (e) => setProblem(refusal(e)))
      .finally(() => setChecking(false));
  }, []);

  useEffect(() => {
    const signOut = () => {
      if (!token.get()) return;
      token.clear();
      setSession(null);
      setProblem("The API no longer accepts this token. Sign in again.");
    };
    window.addEventListener(UNAUTHORIZED_EVENT, signOut);
    return () => window.removeEventListener(UNAUTHORIZED_EVENT, signOut);
  }, []);

  if (checking) return <p role="status">Connecting to SyncBridge…</p>;
  if (!session) return <SignIn problem={problem} onSession={(s) => { setProblem(undefined); setSession(s); }} />;
  return (
    <SessionContext.Provider value={session}>
      <Shell
        session={session}
        onSignOut={() => {
          token.clear();
          setSession(null);
          setProblem(undefined);
          navigate(href("/"), true);
        }}
      />
    </SessionContext.Provider>
  );
}

function SignIn({ problem, onSession }: { problem?: string; onSession: (s: Session) => void }) {
  const [value, setValue] = useState("");
  const [error, setError] = useState(problem);
  const [busy, setBusy] = useState(false);
  const signIn = async (t: string) => {
    setBusy(true);
    setError(undefined);
    if (t) token.set(t);
    else token.clear();
    try {
      onSession(await openSession());
    } catch (err) {
      token.clear();
      setError(refusal(err));
    } finally {
      setBusy(false);
    }
  };
  const submit = (e: Event) => {
    e.preventDefault();
    void signIn(value.trim());
  };
  return (
    <main class="signin">
      <h1>SyncBridge</h1>
      <form onSubmit={submit} class="card" aria-describedby="signin-help">
        <p id="signin-help">
          Sign in with an API token from <code>control.tokens</code>. It is kept in this browser tab only (session
          storage) and sent as a bearer token.
        </p>
        <label>
          API token
          <input
            type="password"
            name="token"
            autoComplete="current-password"
            required
            value={value}
            onInput={(e) => setValue((e.target as HTMLInputElement).value)}
          />
        </label>
        <button type="submit" disabled={busy || !value.trim()}>
          {busy ? "Signing in…" : "Sign in"}
        </button>
        <p class="muted">
          An API without tokens (control.tokens empty, loopback only):{" "}
          <button type="button" class="link" disabled={busy} onClick={() => void signIn("")}>
            continue without a token
          </button>
        </p>
        {error && (
          <p class="error" role="alert" data-testid="signin-error">
            {error}
          </p>
        )}
      </form>
    </main>
  );
}

function Shell({ session, onSignOut }: { session: Session; onSignOut: () => void }) {
  const loc = useLocation();
  const screen = SCREENS.find((s) => s.path === loc.path) ??
    SCREENS.find((s) => s.path !== "/" && loc.path.startsWith(`${s.path}/`));
  const View = screen?.view;
  useEffect(() => {
    document.title = `${screen?.label ?? "Not found"} · SyncBridge`;
  }, [screen]);
  // After an in-app navigation, keyboard and screen-reader users continue at the new content
  // (not at the link they left); the first render leaves focus where the browser put it.
  const first = useRef(true);
  useEffect(() => {
    if (first.current) {
      first.current = false;
      return;
    }
    document.getElementById("main")?.focus();
  }, [loc.path]);
  return (
    <div class="shell" onClick={(e) => onLinkClick(e as unknown as MouseEvent)}>
      <a class="skip" href="#main">
        Skip to content
      </a>
      <header>
        <span class="brand">SyncBridge</span>
        <nav aria-label="Screens">
          <ul>
            {SCREENS.map((s) => (
              <li key={s.path}>
                <a
                  href={href(s.path, { pipeline: loc.query.get("pipeline") ?? undefined })}
                  aria-current={s === screen ? "page" : undefined}
                >
                  {s.label}
                </a>
              </li>
            ))}
          </ul>
        </nav>
        <span class="who" data-testid="who">
          {session.who.open ? "open API" : `${session.who.name} (${session.who.role})`}
        </span>
        <button type="button" class="link" onClick={onSignOut}>
          Sign out
        </button>
      </header>
      <main id="main" tabIndex={-1}>
        {View ? <View /> : <p class="error">No screen at {loc.path}.</p>}
      </main>
    </div>
  );
}


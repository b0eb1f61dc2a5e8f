// The API client: generated types (schema.d.ts, from schemas/openapi.json by `npm run gen:api`)
// and openapi-fetch. The token lives in this tab's session storage only (never in a URL); every
// call sends it as a bearer token. Failures become an ApiFailure with a sentence for the operator.
import createClient, { type Middleware } from "openapi-fetch";
import type { components, paths } from "./schema";

export type Schemas = components["schemas"];
export type Problem = Schemas["Problem"];

const TOKEN_KEY = "syncbridge.token";

export const token = {
  get: (): string | null => sessionStorage.getItem(TOKEN_KEY),
  set: (t: string) => sessionStorage.setItem(TOKEN_KEY, t),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

/** Fired when the API refuses the stored token (401): the app signs out and says why. */
export const UNAUTHORIZED_EVENT = "syncbridge:unauthorized";

const bearer: Middleware = {
  onRequest({ request }) {
    const t = token.get();
    if (t) request.headers.set("Authorization", `Bearer ${t}`);
    return request;
  },
};

export const api = createClient<paths>({ baseUrl: window.location.origin });
api.use(bearer);

export class ApiFailure extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly kind?: string,
    readonly field?: string,
  ) {
    super(message);
  }
}

export const UNREACHABLE =
  "The SyncBridge API cannot be reached. Is the syncbridge process running, and is this page served by it?";

type Answer = { data?: unknown; error?: unknown; response: Response };

/** The answer's data, or an ApiFailure saying what went wrong. */
export async function call<R extends Answer>(p: Promise<R>): Promise<NonNullable<R["data"]>> {
  let r: R;
  try {
    r = await p;
  } catch {
    throw new ApiFailure(UNREACHABLE, 0, "unreachable");
  }
  if (r.response.ok) return r.data as NonNullable<R["data"]>;
  const problem = (typeof r.error === "object" ? r.error : null) as Partial<Problem> | null;
  const status = r.response.status;
  if (status === 401) window.dispatchEvent(new Event(UNAUTHORIZED_EVENT));
  const detail =
    problem?.detail ??
    (status >= 502 && status <= 504 && !problem
      ? UNREACHABLE
      : `${status} ${r.response.statusText}`);
  throw new ApiFailure(detail, status, problem?.kind, problem?.["invalid-params"]?.[0]?.name);
}

export function message(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

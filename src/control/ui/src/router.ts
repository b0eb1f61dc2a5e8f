// A few lines of history routing under /ui (the server answers index.html for any app path, so a
// reload or a shared link works). Query parameters carry a screen's filters.
import { useEffect, useState } from "preact/hooks";

export const BASE = "/ui";
const CHANGE = "syncbridge:navigate";

export interface Location {
  path: string; // under BASE, e.g. "/runs"
  query: URLSearchParams;
}

function current(): Location {
  const p = window.location.pathname;
  const path = p.startsWith(BASE) ? p.slice(BASE.length) || "/" : "/";
  return { path, query: new URLSearchParams(window.location.search) };
}

export function href(path: string, query?: Record<string, string | undefined>): string {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query ?? {})) if (v) q.set(k, v);
  const s = q.toString();
  return `${BASE}${path}${s ? `?${s}` : ""}`;
}

export function navigate(to: string, replace = false) {
  if (replace) window.history.replaceState(null, "", to);
  else window.history.pushState(null, "", to);
  window.dispatchEvent(new Event(CHANGE));
}

export function useLocation(): Location {
  const [loc, setLoc] = useState(current);
  useEffect(() => {
    const update = () => setLoc(current());
    window.addEventListener("popstate", update);
    window.addEventListener(CHANGE, update);
    return () => {
      window.removeEventListener("popstate", update);
      window.removeEventListener(CHANGE, update);
    };
  }, []);
  return loc;
}

/** Left clicks on in-app links navigate without reloading. */
export function onLinkClick(e: MouseEvent) {
  const a = (e.target as Element | null)?.closest?.("a");
  if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey) return;
  const url = new URL(a.href, window.location.href);
  if (url.origin !== window.location.origin || !url.pathname.startsWith(BASE) || a.target) return;
  // An anchor on this page (the skip link): the browser moves focus there itself.
  if (url.hash && url.pathname === window.location.pathname) return;
  e.preventDefault();
  navigate(url.pathname + url.search);
}

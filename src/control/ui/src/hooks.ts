import { useCallback, useEffect, useRef, useState } from "preact/hooks";
import { message } from "./api/client";

export interface Loaded<T> {
  data?: T;
  error?: string;
  loading: boolean;
  reload: () => void;
}

/**
 * Loads with `load` when `deps` change and, with `everyMs`, again on that period (skipped while
 * the tab is hidden). Keeps the last data while reloading, so live screens do not flicker.
 */
export function useLoad<T>(load: () => Promise<T>, deps: unknown[], everyMs?: number): Loaded<T> {
  const [state, setState] = useState<{ data?: T; error?: string; loading: boolean }>({ loading: true });
  const seq = useRef(0);
  const run = useCallback(() => {
    const mine = ++seq.current;
    setState((s) => ({ ...s, loading: true }));
    load().then(
      (data) => mine === seq.current && setState({ data, loading: false }),
      (e) => mine === seq.current && setState((s) => ({ data: s.data, error: message(e), loading: false })),
    );
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, deps);
  useEffect(() => {
    setState({ loading: true });
    run();
    if (!everyMs) return;
    const t = window.setInterval(() => document.visibilityState === "visible" && run(), everyMs);
    return () => window.clearInterval(t);
  }, [run, everyMs]);
  return { ...state, reload: run };
}

/** Runs an action once at a time; remembers its result or error for display. */
export function useAction<A extends unknown[], T>(act: (...args: A) => Promise<T>) {
  const [state, setState] = useState<{ busy: boolean; result?: T; error?: string }>({ busy: false });
  const run = useCallback(
    async (...args: A) => {
      setState({ busy: true });
      try {
        const result = await act(...args);
        setState({ busy: false, result });
        return result;
      } catch (e) {
        setState({ busy: false, error: message(e) });
        return undefined;
      }
    },
    [act],
  );
  return { ...state, run, reset: () => setState({ busy: false }) };
}

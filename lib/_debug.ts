/**
 * Tracing: one readable line per option, command and reply, through an
 * optional hook. `NBD_DEBUG=1` in the environment turns it on for stderr.
 *
 * @module
 */

import type { DebugHook } from "./connect_options.ts";

/** A tracer that does nothing costs one branch at each call site. */
export type Tracer = DebugHook | undefined;

function envDebug(): boolean {
  try {
    const state = Deno.permissions.querySync?.({
      name: "env",
      variable: "NBD_DEBUG",
    }).state;
    if (state !== "granted") return false;
    const v = Deno.env.get("NBD_DEBUG");
    return v !== undefined && v !== "" && v !== "0";
  } catch {
    return false;
  }
}

function formatValue(v: unknown): string {
  if (typeof v === "string") return JSON.stringify(v);
  if (typeof v === "bigint") return v.toString();
  if (Array.isArray(v)) return `[${v.map(formatValue).join(",")}]`;
  return String(v);
}

/** Formats an event as `nbd: event key=value ...`. */
export function formatEvent(
  event: string,
  fields: Record<string, unknown>,
): string {
  const parts = Object.entries(fields)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${k}=${formatValue(v)}`);
  return `nbd: ${event}${parts.length ? " " + parts.join(" ") : ""}`;
}

const encoder = new TextEncoder();

/** Writes formatted events to stderr, as libnbd's debug output does. */
export const stderrHook: DebugHook = (event, fields) => {
  try {
    Deno.stderr.writeSync(encoder.encode(formatEvent(event, fields) + "\n"));
  } catch {
    // Tracing must never break the connection.
  }
};

/**
 * Resolves the `debug` option (and `NBD_DEBUG`) to a tracer. A hook of the
 * caller's is called through a guard: what it throws is dropped, since a
 * trace call sits inside the request and reply paths (a throw there left a
 * request holding its slot forever, or failed the connection).
 */
export function makeTracer(option: boolean | DebugHook | undefined): Tracer {
  if (typeof option === "function") {
    return (event, fields) => {
      try {
        option(event, fields);
      } catch {
        // The hook's own failure is the hook's business.
      }
    };
  }
  if (option === true) return stderrHook;
  if (option === undefined && envDebug()) return stderrHook;
  return undefined;
}

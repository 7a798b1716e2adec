/**
 * `info`'s run: does what the command line asks, prints it in one piece,
 * and turns failures and interrupts into one line and an exit status.
 *
 * @module
 */

import {
  errorLine,
  INTERRUPTED_STATUS,
  readCommandLine,
  visible,
  warn,
  withInterrupt,
  writeAll,
} from "../_cli.ts";
import { gather } from "./facts.ts";
import { listOutput } from "./list.ts";
import { mapOutput, readMap, totalsOutput } from "./map.ts";
import { parseRequest, type Request, USAGE } from "./options.ts";
import {
  exportJson,
  exportText,
  exportUri,
  jsonText,
  sessionJson,
  sessionText,
} from "./show.ts";

/**
 * After ^C, how long the work in flight gets to settle, so that a server
 * the tool started is stopped before the tool exits.
 */
const SETTLE_MS = 3_000;

/** Does what was asked: the text for stdout and the exit status. */
async function run(
  r: Exclude<Request, { mode: "help" | "version" }>,
  signal: AbortSignal,
): Promise<{ out: string; status: number }> {
  switch (r.mode) {
    case "can": {
      const g = await gather(r.target, undefined, signal);
      return { out: "", status: r.test(g.session, g.export) ? 0 : 2 };
    }
    case "size": {
      const g = await gather(r.target, undefined, signal);
      return { out: `${g.export.size}\n`, status: 0 };
    }
    case "uri": {
      // Connected first, as nbdinfo: the URI of an export that answers.
      const g = await gather(r.target, undefined, signal);
      const uri = exportUri(r.target, g.export.exportName)!;
      return {
        out: `${visible(r.json ? JSON.stringify(uri) : uri)}\n`,
        status: 0,
      };
    }
    case "map": {
      const { size, runs } = await readMap(r.target, r.context, signal);
      const out = r.totals
        ? totalsOutput(r.context, size, runs, r.json)
        : mapOutput(r.context, runs, r.json);
      return { out, status: 0 };
    }
    case "list": {
      const { text, ok } = await listOutput(
        r.target,
        r.json,
        r.content,
        signal,
      );
      return { out: text, status: ok ? 0 : 1 };
    }
    case "show": {
      const g = await gather(r.target, undefined, signal, r.content);
      const uri = exportUri(r.target, g.export.exportName);
      const out = r.json
        ? jsonText(
          { ...sessionJson(g.session), exports: [exportJson(uri, g.export)] },
          2,
        ) + "\n"
        : sessionText(g.session) + exportText(uri, g.export);
      return { out, status: 0 };
    }
  }
}

/**
 * Runs the tool.
 *
 * @param args Command-line arguments, without the program name.
 * @returns The exit status: 0, 1 on failure, 2 for a `--can`/`--is`/`--has`
 *   "no" (or a `--cannot`/`--isnt`/`--hasnt` "yes"),
 *   130 when interrupted (SIGINT, SIGTERM): after the first signal the
 *   work in flight gets up to 3 s to settle, a second one exits at once
 *   (see `withInterrupt()`).
 */
export async function main(args: string[]): Promise<number> {
  const read = await readCommandLine("info", USAGE, parseRequest, args);
  if ("exit" in read) return read.exit;
  const request: Request = read.request;
  // ^C (or SIGTERM) ends the run at once, connecting or not; the signal
  // also closes what is open. A second one exits without waiting.
  return await withInterrupt(async ({ signal, stopped }) => {
    try {
      const running = run(request, signal);
      running.catch(() => {});
      const result = await Promise.race([running, stopped]);
      if (result === "interrupted") {
        warn("info: interrupted");
        await settled(running, SETTLE_MS);
        return INTERRUPTED_STATUS;
      }
      // All at once at the end: a failure never leaves half a report.
      if (result.out) await writeAll(Deno.stdout, result.out);
      return result.status;
    } catch (e) {
      if (signal.aborted) {
        warn("info: interrupted");
        return INTERRUPTED_STATUS;
      }
      warn(errorLine("info", e));
      return 1;
    }
  });
}

/** Waits for `p` to settle, but at most `ms`. */
async function settled(p: Promise<unknown>, ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  await Promise.race([
    p.catch(() => {}),
    new Promise((r) => timer = setTimeout(r, ms)),
  ]);
  clearTimeout(timer);
}

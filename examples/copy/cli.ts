/**
 * `copy`'s `main()`: reads the command line (`options.ts`), opens both
 * ends, runs the copy (`transfer.ts`), reports, and closes everything again
 * within a bound, on success, failure or ^C alike.
 *
 * @module
 */

import {
  checkParentDirectory,
  errorLine,
  INTERRUPTED_STATUS,
  readCommandLine,
  UsageError,
  warn,
  withInterrupt,
  writeAll,
} from "../_cli.ts";
import {
  type Progress,
  type ProgressMode,
  progressMode,
} from "../_progress.ts";
import { checkBlkhash } from "../../mod.ts";
import { alignMap, type DirtyMap, formatMap, walkDirty } from "./dirty.ts";
import type { Destination, Source } from "./endpoint.ts";
import { NbdEndpoint, type NbdTarget } from "./nbd.ts";
import {
  openDestination,
  openExistingDestination,
  openSource,
  refuseSameFile,
} from "./open.ts";
import { parseRequest, type Request, USAGE } from "./options.ts";
import { CLOSE_MS, transfer } from "./transfer.ts";

/**
 * Runs the tool.
 *
 * @param args Command-line arguments, without the program name.
 * @returns The exit status: 0 when every byte was copied, 1 otherwise
 * (usage errors included), 130 when interrupted.
 */
export async function main(args: string[]): Promise<number> {
  const read = await readCommandLine("copy", USAGE, parseRequest, args);
  if ("exit" in read) return read.exit;
  const request: Request = read.request;

  // The first ^C stops the copy and closes the connections, within
  // GRACE_MS; a second one exits at once (withInterrupt's rule).
  return await withInterrupt(async ({ controller, reason, stopped }) => {
    const state: RunState = {};
    let grace: ReturnType<typeof setTimeout> | undefined;
    const gaveUp = stopped.then(() =>
      new Promise<number>((resolve) => {
        grace = setTimeout(() => {
          state.progress?.finish(false);
          warn("copy: interrupted");
          resolve(INTERRUPTED_STATUS);
        }, GRACE_MS);
      })
    );
    try {
      return await Promise.race([
        run(request, controller, reason, state),
        gaveUp,
      ]);
    } finally {
      clearTimeout(grace);
    }
  });
}

/**
 * How long one ^C leaves the copy to stop cleanly before the process
 * exits anyway: some waits cannot be cut short (a read from stdin, a
 * write to a pipe nobody reads, a file on a hung mount).
 */
const GRACE_MS = 2_000;

/** What {@linkcode run} has opened so far, for the way out. */
interface RunState {
  progress?: Progress;
}

/**
 * Checks what can only be checked on the system, opens both ends, copies,
 * and closes everything again.
 *
 * @returns The exit status.
 */
async function run(
  request: Request,
  controller: AbortController,
  interrupted: Error,
  state: RunState,
): Promise<number> {
  const signal = controller.signal;
  let mode: ProgressMode | undefined;
  let src: Source | undefined;
  let dst: Destination | undefined;
  let ok = false;
  try {
    // Everything that can refuse the copy comes before the destination is
    // opened, which replaces a regular file.
    mode = openProgress(request);
    let map: DirtyMap | undefined;
    if (request.settings.dirty !== undefined) {
      // The map is walked before the destination is opened: a source that
      // cannot give it leaves the earlier copy as it was.
      const nbd = await NbdEndpoint.open(
        request.source as NbdTarget,
        "source",
        request.settings,
        signal,
      );
      src = nbd;
      map = await walkDirty(
        nbd.status(request.settings.dirty),
        nbd.size,
        request.dirtyMask,
        signal,
      );
      if (request.mapOnly) {
        const shown = alignMap(map, nbd.alignment, nbd.size);
        await writeAll(Deno.stdout, formatMap(shown, request.json));
        ok = true;
        if (request.settings.verbose) {
          warn(
            `copy: ${map.bytes} dirty bytes in ${map.offsets.length} extent(s) of ${nbd.size}`,
          );
          warn(wireLine("source", nbd));
        }
        return 0;
      }
      dst = await openExistingDestination(
        request.destination,
        nbd.size,
        request.settings,
        signal,
      );
    } else {
      const { source, destination, settings } = request;
      if (typeof source === "string" && typeof destination === "string") {
        await refuseSameFile(source, destination);
      }
      src = await openSource(source, settings, signal);
      // What --blkhash needs is known now: refuse before the destination
      // (which may be replaced) is touched.
      await checkBlkhashRequest(request, src.size);
      dst = await openDestination(destination, settings, signal);
    }
    // parseRequest() leaves no --blkhash beside --dirty.
    const summary = await transfer(
      src,
      dst,
      request.settings,
      mode,
      controller,
      (p) => state.progress = p,
      map,
      {
        blkhash: request.blkhash,
        blkhashFile: request.blkhashFile,
        rate: request.rate,
      },
    );
    ok = true;
    if (request.settings.verbose) {
      warn(summary);
      for (const [role, e] of [["source", src], ["destination", dst]]) {
        if (e instanceof NbdEndpoint) warn(wireLine(role as string, e));
      }
    }
    return 0;
  } catch (e) {
    const wasInterrupted = signal.reason === interrupted;
    controller.abort(e);
    state.progress?.finish(false);
    if (wasInterrupted) {
      warn("copy: interrupted");
      return INTERRUPTED_STATUS;
    }
    warn(errorLine("copy", e));
    return 1;
  } finally {
    // A descriptor opened for a reporter that never started.
    if (!state.progress && mode?.kind === "fd" && mode.owned) {
      mode.out.close();
    }
    await closeWithin([src, dst], ok ? CLOSE_MS.finished : CLOSE_MS.stopped);
  }
}

/**
 * Where progress goes, with the descriptor of `--progress=FD` opened now,
 * before the destination is: a descriptor that is not open must not cost
 * the user the destination's old contents.
 *
 * @throws {Error} Naming `--progress` when FD cannot be written.
 */
function openProgress(request: Request): ProgressMode {
  try {
    return progressMode(request.progress, request.noProgress);
  } catch (e) {
    const option = `--progress=${request.progress}`;
    if (e instanceof Deno.errors.NotFound) {
      throw new Error(`${option}: descriptor ${request.progress} is not open`);
    }
    throw new Error(`${option}: cannot write to it`, { cause: e });
  }
}

/**
 * Closes both ends, in at most `ms`: the signal bounds each close's wait
 * for requests in flight, and a close still running a moment after it is
 * left behind (the process is about to exit, which tears the sockets
 * down).
 */
async function closeWithin(
  ends: (Source | Destination | undefined)[],
  ms: number,
): Promise<void> {
  const signal = AbortSignal.timeout(ms);
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<void>((resolve) => {
    signal.addEventListener("abort", () => {
      timer = setTimeout(resolve, 100);
    }, { once: true });
  });
  const closing = Promise.allSettled(ends.map((e) => e?.close(signal)));
  try {
    await Promise.race([closing, late]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * What went over the wire to one NBD end, for `--verbose`: bytes and
 * requests each way, handshake included, requests by command.
 */
function wireLine(role: string, end: NbdEndpoint): string {
  const s = end.stats;
  const byCommand = Object.entries(s.requests)
    .map(([name, n]) => `${name} ${n}`)
    .join(", ");
  return `copy: ${role} ${end.name}: sent ${s.bytesSent} bytes in ${s.chunksSent} request(s) (${
    byCommand || "none"
  }), received ${s.bytesReceived} bytes in ${s.chunksReceived} chunk(s)`;
}

/**
 * Refuses, before the destination is opened, a `--blkhash` whose table
 * would be too large and a `--blkhash-file` that cannot be written.
 *
 * @throws {UsageError} Naming the option and the fix.
 */
async function checkBlkhashRequest(
  request: Request,
  size: number | undefined,
): Promise<void> {
  const hash = request.blkhash;
  if (hash === undefined) return;
  if (size !== undefined) {
    try {
      checkBlkhash(hash.digest, hash.blockSize, size);
    } catch (e) {
      if (e instanceof RangeError) {
        throw new UsageError(`--blkhash: ${e.message}`);
      }
      throw e;
    }
  }
  const file = request.blkhashFile;
  if (file === undefined) return;
  checkParentDirectory(`--blkhash-file=${file}`, file);
  const existing = await Deno.stat(file).catch(() => undefined);
  if (existing !== undefined && !existing.isFile) {
    throw new UsageError(`--blkhash-file=${file}: not a regular file`);
  }
}

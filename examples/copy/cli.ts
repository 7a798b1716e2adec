/**
 * The command line of `copy`: options, the checks on them, and `main()`,
 * which opens both ends, runs the plan through the pump and reports.
 *
 * @module
 */

import { parseUri } from "../../mod.ts";
import {
  errorLine,
  humanBytes,
  INTERRUPTED_STATUS,
  type OptionSpec,
  parseArgs,
  parseCount,
  parseSize,
  parseSparse,
  Progress,
  type ProgressMode,
  progressMode,
  type ServerCommand,
  serverCommand,
  UsageError,
  VERSION_OPTION,
  versionText,
  warn,
  warnUsage,
  withInterrupt,
  writeAll,
} from "../_cli.ts";
import type { Destination, Settings, Source } from "./endpoint.ts";
import {
  alignMap,
  checkContext,
  type DirtyMap,
  formatMap,
  parseMask,
  planDirtyExtents,
  walkDirty,
} from "./dirty.ts";
import { isNbdUri, NbdEndpoint, type NbdTarget } from "./nbd.ts";
import {
  openDestination,
  openExistingDestination,
  openSource,
  refuseSameFile,
} from "./open.ts";
import { alignUp, planRange, planStream } from "./plan.ts";
import { pump, type Stats, wrap } from "./pump.ts";
import { copyThreaded, threadable } from "./lanes.ts";
import {
  BLKHASH_DEFAULT_BLOCK_SIZE,
  type BlkhashDigest,
  Blkhasher,
  isBlkhashDigest,
} from "../../mod.ts";
import { parseRate, RateLimiter, rateState } from "./rate.ts";

const USAGE = `Usage: copy [OPTIONS] SOURCE DESTINATION
       copy --dirty=CONTEXT [OPTIONS] NBD DESTINATION
       copy --dirty=CONTEXT --map-only [--json] NBD

SOURCE, DESTINATION := - | FILE | DEVICE | NBD
DESTINATION += null:
NBD := NBD-URI | [ CMD ARGS ... ]   a server to run, such as
       [ nbdkit -s memory 1G ] or [ qemu-nbd -f qcow2 disk.qcow2 ]

Options:
  -C, --connections=N     NBD connections when multi-conn is offered (4),
                          at most one per thread, as nbdcopy
  -T, --threads=N         threads to copy with, each with its own
                          connection (one per processor)
      --synchronous       one request at a time, in order, on one
                          connection in one thread
  -R, --requests=N        requests in flight per connection (64)
      --queue-size=N      bytes in flight per thread (4M)
      --request-size=N    bytes per read or write request (256k)
  -S, --sparse=N          detect all-zero blocks of N bytes (4k; 0 = off)
      --allocated         write every byte: no holes on the destination
      --destination-is-zero, --target-is-zero
                          the destination already reads as zeroes
      --no-extents        ignore the source's block status, read everything
      --flush             flush the destination before exiting
      --dirty=CONTEXT     incremental copy: only the extents the source's
                          CONTEXT marks (bit 0 set, as in
                          qemu:dirty-bitmap:NAME), onto an existing
                          DESTINATION of the same size, which is otherwise
                          left as it is
      --dirty-flags=MASK  with --dirty: copy extents whose flags & MASK
                          are not 0 (decimal or 0x hex; 1)
      --map-only          with --dirty: print the extents (offset length)
                          and copy nothing; no DESTINATION is needed
      --json              with --map-only: a JSON array of {offset,length}
      --blkhash[=DIGEST[/SIZE]]
                          print the blkhash of what was copied, as
                          nbdcopy 1.24: DIGEST md5, sha1, sha256 or
                          sha512, SIZE a power of two (sha256/64k)
      --blkhash-file=FILE with --blkhash: write it to FILE, not stdout
      --reconnect[=SECONDS]
                          NBD ends survive a server restart: dial again
                          for up to SECONDS (30) and replay what was in
                          flight
      --rate=BYTES        read at most BYTES per second over all threads
                          (k, M, G suffixes), steadily
  -p, --progress[=FD]     progress bar (default on a terminal); with FD,
                          "N/100" lines on that descriptor
      --no-progress       no progress bar
  -v, --verbose           print what was read, written and zeroed, and
                          what went over each NBD connection
  -h, --help              this text
  -V, --version           print the version and exit
`;

const OPTIONS: OptionSpec[] = [
  { name: "connections", kind: "value", short: "C" },
  { name: "threads", kind: "value", short: "T" },
  { name: "synchronous", kind: "flag" },
  { name: "requests", kind: "value", short: "R" },
  { name: "queue-size", kind: "value" },
  { name: "request-size", kind: "value" },
  { name: "sparse", kind: "value", short: "S" },
  { name: "allocated", kind: "flag" },
  { name: "destination-is-zero", kind: "flag" },
  { name: "target-is-zero", kind: "flag" },
  { name: "no-extents", kind: "flag" },
  { name: "flush", kind: "flag" },
  { name: "dirty", kind: "value" },
  { name: "dirty-flags", kind: "value" },
  { name: "map-only", kind: "flag" },
  { name: "json", kind: "flag" },
  { name: "blkhash", kind: "optional" },
  { name: "blkhash-file", kind: "value" },
  { name: "reconnect", kind: "optional" },
  { name: "rate", kind: "value" },
  { name: "progress", kind: "optional", short: "p" },
  { name: "no-progress", kind: "flag" },
  { name: "verbose", kind: "flag", short: "v" },
  { name: "help", kind: "flag", short: "h" },
  VERSION_OPTION,
];

/** The NBD protocol's ceiling for one payload. */
const MAX_REQUEST_SIZE = 32 * 1024 * 1024;

function readSettings(o: Map<string, string | true>): Settings {
  const str = (name: string) => {
    const v = o.get(name);
    return typeof v === "string" ? v : undefined;
  };
  const connections = str("connections");
  const threads = str("threads");
  const requests = str("requests");
  const queueSize = str("queue-size");
  const requestSize = str("request-size");
  const sparse = str("sparse");
  // --synchronous: one of everything, so blocks go strictly in order.
  const synchronous = o.has("synchronous");
  const settings: Settings = {
    connections: connections === undefined
      ? 4
      : parseCount(connections, "--connections", 1, 64),
    threads: threads === undefined
      ? Math.max(1, navigator.hardwareConcurrency || 1)
      : parseCount(threads, "--threads", 1, 64),
    requests: requests === undefined
      ? 64
      : parseCount(requests, "--requests", 1, 1024),
    ...(synchronous ? { connections: 1, threads: 1, requests: 1 } : {}),
    queueSize: queueSize === undefined
      ? 4 * 1024 * 1024
      : parseSize(queueSize, "--queue-size"),
    requestSize: requestSize === undefined
      ? 256 * 1024
      : parseSize(requestSize, "--request-size"),
    sparse: sparse === undefined ? undefined : parseSparse(sparse),
    allocated: o.has("allocated"),
    destinationIsZero: o.has("destination-is-zero") || o.has("target-is-zero"),
    extents: !o.has("no-extents"),
    flush: o.has("flush"),
    verbose: o.has("verbose"),
    dirty: str("dirty"),
    reconnect: readReconnect(o.get("reconnect")),
  };
  if (
    settings.requestSize < 512 || settings.requestSize > MAX_REQUEST_SIZE ||
    settings.requestSize % 512 !== 0
  ) {
    throw new UsageError(
      `--request-size: must be a multiple of 512 from 512 to ${MAX_REQUEST_SIZE}`,
    );
  }
  return settings;
}

/** `--reconnect[=SECONDS]`: off, the library's default, or seconds. */
function readReconnect(
  v: string | true | undefined,
): number | true | undefined {
  if (v === undefined || v === true) return v;
  return parseCount(v, "--reconnect", 1, 24 * 3600);
}

/**
 * `--blkhash[=DIGEST[/SIZE]]` as nbdcopy 1.24 reads it: no value is
 * sha256/64k; SIZE takes the size suffixes and must be a power of two.
 *
 * @throws {UsageError} For an unknown digest or a bad size.
 */
export function parseBlkhash(
  v: string | true,
): { digest: BlkhashDigest; blockSize: number } {
  if (v === true) {
    return { digest: "sha256", blockSize: BLKHASH_DEFAULT_BLOCK_SIZE };
  }
  const slash = v.indexOf("/");
  const name = slash < 0 ? v : v.slice(0, slash);
  if (!isBlkhashDigest(name)) {
    throw new UsageError(
      `--blkhash: unknown digest algorithm '${name}' (md5, sha1, sha256 or sha512)`,
    );
  }
  if (slash < 0) return { digest: name, blockSize: BLKHASH_DEFAULT_BLOCK_SIZE };
  const blockSize = parseSize(v.slice(slash + 1), "--blkhash");
  if (blockSize < 1 || (blockSize & (blockSize - 1)) !== 0) {
    throw new UsageError(`--blkhash is not a power of two: ${blockSize}`);
  }
  if (blockSize > 1 << 30) {
    throw new UsageError("--blkhash: a block has at most 1G bytes here");
  }
  return { digest: name, blockSize };
}

/**
 * One end as the command line names it: a word (`-`, `null:`, a path, a
 * URI) or a server to start.
 */
type End = string | ServerCommand;

/** Whether an end is an NBD export. */
function isNbd(end: End): end is NbdTarget {
  return typeof end !== "string" || isNbdUri(end);
}

/** What the command line asks for. */
interface Request {
  source: End;
  destination: End;
  settings: Settings;
  progress: string | true | undefined;
  noProgress: boolean;
  /** With `--dirty`: the flags that mark an extent to copy. */
  dirtyMask: number;
  /** `--map-only`: print the dirty extents instead of copying. */
  mapOnly: boolean;
  /** `--json`: print them as JSON. */
  json: boolean;
  /** `--blkhash`: the digest and block size. */
  blkhash: { digest: BlkhashDigest; blockSize: number } | undefined;
  /** `--blkhash-file`: where to print it (stdout when undefined). */
  blkhashFile: string | undefined;
  /** `--rate`: bytes per second. */
  rate: number | undefined;
}

/**
 * Reads the command line and checks every word of it that can be checked
 * without opening anything.
 *
 * @returns The request, `"help"` or `"version"`.
 * @throws {UsageError} On a malformed option, a missing endpoint, `null:`
 * as the source, a malformed NBD URI, or options `--dirty` cannot take.
 */
function parseRequest(args: string[]): Request | "help" | "version" {
  const { options, positionals, commands } = parseArgs(args, OPTIONS);
  if (options.has("help")) return "help";
  if (options.has("version")) return "version";
  const dirty = checkDirtyOptions(options);
  const mapOnly = options.has("map-only");
  if (mapOnly) {
    // The dry run never opens a destination, so none is needed.
    if (positionals.length < 1 || positionals.length > 2) {
      throw new UsageError("expected a SOURCE (and, unused, a DESTINATION)");
    }
  } else if (positionals.length !== 2) {
    throw new UsageError("expected a SOURCE and a DESTINATION");
  }
  const end = (i: number): End => {
    const command = commands[i];
    return command ? serverCommand(command) : positionals[i] ?? "";
  };
  const source = end(0);
  const destination = end(1);
  if (source === "null:") {
    throw new UsageError("null: can only be a destination");
  }
  if (dirty && !isNbd(source)) {
    throw new UsageError(
      "--dirty needs an NBD URI as the SOURCE (or a server to run, [ CMD ]): only a server has metadata contexts",
    );
  }
  if (dirty && !mapOnly && (destination === "-" || destination === "null:")) {
    throw new UsageError(
      "--dirty needs a DESTINATION that is a file, a block device or an NBD URI",
    );
  }
  for (const word of mapOnly ? [source] : [source, destination]) {
    if (typeof word !== "string" || !isNbdUri(word)) continue;
    try {
      parseUri(word);
    } catch (e) {
      if (!(e instanceof TypeError)) throw e;
      throw new UsageError(e.message);
    }
  }
  const progress = options.get("progress");
  if (typeof progress === "string") {
    parseCount(progress, "--progress", 1, 1 << 20);
  }
  const blkhashOption = options.get("blkhash");
  const blkhash = blkhashOption === undefined
    ? undefined
    : parseBlkhash(blkhashOption);
  if (blkhash && dirty) {
    throw new UsageError(
      "--blkhash cannot be used with --dirty: an incremental copy sees only the dirty extents, and the hash is of a whole image",
    );
  }
  const rateOption = options.get("rate");
  if (
    options.has("reconnect") &&
    [source, destination].some((e) => typeof e !== "string")
  ) {
    throw new UsageError(
      "--reconnect needs NBD URIs: a server run as [ CMD ] ends with the copy's connection",
    );
  }
  const blkhashFile = options.get("blkhash-file");
  return {
    source,
    destination,
    settings: readSettings(options),
    progress,
    noProgress: options.has("no-progress"),
    dirtyMask: dirty?.mask ?? 1,
    mapOnly,
    json: options.has("json"),
    blkhash,
    // As nbdcopy, --blkhash-file alone does nothing.
    blkhashFile: typeof blkhashFile === "string" ? blkhashFile : undefined,
    rate: typeof rateOption === "string" ? parseRate(rateOption) : undefined,
  };
}

/**
 * Checks the options of an incremental copy against each other: the ones
 * that only make sense with `--dirty`, and the ones it cannot honour (it
 * needs the source's block status, and writes onto a copy that holds
 * data).
 *
 * @returns The context and mask, or `undefined` without `--dirty`.
 * @throws {UsageError} On a conflict or a malformed value.
 */
function checkDirtyOptions(
  o: Map<string, string | true>,
): { context: string; mask: number } | undefined {
  const context = o.get("dirty");
  if (context === undefined) {
    for (const name of ["dirty-flags", "map-only"]) {
      if (o.has(name)) throw new UsageError(`--${name} needs --dirty`);
    }
    if (o.has("json")) throw new UsageError("--json needs --map-only");
    return undefined;
  }
  if (typeof context !== "string") return undefined; // a "value" option
  checkContext(context);
  if (o.has("json") && !o.has("map-only")) {
    throw new UsageError("--json needs --map-only");
  }
  for (const name of ["no-extents", "destination-is-zero", "target-is-zero"]) {
    if (o.has(name)) {
      throw new UsageError(
        `--${name} cannot be used with --dirty, which reads the source's block status and writes onto an earlier copy`,
      );
    }
  }
  const flags = o.get("dirty-flags");
  return {
    context,
    mask: typeof flags === "string" ? parseMask(flags) : 1,
  };
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
 * Copies `src` to `dst` as the settings say: all of it, or with `dirty`
 * only the extents of that map.
 *
 * @returns The one-line summary for `--verbose`.
 * @throws The first failure, after everything in flight has settled.
 */
async function transfer(
  src: Source,
  dst: Destination,
  settings: Settings,
  mode: ProgressMode,
  controller: AbortController,
  onProgress: (p: Progress) => void,
  dirty?: DirtyMap,
  extra: Extras = {},
): Promise<string> {
  const signal = controller.signal;
  // Multi-conn only where every NBD side offers it (files count as
  // unlimited); a stream on either side keeps to one of everything. As
  // nbdcopy, no more connections than threads: measured here, four
  // connections on two processors copy slower than two.
  const lanes = Math.max(
    1,
    Math.min(
      settings.connections,
      settings.threads,
      src.maxLanes,
      dst.maxLanes,
    ),
  );
  // Several connections each get a thread of their own where both ends
  // can open lanes there; an incremental copy keeps them in this one.
  const threads = !dirty && threadable(src, dst) ? lanes : 1;
  // Threaded, this thread runs one connection of its own.
  const here = threads > 1 ? 1 : lanes;
  await src.addLanes(here, signal);
  await dst.addLanes(here, signal);

  const size = src.size;
  if (size !== undefined && size % dst.alignment !== 0) {
    throw new Error(
      `the source's size ${size} is not a multiple of the destination's block size ${dst.alignment}`,
    );
  }
  await dst.prepare(size);
  const align = Math.max(src.alignment, dst.alignment);
  const requestSize = alignUp(settings.requestSize, align);
  const sparse = settings.sparse === undefined
    ? Math.max(4096, dst.preferred)
    : settings.sparse === 0
    ? 0
    : alignUp(settings.sparse, align);
  // As nbdcopy: at most --requests, and at most --queue-size bytes, in
  // flight per connection (but always at least one request).
  const perLane = Math.max(
    1,
    Math.min(settings.requests, Math.floor(settings.queueSize / requestSize)),
  );

  const copying = dirty && alignMap(dirty, align, size ?? 0);
  const progress = new Progress(mode, copying ? copying.bytes : size);
  onProgress(progress);
  const stats: Stats = { read: 0, written: 0, zeroed: 0 };
  const started = performance.now();
  // A hasher over a shared table when the size is known, so that every
  // thread hashes what it copies; one that grows for a stream.
  const hash = extra.blkhash &&
    new Blkhasher(extra.blkhash.digest, extra.blkhash.blockSize, size);
  const shared = extra.rate === undefined ? undefined : rateState();
  const limiter = extra.rate === undefined
    ? undefined
    : new RateLimiter(extra.rate, shared!);
  const plan = () =>
    copying
      ? planDirtyExtents(src, copying, requestSize, align, signal)
      : size === undefined
      ? planStream(src, requestSize, dst.size)
      : planRange(
        src,
        size,
        requestSize,
        align,
        settings.extents && src.hasExtents,
        signal,
      );
  const abort = (reason: unknown) => controller.abort(reason);
  const useExtents = settings.extents && src.hasExtents;
  let total: number;
  if (threads > 1) {
    await copyThreaded(src, dst, {
      threads,
      perLane,
      queueSlots: Math.max(1, Math.floor(settings.queueSize / requestSize)),
      requestSize,
      align,
      sparse,
      useExtents,
      settings,
      progress,
      stats,
      signal,
      abort,
      closeMs: CLOSE_MS.stopped,
      hash,
      limiter,
      rateState: shared,
    });
    total = size!;
  } else {
    total = await pump(src, dst, plan(), {
      lanes,
      limit: lanes * perLane,
      requestSize,
      sparse,
      progress,
      stats,
      signal,
      abort,
      hash,
      limiter,
    });
  }
  try {
    await dst.finish(size ?? total, settings.flush, signal);
  } catch (e) {
    throw wrap(`finishing ${dst.name}`, e);
  }
  progress.finish(true);
  if (hash) {
    // As nbdcopy: lowercase hex and a newline, on stdout or in the file.
    const line = `${await hash.hex()}\n`;
    if (extra.blkhashFile === undefined) await writeAll(Deno.stdout, line);
    else await Deno.writeTextFile(extra.blkhashFile, line);
  }
  const seconds = (performance.now() - started) / 1000;
  const counts =
    `read ${stats.read}, wrote ${stats.written}, zeroed ${stats.zeroed}`;
  if (dirty && copying) {
    return `copy: ${dirty.bytes} dirty bytes in ${dirty.offsets.length} extent(s) of ${size}, copied ${copying.bytes} in ${
      seconds.toFixed(3)
    } s over ${lanes} connection(s): ${counts} (${
      humanBytes(copying.bytes / (seconds || 1))
    }/s)`;
  }
  return `copy: ${size ?? total} bytes in ${
    seconds.toFixed(3)
  } s over ${lanes} connection(s): ${counts} (${
    humanBytes((size ?? total) / (seconds || 1))
  }/s)`;
}

/** What {@linkcode transfer} does beside copying. */
interface Extras {
  blkhash?: { digest: BlkhashDigest; blockSize: number } | undefined;
  blkhashFile?: string | undefined;
  rate?: number | undefined;
}

/**
 * How long closing may take: after a ^C or a failure the server may have
 * stopped reading, and a close that waits on it would keep the process
 * alive; after a copy that worked, every request was answered already.
 */
const CLOSE_MS = { stopped: 1_000, finished: 5_000 };

/**
 * How long one ^C leaves the copy to stop cleanly before the process
 * exits anyway: some waits cannot be cut short (a read from stdin, a
 * write to a pipe nobody reads, a file on a hung mount).
 */
const GRACE_MS = 2_000;

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
 * Runs the tool.
 *
 * @param args Command-line arguments, without the program name.
 * @returns The exit status: 0 when every byte was copied, 1 otherwise
 * (usage errors included), 130 when interrupted.
 */
export async function main(args: string[]): Promise<number> {
  let request: Request | "help" | "version";
  try {
    request = parseRequest(args);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    warnUsage("copy", e);
    return 1;
  }
  if (request === "help") {
    await writeAll(Deno.stdout, USAGE);
    return 0;
  }
  if (request === "version") {
    await writeAll(Deno.stdout, versionText("copy"));
    return 0;
  }

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
    let summary: string;
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
      const map = await walkDirty(
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
      dst = typeof request.destination === "string"
        ? await openExistingDestination(
          request.destination,
          nbd.size,
          request.settings,
          signal,
        )
        : await existingCommandDestination(
          request.destination,
          nbd.size,
          request.settings,
          signal,
        );
      summary = await transfer(
        src,
        dst,
        request.settings,
        mode,
        controller,
        (p) => state.progress = p,
        map,
        { rate: request.rate },
      );
    } else {
      const { source, destination, settings } = request;
      if (typeof source === "string" && typeof destination === "string") {
        await refuseSameFile(source, destination);
      }
      src = typeof source === "string"
        ? await openSource(source, settings, signal)
        : await NbdEndpoint.open(source, "source", settings, signal);
      dst = typeof destination === "string"
        ? await openDestination(destination, settings, signal)
        : await NbdEndpoint.open(destination, "destination", settings, signal);
      summary = await transfer(
        src,
        dst,
        request.settings,
        mode,
        controller,
        (p) => state.progress = p,
        undefined,
        {
          blkhash: request.blkhash,
          blkhashFile: request.blkhashFile,
          rate: request.rate,
        },
      );
    }
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
      return 130;
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
 * The destination of an incremental copy when it is a server the tool
 * starts: it must have the source's size, as a URI destination must.
 *
 * @throws {Error} One line when the sizes differ.
 */
async function existingCommandDestination(
  command: ServerCommand,
  size: number,
  settings: Settings,
  signal: AbortSignal,
): Promise<Destination> {
  const dst = await NbdEndpoint.open(command, "destination", settings, signal);
  if (dst.size !== size) {
    await dst.close(signal);
    throw new Error(
      `${command.text} has ${dst.size} bytes and the source ${size}: --dirty updates a copy of the same size`,
    );
  }
  return dst;
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

/**
 * The command line of `copy`: options, the checks on them, and `main()`,
 * which opens both ends, runs the plan through the pump and reports.
 *
 * @module
 */

import {
  errorLine,
  humanBytes,
  type OptionSpec,
  parseArgs,
  parseCount,
  parseSize,
  Progress,
  progressMode,
  UsageError,
  warn,
  warnUsage,
  writeAll,
} from "../_cli.ts";
import type { Destination, Settings, Source } from "./endpoint.ts";
import { openDestination, openSource } from "./open.ts";
import { alignUp, planRange, planStream } from "./plan.ts";
import { pump, type Stats, wrap } from "./pump.ts";

const USAGE = `Usage: copy [OPTIONS] SOURCE DESTINATION

SOURCE, DESTINATION := - | FILE | DEVICE | NBD-URI
DESTINATION += null:

Options:
  -C, --connections=N     NBD connections when multi-conn is offered (4)
  -R, --requests=N        requests in flight per connection (64)
      --queue-size=N      bytes in flight per connection (16M)
      --request-size=N    bytes per read or write request (256k)
  -S, --sparse=N          detect all-zero blocks of N bytes (4k; 0 = off)
      --allocated         write every byte: no holes on the destination
      --destination-is-zero, --target-is-zero
                          the destination already reads as zeroes
      --no-extents        ignore the source's block status, read everything
      --flush             flush the destination before exiting
  -p, --progress[=FD]     progress bar (default on a terminal); with FD,
                          "N/100" lines on that descriptor
      --no-progress       no progress bar
  -v, --verbose           print what was read, written and zeroed
  -h, --help              this text
`;

const OPTIONS: OptionSpec[] = [
  { name: "connections", kind: "value", short: "C" },
  { name: "requests", kind: "value", short: "R" },
  { name: "queue-size", kind: "value" },
  { name: "request-size", kind: "value" },
  { name: "sparse", kind: "value", short: "S" },
  { name: "allocated", kind: "flag" },
  { name: "destination-is-zero", kind: "flag" },
  { name: "target-is-zero", kind: "flag" },
  { name: "no-extents", kind: "flag" },
  { name: "flush", kind: "flag" },
  { name: "progress", kind: "optional", short: "p" },
  { name: "no-progress", kind: "flag" },
  { name: "verbose", kind: "flag", short: "v" },
  { name: "help", kind: "flag", short: "h" },
];

/** The NBD protocol's ceiling for one payload. */
const MAX_REQUEST_SIZE = 32 * 1024 * 1024;

function readSettings(o: Map<string, string | true>): Settings {
  const str = (name: string) => {
    const v = o.get(name);
    return typeof v === "string" ? v : undefined;
  };
  const connections = str("connections");
  const requests = str("requests");
  const queueSize = str("queue-size");
  const requestSize = str("request-size");
  const sparse = str("sparse");
  const settings: Settings = {
    connections: connections === undefined
      ? 4
      : parseCount(connections, "--connections", 1, 64),
    requests: requests === undefined
      ? 64
      : parseCount(requests, "--requests", 1, 1024),
    queueSize: queueSize === undefined
      ? 16 * 1024 * 1024
      : parseSize(queueSize, "--queue-size"),
    requestSize: requestSize === undefined
      ? 256 * 1024
      : parseSize(requestSize, "--request-size"),
    sparse: sparse === undefined ? undefined : parseSize(sparse, "--sparse"),
    allocated: o.has("allocated"),
    destinationIsZero: o.has("destination-is-zero") || o.has("target-is-zero"),
    extents: !o.has("no-extents"),
    flush: o.has("flush"),
    verbose: o.has("verbose"),
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

/** What the command line asks for. */
interface Request {
  source: string;
  destination: string;
  settings: Settings;
  progress: string | true | undefined;
  noProgress: boolean;
}

/**
 * Reads the command line.
 *
 * @returns The request, or `"help"`.
 * @throws {UsageError} On a malformed option or a missing endpoint.
 */
function parseRequest(args: string[]): Request | "help" {
  const { options, positionals } = parseArgs(args, OPTIONS);
  if (options.has("help")) return "help";
  if (positionals.length !== 2) {
    throw new UsageError("expected a SOURCE and a DESTINATION");
  }
  const progress = options.get("progress");
  if (typeof progress === "string") {
    parseCount(progress, "--progress", 1, 1 << 20);
  }
  return {
    source: positionals[0]!,
    destination: positionals[1]!,
    settings: readSettings(options),
    progress,
    noProgress: options.has("no-progress"),
  };
}

/**
 * Copies `src` to `dst` as the settings say.
 *
 * @returns The one-line summary for `--verbose`.
 * @throws The first failure, after everything in flight has settled.
 */
async function transfer(
  src: Source,
  dst: Destination,
  request: Request,
  controller: AbortController,
  onProgress: (p: Progress) => void,
): Promise<string> {
  const settings = request.settings;
  // Multi-conn only where every NBD side offers it (files count as
  // unlimited); a stream on either side keeps to one of everything.
  const lanes = Math.max(
    1,
    Math.min(settings.connections, src.maxLanes, dst.maxLanes),
  );
  await src.addLanes(lanes);
  await dst.addLanes(lanes);

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

  const progress = new Progress(
    progressMode(request.progress, request.noProgress),
    size,
  );
  onProgress(progress);
  const stats: Stats = { read: 0, written: 0, zeroed: 0 };
  const started = performance.now();
  const plan = size === undefined
    ? planStream(src, requestSize, dst.size)
    : planRange(
      src,
      size,
      requestSize,
      align,
      settings.extents && src.hasExtents,
      controller.signal,
    );
  const total = await pump(src, dst, plan, {
    lanes,
    limit: lanes * perLane,
    requestSize,
    sparse,
    progress,
    stats,
    signal: controller.signal,
    abort: (reason) => controller.abort(reason),
  });
  try {
    await dst.finish(size ?? total, settings.flush);
  } catch (e) {
    throw wrap(`finishing ${dst.name}`, e);
  }
  progress.finish(true);
  const seconds = (performance.now() - started) / 1000;
  return `copy: ${size ?? total} bytes in ${
    seconds.toFixed(3)
  } s over ${lanes} connection(s): read ${stats.read}, wrote ${stats.written}, zeroed ${stats.zeroed} (${
    humanBytes((size ?? total) / (seconds || 1))
  }/s)`;
}

/**
 * Runs the tool.
 *
 * @param args Command-line arguments, without the program name.
 * @returns The exit status: 0 when every byte was copied, 1 otherwise, 130
 * when interrupted.
 */
export async function main(args: string[]): Promise<number> {
  let request: Request | "help";
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

  const controller = new AbortController();
  const interrupted = new Error("interrupted");
  // The first ^C stops the copy and closes the connections cleanly; a
  // second one, for a source that will not stop (stdin), exits at once.
  const onSignal = () => {
    if (controller.signal.aborted) Deno.exit(130);
    controller.abort(interrupted);
  };
  const signals: Deno.Signal[] = ["SIGINT", "SIGTERM"];
  for (const s of signals) Deno.addSignalListener(s, onSignal);
  let src: Source | undefined;
  let dst: Destination | undefined;
  let progress: Progress | undefined;
  try {
    src = await openSource(request.source, request.settings);
    dst = await openDestination(request.destination, request.settings);
    const summary = await transfer(
      src,
      dst,
      request,
      controller,
      (p) => progress = p,
    );
    if (request.settings.verbose) warn(summary);
    return 0;
  } catch (e) {
    const wasInterrupted = controller.signal.reason === interrupted;
    controller.abort(e);
    progress?.finish(false);
    if (wasInterrupted) {
      warn("copy: interrupted");
      return 130;
    }
    warn(errorLine("copy", e));
    return 1;
  } finally {
    for (const s of signals) Deno.removeSignalListener(s, onSignal);
    await src?.close().catch(() => {});
    await dst?.close().catch(() => {});
  }
}

/**
 * The command line of `copy`: the usage text, the option table, and
 * {@linkcode parseRequest}, which turns the words into a {@linkcode Request}
 * after checking every one of them that can be checked without opening
 * anything.
 *
 * @module
 */

import {
  BLKHASH_DEFAULT_BLOCK_SIZE,
  type BlkhashDigest,
  isBlkhashDigest,
  parseUri,
} from "../../mod.ts";
import {
  type OptionSpec,
  parseArgs,
  parseCount,
  parseSize,
  parseSparse,
  serverCommand,
  UsageError,
  VERSION_OPTION,
} from "../_cli.ts";
import { checkContext, parseMask } from "./dirty.ts";
import type { Settings } from "./endpoint.ts";
import { isNbdUri, type NbdTarget } from "./nbd.ts";
import type { End } from "./open.ts";
import { parseRate } from "./rate.ts";

/** What `copy --help` prints. */
export const USAGE = `Usage: copy [OPTIONS] SOURCE DESTINATION
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

/** Whether an end is an NBD export. */
function isNbd(end: End): end is NbdTarget {
  return typeof end !== "string" || isNbdUri(end);
}

/** What the command line asks for. */
export interface Request {
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
export function parseRequest(args: string[]): Request | "help" | "version" {
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

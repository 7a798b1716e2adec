/**
 * `info`: what `nbdinfo` shows about an NBD server and its exports: the
 * fields of nbdinfo 1.22 (libnbd 1.22), with their names, values and order,
 * in text and in `--json`.
 *
 * ```sh
 * deno run --allow-net --allow-read examples/info.ts nbd+unix:///disk?socket=/tmp/nbd.sock
 * deno run --allow-net --allow-read examples/info.ts --map --totals --json nbd://127.0.0.1/
 * deno run -A examples/info.ts [ qemu-nbd -r -f qcow2 disk.qcow2 ]
 * ```
 *
 * Output goes to stdout in one piece at the end, so a failure never leaves
 * half a report; the failure itself is one line on stderr (`info: ...`) and
 * exit status 1. `--can`/`--is`/`--has` print nothing and exit 0 (yes) or 2
 * (no); `--cannot`/`--isnt`/`--hasnt` the other way round.
 *
 * @module
 */

import {
  type Capabilities,
  capabilities,
  connect,
  type ExportProbe,
  type ListedExport,
  listExports,
  NbdUnsupportedError,
  probe,
  probeExports,
  STATE_HOLE,
  STATE_ZERO,
} from "../mod.ts";
import {
  errorLine,
  exactSize,
  type OptionSpec,
  parseArgs,
  type ServerCommand,
  serverCommand,
  UsageError,
  VERSION_OPTION,
  versionText,
  warn,
  warnUsage,
  writeAll,
} from "./_cli.ts";

const USAGE = `Usage:
  info [--json] NBD                      the export and the connection
  info --list [--json] NBD               every export the server lists
  info --map[=CONTEXT] [--totals] [--json] NBD
                                         extents of base:allocation or CONTEXT
  info --size [--json] NBD               the size in bytes
  info --uri [--json] NBD                the URI
  info --can FEATURE NBD                 exit 0 if the export can, 2 if not
  info --cannot FEATURE NBD              exit 0 if it cannot, 2 if it can
  info --is read-only|rotational|tls NBD     (and --isnt)
  info --has structured-reply|extended-headers NBD     (and --hasnt)

NBD: an NBD URI, or a server to run: [ CMD ARGS ... ]
     ([ nbdkit -s memory 1G ], [ qemu-nbd -r -f qcow2 disk.qcow2 ])
FEATURE: connect read write flush fua trim zero fast-zero cache df
         multi-conn block-status-payload (--can, --is and --has take
         each other's words too)
Options:
  --json        JSON output (field names as nbdinfo --json)
  -L, --list    list all exports (the URI's export name is ignored)
  --totals      with --map: bytes and percentage of each extent type
  --content     show what file(1) says of the first 8 KiB (the default,
                but with --list); --no-content: do not
  -h, --help    this text
  -V, --version print the version and exit
`;

const OPTIONS: OptionSpec[] = [
  { name: "json", kind: "flag" },
  { name: "list", kind: "flag", short: "L" },
  { name: "map", kind: "optional" },
  { name: "totals", kind: "flag" },
  { name: "size", kind: "flag" },
  { name: "uri", kind: "flag" },
  { name: "can", kind: "value" },
  { name: "cannot", kind: "value" },
  { name: "is", kind: "value" },
  { name: "isnt", kind: "value" },
  { name: "has", kind: "value" },
  { name: "hasnt", kind: "value" },
  { name: "help", kind: "flag", short: "h" },
  VERSION_OPTION,
  { name: "content", kind: "flag" },
  { name: "no-content", kind: "flag" },
];

/** The feature tests, and those of them that negate. */
const TESTS = ["can", "cannot", "is", "isnt", "has", "hasnt"];
const NEGATED = new Set(["cannot", "isnt", "hasnt"]);

/**
 * After ^C, how long the work in flight gets to settle, so that a server
 * the tool started is stopped before the tool exits.
 */
const SETTLE_MS = 3_000;

/** nbdinfo runs file(1) on this much of the start of the export. */
const CONTENT_BYTES = 8192;

/** Connecting and negotiating, probe and fallback together, take at most this. */
const CONNECT_TIMEOUT_MS = 30_000;

/** What a session negotiated, the same for every export of a server. */
interface SessionFacts {
  protocol: string;
  tls: boolean;
  structuredReplies: boolean;
  extendedHeaders: boolean;
}

/** What the server says about one export. */
interface ExportFacts {
  exportName: string;
  description: string;
  /** Exactly, whatever the size (nbdinfo prints 2^63 - 1 as it is). */
  size: bigint;
  flags: number;
  /** What the flags allow, as the library reads them. */
  can: Capabilities;
  blockSize: { minimum: number; preferred: number; maximum: number } | null;
  /** `null` when the server would not list its contexts. */
  contexts: string[] | null;
  /** What file(1) says of the first bytes; `null` when not asked or unknown. */
  content: string | null;
}

/**
 * What the tool is asked about: a server at a URI, or one it starts itself.
 */
type Target = string | ServerCommand;

/** The target as `connect()` takes it. */
function connectTarget(t: Target): string | ServerCommand["options"] {
  return typeof t === "string" ? t : t.options;
}

/** The target in messages. */
function targetText(t: Target): string {
  return typeof t === "string" ? t : t.text;
}

type Client = Awaited<ReturnType<typeof connect>>;

/** nbdinfo's names for the protocol styles. */
const PROTOCOL_NAMES: Readonly<Record<string, string>> = {
  "oldstyle": "oldstyle",
  "newstyle": "newstyle",
  "fixed newstyle": "newstyle-fixed",
};

/** The session facts of a probe or a connection, in nbdinfo's words. */
function sessionFacts(s: SessionFacts): SessionFacts {
  return {
    protocol: PROTOCOL_NAMES[s.protocol] ?? s.protocol,
    tls: s.tls,
    structuredReplies: s.structuredReplies,
    extendedHeaders: s.extendedHeaders,
  };
}

/**
 * Asks the server about one export without entering transmission
 * (`NBD_OPT_INFO` plus `NBD_OPT_LIST_META_CONTEXT`). An oldstyle server,
 * or one that refuses `NBD_OPT_INFO`, is asked the long way: by connecting.
 */
async function gather(
  target: Target,
  exportName: string | undefined,
  interrupt: AbortSignal,
  content = false,
): Promise<{ session: SessionFacts; export: ExportFacts }> {
  // One time limit for the probe and the fallback together: a server that
  // accepts and never speaks costs one timeout, reported once.
  const limit = new AbortController();
  const timer = setTimeout(
    () =>
      limit.abort(
        new Error(
          `Connecting to ${
            targetText(target)
          } and negotiating took longer than ${CONNECT_TIMEOUT_MS} ms`,
        ),
      ),
    CONNECT_TIMEOUT_MS,
  );
  const signal = AbortSignal.any([interrupt, limit.signal]);
  try {
    if (typeof target !== "string") {
      // One server start for a command: one connection lists the
      // contexts, then goes on to transmission (for the content), where
      // probe() and then a connection would start the server twice.
      return await connected(target, {
        signal,
        connectTimeout: 0,
        listMetaContexts: true,
      }, content);
    }
    return await probeOrConnect(target, exportName, signal, content);
  } finally {
    clearTimeout(timer);
  }
}

async function probeOrConnect(
  uri: string,
  exportName: string | undefined,
  signal: AbortSignal,
  content: boolean,
): Promise<{ session: SessionFacts; export: ExportFacts }> {
  // The library's own limit would start again for the fallback.
  const options = {
    ...(exportName !== undefined ? { exportName } : {}),
    signal,
    connectTimeout: 0,
  };
  let probeError: unknown;
  try {
    const p = await probe(uri, { ...options, listMetaContexts: true });
    // As nbdinfo, which reads the content after NBD_OPT_INFO, with GO.
    let said: string | null = null;
    if (content) {
      const nbd = await connect(uri, options);
      try {
        said = await contentOf(nbd, signal);
      } finally {
        await nbd.close();
      }
    }
    return probeFacts(p, said);
  } catch (e) {
    probeError = e;
  }
  // Out of time (or interrupted): asking again would only wait again.
  if (signal.aborted) throw probeError;
  try {
    return await connected(uri, options, content);
  } catch (e) {
    throw e instanceof ConnectFailed ? probeError : e;
  }
}

/** What a probe tells, with the content read apart (or `null`). */
function probeFacts(
  p: ExportProbe,
  content: string | null,
): { session: SessionFacts; export: ExportFacts } {
  // Contexts are only listed over structured replies.
  const contexts = p.structuredReplies ? p.metaContexts : null;
  return {
    session: sessionFacts(p),
    export: {
      exportName: p.exportName,
      description: p.description,
      size: p.sizeBigInt,
      flags: p.flags,
      can: capabilities({
        flags: p.flags,
        structuredReplies: p.structuredReplies,
        metaContexts: contexts?.length ?? 0,
        extendedHeaders: p.extendedHeaders,
      }),
      blockSize: p.blockSize ?? null,
      contexts,
      content,
    },
  };
}

/** connect() itself failed (rather than what came after). */
class ConnectFailed extends Error {}

/** What a connection to the export tells, and its content if asked. */
async function connected(
  target: Target,
  options: {
    exportName?: string;
    signal: AbortSignal;
    connectTimeout: number;
    listMetaContexts?: boolean;
  },
  content: boolean,
): Promise<{ session: SessionFacts; export: ExportFacts }> {
  let nbd: Client;
  try {
    nbd = await connect(connectTarget(target), options);
  } catch (e) {
    // A URI target falls back to the probe's error; a command has none.
    if (typeof target === "string") throw new ConnectFailed();
    throw e;
  }
  try {
    return {
      session: sessionFacts(nbd),
      export: {
        exportName: nbd.exportName,
        description: nbd.description,
        size: nbd.sizeBigInt,
        flags: nbd.flags,
        can: capabilities({
          flags: nbd.flags,
          structuredReplies: nbd.structuredReplies,
          // As for a probe: what the server offers, where it was listed.
          metaContexts: (nbd.availableMetaContexts ?? nbd.metaContexts).length,
          extendedHeaders: nbd.extendedHeaders,
        }),
        // The client's defaults are not the server's word.
        blockSize: nbd.blockSizeAdvertised ? nbd.blockSize : null,
        // Listed for a command; a URI's probe lists them instead.
        contexts: nbd.availableMetaContexts ?? null,
        content: content ? await contentOf(nbd, options.signal) : null,
      },
    };
  } finally {
    await nbd.close();
  }
}

/**
 * What file(1) says of the first bytes of the export, as nbdinfo shows it:
 * the first line of `file -b`, or `null` when the bytes cannot be read or
 * there is no `file` program to ask (nbdinfo leaves the field out then too).
 */
async function contentOf(
  nbd: Client,
  signal: AbortSignal,
): Promise<string | null> {
  const length = Number(
    nbd.sizeBigInt < BigInt(CONTENT_BYTES)
      ? nbd.sizeBigInt
      : BigInt(CONTENT_BYTES),
  );
  let data: Uint8Array = new Uint8Array(0);
  try {
    if (length > 0) data = await nbd.read(0, length, { signal });
  } catch (e) {
    if (signal.aborted) throw e;
    return null;
  }
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command("file", {
      args: ["-b", "-"],
      stdin: "piped",
      stdout: "piped",
      stderr: "null",
      signal,
    }).spawn();
  } catch {
    // Not installed, or no --allow-run: the content is best effort.
    return null;
  }
  const writer = child.stdin.getWriter();
  // file(1) may stop reading once it knows; that is its answer.
  await writer.write(data).catch(() => {});
  await writer.close().catch(() => {});
  const out = await child.output();
  if (!out.success) return null;
  const line = new TextDecoder().decode(out.stdout).split("\n")[0]!;
  return line === "" ? null : line;
}

/**
 * JSON as nbdinfo writes it, where a bigint is a number with every digit
 * (`JSON.stringify` refuses bigints, and a double would round 2^63 - 1).
 */
function jsonText(value: unknown, indent?: number): string {
  const digits: string[] = [];
  const text = JSON.stringify(
    value,
    (_key, v) => {
      if (typeof v !== "bigint") return v;
      digits.push(v.toString());
      return `\u0000bigint${digits.length - 1}\u0000`;
    },
    indent,
  );
  return text.replace(
    /"\\u0000bigint(\d+)\\u0000"/g,
    (_all, i: string) => digits[Number(i)]!,
  );
}

/**
 * The URI of another export on the same server; `null` for a server the
 * tool started, which has no address once the tool is gone (nbdinfo leaves
 * `uri` out for `[ CMD ]` too).
 */
function exportUri(target: Target, name: string): string | null {
  if (typeof target !== "string") return null;
  const uri = target;
  try {
    const u = new URL(uri);
    const path = "/" + encodeURIComponent(name).replaceAll("%2F", "/");
    return `${u.protocol}//${u.host}${path}${u.search}`;
  } catch {
    return uri;
  }
}

/** The booleans nbdinfo reports, in its order. */
function capabilityList(can: Capabilities): Array<[string, boolean]> {
  return [
    ["is_rotational", can.rotational],
    ["is_read_only", can.readOnly],
    ["can_block_status_payload", can.canBlockStatusPayload],
    ["can_cache", can.canCache],
    ["can_df", can.canDf],
    ["can_fast_zero", can.canFastZero],
    ["can_flush", can.canFlush],
    ["can_fua", can.canFua],
    ["can_multi_conn", can.canMultiConn],
    ["can_trim", can.canTrim],
    ["can_zero", can.canWriteZeroes],
  ];
}

/** One export as a JSON object: nbdinfo 1.22's fields, in its order. */
function exportJson(
  uri: string | null,
  e: ExportFacts,
): Record<string, unknown> {
  const o: Record<string, unknown> = { "export-name": e.exportName };
  if (e.description) o["description"] = e.description;
  if (e.content !== null) o["content"] = e.content;
  if (uri !== null) o["uri"] = uri;
  if (e.contexts) o["contexts"] = e.contexts;
  for (const [name, value] of capabilityList(e.can)) o[name] = value;
  if (e.blockSize) {
    o["block_size_minimum"] = e.blockSize.minimum;
    o["block_size_preferred"] = e.blockSize.preferred;
    o["block_size_maximum"] = e.blockSize.maximum;
  }
  o["export-size"] = e.size;
  o["export-size-str"] = exactSize(e.size).text;
  return o;
}

function sessionJson(s: SessionFacts): Record<string, unknown> {
  return {
    protocol: s.protocol,
    TLS: s.tls,
    structured: s.structuredReplies,
    extended: s.extendedHeaders,
  };
}

function sessionText(s: SessionFacts): string {
  const packets = s.extendedHeaders
    ? "extended"
    : s.structuredReplies
    ? "structured"
    : "simple";
  return `protocol: ${s.protocol} ${
    s.tls ? "with" : "without"
  } TLS, using ${packets} packets\n`;
}

/** A size as nbdinfo prints it in text: `4096 (4K)`, `4294967295`. */
function sizeText(bytes: number | bigint): string {
  const size = exactSize(bytes);
  return `${bytes}${size.scaled ? ` (${size.text})` : ""}`;
}

function exportText(uri: string | null, e: ExportFacts): string {
  const lines = [`export=${JSON.stringify(e.exportName)}:`];
  if (e.description) lines.push(`\tdescription: ${e.description}`);
  lines.push(`\texport-size: ${sizeText(e.size)}`);
  if (e.content !== null) lines.push(`\tcontent: ${e.content}`);
  if (uri !== null) lines.push(`\turi: ${uri}`);
  if (e.contexts) {
    lines.push("\tcontexts:");
    for (const c of e.contexts) lines.push(`\t\t${c}`);
  }
  for (const [name, value] of capabilityList(e.can)) {
    lines.push(`\t${name}: ${value}`);
  }
  if (e.blockSize) {
    lines.push(`\tblock_size_minimum: ${sizeText(e.blockSize.minimum)}`);
    lines.push(`\tblock_size_preferred: ${sizeText(e.blockSize.preferred)}`);
    lines.push(`\tblock_size_maximum: ${sizeText(e.blockSize.maximum)}`);
  }
  return lines.join("\n") + "\n";
}

/** Words for an extent's type, as nbdinfo prints them; `null` if unknown. */
export function extentDescription(
  context: string,
  type: number,
): string | null {
  if (context === "base:allocation") {
    const words = [];
    if (type & STATE_HOLE) words.push("hole");
    if (type & STATE_ZERO) words.push("zero");
    const rest = type & ~(STATE_HOLE | STATE_ZERO);
    if (rest) words.push(`unknown (${rest})`);
    return words.length ? words.join(",") : "data";
  }
  if (context.startsWith("qemu:dirty-bitmap:")) {
    return type === 0 ? "clean" : type === 1 ? "dirty" : null;
  }
  if (context === "qemu:allocation-depth") {
    return type === 0
      ? "absent"
      : type === 1
      ? "local"
      : `backing depth ${type}`;
  }
  return null;
}

/** A run of extents of one type. */
export interface MapRun {
  offset: number;
  length: number;
  type: number;
}

/** Largest block status request: what a 32-bit length holds, aligned. */
function maxStatusLength(align: number): number {
  return 2 ** 32 - align;
}

/**
 * Reads the whole extent map of `context`, merging neighbours of one type.
 *
 * @throws {Error} If the server does not offer the context, or answers a
 * request with no extents (which would loop forever).
 */
async function readMap(
  target: Target,
  context: string,
  signal: AbortSignal,
): Promise<{
  size: number;
  runs: MapRun[];
}> {
  const nbd = await connect(connectTarget(target), {
    metaContexts: [context],
    signal,
  });
  try {
    if (!nbd.metaContexts.includes(context)) {
      throw new Error(
        `--map: server does not support metadata context "${context}"`,
      );
    }
    const size = nbd.size;
    const align = nbd.blockSize.minimum;
    const runs: MapRun[] = [];
    let offset = 0;
    while (offset < size) {
      const length = Math.min(size - offset, maxStatusLength(align));
      const reply = await nbd.blockStatus(offset, length, { signal });
      const extents = reply[context] ?? [];
      const before = offset;
      for (const e of extents) {
        if (offset >= size) break;
        const len = Math.min(e.length, size - offset);
        const last = runs.at(-1);
        if (last && last.type === e.flags) last.length += len;
        else runs.push({ offset, length: len, type: e.flags });
        offset += len;
      }
      if (offset === before) {
        throw new Error(
          `--map: server returned no extents for offset ${offset}`,
        );
      }
    }
    return { size, runs };
  } finally {
    await nbd.close();
  }
}

function mapOutput(
  context: string,
  runs: MapRun[],
  json: boolean,
): string {
  if (json) {
    return JSON.stringify(
      runs.map((r) => {
        const d = extentDescription(context, r.type);
        return d === null ? { ...r } : { ...r, description: d };
      }),
      null,
      2,
    ) + "\n";
  }
  return runs.map((r) => {
    const d = extentDescription(context, r.type);
    return `${String(r.offset).padStart(10)}  ${
      String(r.length).padStart(10)
    }  ${String(r.type).padStart(3)}${d === null ? "" : `  ${d}`}\n`;
  }).join("");
}

function totalsOutput(
  context: string,
  size: number,
  runs: MapRun[],
  json: boolean,
): string {
  const byType = new Map<number, number>();
  for (const r of runs) {
    byType.set(r.type, (byType.get(r.type) ?? 0) + r.length);
  }
  const rows = [...byType].sort(([a], [b]) => a - b).map(([type, bytes]) => ({
    size: bytes,
    // nbdinfo prints "%g": six significant digits.
    percent: size ? Number(((bytes * 100) / size).toPrecision(6)) : 0,
    type,
    description: extentDescription(context, type),
  }));
  if (json) {
    return JSON.stringify(
      rows.map((r) => {
        const { description, ...rest } = r;
        return description === null ? rest : { ...rest, description };
      }),
      null,
      2,
    ) + "\n";
  }
  return rows.map((r) =>
    `${String(r.size).padStart(10)} ${r.percent.toFixed(1).padStart(5)}% ${
      String(r.type).padStart(3)
    }${r.description === null ? "" : ` ${r.description}`}\n`
  ).join("");
}

type FeatureTest = (s: SessionFacts, e: ExportFacts) => boolean;

const can = (name: keyof Capabilities): FeatureTest => (_s, e) => e.can[name];

/**
 * `--can`/`--is`/`--has` answers by the names nbdinfo 1.22 accepts, and
 * only those, in any case.
 */
const FEATURES: ReadonlyArray<[string[], FeatureTest]> = [
  [["connect", "read"], () => true],
  [["tls"], (s) => s.tls],
  [
    [
      "sr",
      "structured",
      "structured reply",
      "structured-reply",
      "structured_reply",
      "structured replies",
      "structured-replies",
      "structured_replies",
    ],
    (s) => s.structuredReplies,
  ],
  [
    [
      "eh",
      "extended header",
      "extended-header",
      "extended_header",
      "extended headers",
      "extended-headers",
      "extended_headers",
    ],
    (s) => s.extendedHeaders,
  ],
  [["readonly", "read-only", "read_only"], can("readOnly")],
  [["write"], (_s, e) => !e.can.readOnly],
  [["rotational"], can("rotational")],
  [
    ["block status payload", "block-status-payload", "block_status_payload"],
    can("canBlockStatusPayload"),
  ],
  [["cache"], can("canCache")],
  [["df"], can("canDf")],
  [["fastzero", "fast-zero", "fast_zero"], can("canFastZero")],
  [["flush"], can("canFlush")],
  [["fua"], can("canFua")],
  [["multiconn", "multi-conn", "multi_conn"], can("canMultiConn")],
  [["trim"], can("canTrim")],
  [["zero"], can("canWriteZeroes")],
];

/**
 * Finds the test for a feature name, negated for `--cannot`, `--isnt` and
 * `--hasnt`.
 *
 * @throws {UsageError} For a name nbdinfo would not know either, in
 *   nbdinfo's words.
 */
function featureTest(name: string, negated: boolean): FeatureTest {
  const key = name.toLowerCase();
  const found = FEATURES.find(([names]) => names.includes(key));
  if (!found) {
    throw new UsageError(
      `unknown ${
        negated ? "--cannot/--isnt/--hasnt" : "--can/--is/--has"
      } option: ${name}`,
    );
  }
  const test = found[1];
  return negated ? (s, e) => !test(s, e) : test;
}

/**
 * `--list` for a server run as `[ CMD ]`: one start lists and describes
 * every export (`probeExports()`); the content, when asked for, needs a
 * connection, so a start of its own, per export.
 */
async function listCommandOutput(
  command: ServerCommand,
  json: boolean,
  content: boolean,
  signal: AbortSignal,
): Promise<{ text: string; ok: boolean }> {
  let listed: ListedExport[];
  let ok = true;
  const shown: ExportFacts[] = [];
  let session: SessionFacts | undefined;
  try {
    // Bounded as a URI's list is: a server that never speaks costs one
    // timeout, not a hang.
    listed = await probeExports(command.options, {
      signal,
      connectTimeout: CONNECT_TIMEOUT_MS,
    });
  } catch (e) {
    // An oldstyle server has exactly one export and no list, as for a URI;
    // telling it takes a second start.
    if (!cannotHaggle(e)) throw e;
    const one = await gather(command, undefined, signal, content);
    if (one.session.protocol !== "oldstyle") throw e;
    session = one.session;
    shown.push(one.export);
    listed = [];
  }
  for (const item of listed) {
    if (!item.probe) {
      ok = false;
      warn(`${errorLine("info", item.error)} for export: ${item.name}`);
      continue;
    }
    let said: string | null = null;
    if (content) {
      const nbd = await connect({
        ...command.options,
        exportName: item.name,
        signal,
        connectTimeout: CONNECT_TIMEOUT_MS,
      });
      try {
        said = await contentOf(nbd, signal);
      } finally {
        await nbd.close();
      }
    }
    const facts = probeFacts(item.probe, said);
    session ??= facts.session;
    if (item.description && !facts.export.description) {
      facts.export.description = item.description;
    }
    shown.push(facts.export);
  }
  return {
    text: listReport(
      session,
      shown.map((facts) => ({ uri: null, facts })),
      json,
    ),
    ok,
  };
}

/** Whether `e` (or what it wraps) says the server has no option phase. */
function cannotHaggle(e: unknown): boolean {
  for (let at = e, i = 0; at instanceof Error && i < 8; at = at.cause, i++) {
    if (at instanceof NbdUnsupportedError && at.feature === "fixed newstyle") {
      return true;
    }
  }
  return false;
}

/** Everything `--list` shows: one probe per listed export. */
async function listOutput(
  target: Target,
  json: boolean,
  content: boolean,
  signal: AbortSignal,
): Promise<{
  text: string;
  ok: boolean;
}> {
  if (typeof target !== "string") {
    return await listCommandOutput(target, json, content, signal);
  }
  const uri = target;
  let listed: Array<{ name: string; description?: string }>;
  try {
    listed = await listExports(uri, { signal });
  } catch (e) {
    // An oldstyle server has exactly one export and no list.
    const one = await gather(uri, undefined, signal).catch(() => {
      throw e;
    });
    if (one.session.protocol !== "oldstyle") throw e;
    listed = [{ name: one.export.exportName }];
  }
  let session: SessionFacts | undefined;
  const shown: Array<{ uri: string | null; facts: ExportFacts }> = [];
  let ok = true;
  for (const item of listed) {
    try {
      const g = await gather(uri, item.name, signal, content);
      session ??= g.session;
      if (item.description && !g.export.description) {
        g.export.description = item.description;
      }
      shown.push({ uri: exportUri(uri, item.name), facts: g.export });
    } catch (e) {
      ok = false;
      warn(`${errorLine("info", e)} for export: ${item.name}`);
    }
  }
  return { text: listReport(session, shown, json), ok };
}

/** The `--list` report of the exports that answered, text or JSON. */
function listReport(
  session: SessionFacts | undefined,
  shown: Array<{ uri: string | null; facts: ExportFacts }>,
  json: boolean,
): string {
  if (json) {
    const doc = {
      ...(session ? sessionJson(session) : {}),
      exports: shown.map((s) => exportJson(s.uri, s.facts)),
    };
    return jsonText(doc, 2) + "\n";
  }
  let text = session ? sessionText(session) : "";
  for (const s of shown) text += exportText(s.uri, s.facts);
  return text;
}

/** What the command line asks for. */
type Request =
  | { mode: "help" }
  | { mode: "version" }
  | {
    mode: "show" | "list";
    target: Target;
    json: boolean;
    content: boolean;
  }
  | { mode: "size" | "uri"; target: Target; json: boolean }
  | {
    mode: "map";
    target: Target;
    json: boolean;
    context: string;
    totals: boolean;
  }
  | { mode: "can"; target: Target; test: FeatureTest };

/**
 * Reads the command line.
 *
 * @throws {UsageError} For anything nbdinfo would refuse too, and for
 *   what this tool cannot do with a server it starts (name its URI).
 */
function parseRequest(args: string[]): Request {
  const { options: o, positionals, commands, order } = parseArgs(
    args,
    OPTIONS,
  );
  if (o.has("help")) return { mode: "help" };
  if (o.has("version")) return { mode: "version" };
  if (positionals.length !== 1) {
    throw new UsageError(
      positionals.length === 0
        ? "a URI or [ CMD ARGS ... ] is required"
        : "too many arguments",
    );
  }
  const given = ["list", "map", "size", "uri", ...TESTS].filter((m) =>
    o.has(m)
  );
  const modes = given.filter((m) => !TESTS.includes(m));
  if (given.length > modes.length) modes.push("can");
  if (modes.length > 1) {
    throw new UsageError(
      `you cannot use ${given.map((m) => `--${m}`).join(" and ")} together`,
    );
  }
  if (o.has("totals") && !o.has("map")) {
    throw new UsageError("--totals needs --map");
  }
  const command = commands[0];
  const target: Target = command ? serverCommand(command) : positionals[0]!;
  const json = o.has("json");
  // As nbdinfo 1.22: the last feature named is tested, and any negative
  // option negates it.
  const test = order.findLast((name) => TESTS.includes(name));
  if (test !== undefined) {
    const feature = String(o.get(test));
    const negated = order.some((name) => NEGATED.has(name));
    return { mode: "can", target, test: featureTest(feature, negated) };
  }
  const map = o.get("map");
  if (map !== undefined) {
    return {
      mode: "map",
      target,
      json,
      context: typeof map === "string" ? map : "base:allocation",
      totals: o.has("totals"),
    };
  }
  if (command && o.has("uri")) {
    throw new UsageError(
      "--uri needs a URI: a server run as [ CMD ] has no address once info exits",
    );
  }
  if (o.has("size") || o.has("uri")) {
    return { mode: o.has("size") ? "size" : "uri", target, json };
  }
  const mode = o.has("list") ? "list" : "show";
  // As nbdinfo: the content is probed by default, but for every export
  // of a list, where it would cost a read each.
  const content = o.has("content") ||
    (mode === "show" && !o.has("no-content"));
  return { mode, target, json, content };
}

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
      return { out: `${r.json ? JSON.stringify(uri) : uri}\n`, status: 0 };
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
 *   130 when interrupted (SIGINT, SIGTERM).
 */
export async function main(args: string[]): Promise<number> {
  let request: Request;
  try {
    request = parseRequest(args);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    warnUsage("info", e);
    return 1;
  }
  if (request.mode === "help") {
    await writeAll(Deno.stdout, USAGE);
    return 0;
  }
  if (request.mode === "version") {
    await writeAll(Deno.stdout, versionText("info"));
    return 0;
  }
  // ^C (or SIGTERM) ends the run at once, connecting or not; the signal
  // also closes what is open.
  const interrupt = new AbortController();
  const interrupted = new Error("interrupted");
  let onInterrupt!: () => void;
  const stopped = new Promise<"interrupted">((resolve) => {
    onInterrupt = () => {
      interrupt.abort(interrupted);
      resolve("interrupted");
    };
  });
  const signals: Deno.Signal[] = ["SIGINT", "SIGTERM"];
  for (const s of signals) Deno.addSignalListener(s, onInterrupt);
  try {
    const running = run(request, interrupt.signal);
    running.catch(() => {});
    const result = await Promise.race([running, stopped]);
    if (result === "interrupted") {
      warn("info: interrupted");
      await settled(running, SETTLE_MS);
      return 130;
    }
    // All at once at the end: a failure never leaves half a report.
    if (result.out) await writeAll(Deno.stdout, result.out);
    return result.status;
  } catch (e) {
    if (interrupt.signal.aborted) {
      warn("info: interrupted");
      return 130;
    }
    warn(errorLine("info", e));
    return 1;
  } finally {
    for (const s of signals) Deno.removeSignalListener(s, onInterrupt);
  }
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

if (import.meta.main) Deno.exit(await main(Deno.args));

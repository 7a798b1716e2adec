/**
 * `info`: what `nbdinfo` shows about an NBD server and its exports: the
 * fields of nbdinfo 1.22 (libnbd 1.22), with their names, values and order,
 * in text and in `--json`.
 *
 * ```sh
 * deno run --allow-net --allow-read examples/info.ts nbd+unix:///disk?socket=/tmp/nbd.sock
 * deno run --allow-net --allow-read examples/info.ts --map --totals --json nbd://127.0.0.1/
 * ```
 *
 * Output goes to stdout in one piece at the end, so a failure never leaves
 * half a report; the failure itself is one line on stderr (`info: ...`) and
 * exit status 1. `--can`/`--is` print nothing and exit 0 (yes) or 2 (no).
 *
 * @module
 */

import {
  type Capabilities,
  capabilities,
  connect,
  listExports,
  probe,
  STATE_HOLE,
  STATE_ZERO,
} from "../mod.ts";
import {
  errorLine,
  exactSize,
  type OptionSpec,
  parseArgs,
  UsageError,
  warn,
  warnUsage,
  writeAll,
} from "./_cli.ts";

const USAGE = `Usage:
  info [--json] URI                      the export and the connection
  info --list [--json] URI               every export the server lists
  info --map[=CONTEXT] [--totals] [--json] URI
                                         extents of base:allocation or CONTEXT
  info --size [--json] URI               the size in bytes
  info --can FEATURE URI                 exit 0 if the export can, 2 if not
  info --is read-only|rotational|tls URI

FEATURE: connect read write flush fua trim zero fast-zero cache df
         multi-conn structured-reply extended-headers block-status
Options:
  --json        JSON output (field names as nbdinfo --json)
  -L, --list    list all exports (the URI's export name is ignored)
  --totals      with --map: bytes and percentage of each extent type
  -h, --help    this text
`;

const OPTIONS: OptionSpec[] = [
  { name: "json", kind: "flag" },
  { name: "list", kind: "flag", short: "L" },
  { name: "map", kind: "optional" },
  { name: "totals", kind: "flag" },
  { name: "size", kind: "flag" },
  { name: "can", kind: "value" },
  { name: "is", kind: "value" },
  { name: "help", kind: "flag", short: "h" },
  // Accepted for nbdinfo compatibility; this tool never probes content.
  { name: "content", kind: "flag" },
  { name: "no-content", kind: "flag" },
];

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
  size: number;
  flags: number;
  /** What the flags allow, as the library reads them. */
  can: Capabilities;
  blockSize: { minimum: number; preferred: number; maximum: number } | null;
  /** `null` when the server would not list its contexts. */
  contexts: string[] | null;
}

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
  uri: string,
  exportName: string | undefined,
  interrupt: AbortSignal,
): Promise<{ session: SessionFacts; export: ExportFacts }> {
  // One time limit for the probe and the fallback together: a server that
  // accepts and never speaks costs one timeout, reported once.
  const limit = new AbortController();
  const timer = setTimeout(
    () =>
      limit.abort(
        new Error(
          `Connecting to ${uri} and negotiating took longer than ${CONNECT_TIMEOUT_MS} ms`,
        ),
      ),
    CONNECT_TIMEOUT_MS,
  );
  const signal = AbortSignal.any([interrupt, limit.signal]);
  try {
    return await probeOrConnect(uri, exportName, signal);
  } finally {
    clearTimeout(timer);
  }
}

async function probeOrConnect(
  uri: string,
  exportName: string | undefined,
  signal: AbortSignal,
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
    // Contexts are only listed over structured replies.
    const contexts = p.structuredReplies ? p.metaContexts : null;
    return {
      session: sessionFacts(p),
      export: {
        exportName: p.exportName,
        description: p.description,
        size: toNumber(p.sizeBigInt),
        flags: p.flags,
        can: capabilities({
          flags: p.flags,
          structuredReplies: p.structuredReplies,
          metaContexts: contexts?.length ?? 0,
          extendedHeaders: p.extendedHeaders,
        }),
        blockSize: p.blockSize ?? null,
        contexts,
      },
    };
  } catch (e) {
    probeError = e;
  }
  // Out of time (or interrupted): asking again would only wait again.
  if (signal.aborted) throw probeError;
  let nbd;
  try {
    nbd = await connect(uri, options);
  } catch {
    throw probeError;
  }
  try {
    return {
      session: sessionFacts(nbd),
      export: {
        exportName: nbd.exportName,
        description: nbd.description,
        size: nbd.size,
        flags: nbd.flags,
        can: capabilities({
          flags: nbd.flags,
          structuredReplies: nbd.structuredReplies,
          metaContexts: nbd.metaContexts.length,
          extendedHeaders: nbd.extendedHeaders,
        }),
        // Only NBD_OPT_INFO/GO carry block sizes; a server that got here
        // (oldstyle, or without NBD_OPT_INFO) sent none, and the client's
        // defaults are not the server's word.
        blockSize: null,
        contexts: null,
      },
    };
  } finally {
    await nbd.close();
  }
}

function toNumber(size: bigint): number {
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new RangeError(`Export size ${size} is too large for this tool`);
  }
  return Number(size);
}

/** The URI of another export on the same server. */
function exportUri(uri: string, name: string): string {
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
function exportJson(uri: string, e: ExportFacts): Record<string, unknown> {
  const o: Record<string, unknown> = { "export-name": e.exportName };
  if (e.description) o["description"] = e.description;
  o["uri"] = uri;
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
function sizeText(bytes: number): string {
  const size = exactSize(bytes);
  return `${bytes}${size.scaled ? ` (${size.text})` : ""}`;
}

function exportText(uri: string, e: ExportFacts): string {
  const lines = [`export=${JSON.stringify(e.exportName)}:`];
  if (e.description) lines.push(`\tdescription: ${e.description}`);
  lines.push(`\texport-size: ${sizeText(e.size)}`);
  lines.push(`\turi: ${uri}`);
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
  uri: string,
  context: string,
  signal: AbortSignal,
): Promise<{
  size: number;
  runs: MapRun[];
}> {
  const nbd = await connect(uri, { metaContexts: [context], signal });
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

/** `--can`/`--is` answers by name, with the spellings nbdinfo accepts. */
const FEATURES: Readonly<Record<string, FeatureTest>> = {
  connect: () => true,
  read: () => true,
  write: (_s, e) => !e.can.readOnly,
  readonly: can("readOnly"),
  rotational: can("rotational"),
  tls: (s) => s.tls,
  structuredreply: (s) => s.structuredReplies,
  extendedheaders: (s) => s.extendedHeaders,
  blockstatus: (s, e) =>
    s.structuredReplies && (e.contexts?.includes("base:allocation") ?? false),
  cache: can("canCache"),
  df: can("canDf"),
  fastzero: can("canFastZero"),
  flush: can("canFlush"),
  fua: can("canFua"),
  multiconn: can("canMultiConn"),
  trim: can("canTrim"),
  zero: can("canWriteZeroes"),
};

const FEATURE_ALIASES: Readonly<Record<string, string>> = {
  sr: "structuredreply",
  structured: "structuredreply",
  structuredreplies: "structuredreply",
  eh: "extendedheaders",
  extended: "extendedheaders",
  extendedheader: "extendedheaders",
};

/**
 * Finds the test for a `--can`/`--is` name, folded as nbdinfo folds it
 * (case, dashes, underscores and spaces do not matter).
 *
 * @throws {UsageError} For a name nbdinfo would not know either.
 */
function featureTest(name: string): FeatureTest {
  const key = name.toLowerCase().replaceAll(/[-_ ]/g, "");
  const test = FEATURES[FEATURE_ALIASES[key] ?? key];
  if (!test) throw new UsageError(`unknown --can or --is option: ${name}`);
  return test;
}

/** Everything `--list` shows: one probe per listed export. */
async function listOutput(
  uri: string,
  json: boolean,
  signal: AbortSignal,
): Promise<{
  text: string;
  ok: boolean;
}> {
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
  const shown: Array<{ uri: string; facts: ExportFacts }> = [];
  let ok = true;
  for (const item of listed) {
    try {
      const g = await gather(uri, item.name, signal);
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
  if (json) {
    const doc = {
      ...(session ? sessionJson(session) : {}),
      exports: shown.map((s) => exportJson(s.uri, s.facts)),
    };
    return { text: JSON.stringify(doc, null, 2) + "\n", ok };
  }
  let text = session ? sessionText(session) : "";
  for (const s of shown) text += exportText(s.uri, s.facts);
  return { text, ok };
}

/** What the command line asks for. */
type Request =
  | { mode: "help" }
  | { mode: "show" | "list" | "size"; uri: string; json: boolean }
  | {
    mode: "map";
    uri: string;
    json: boolean;
    context: string;
    totals: boolean;
  }
  | { mode: "can"; uri: string; test: FeatureTest };

/**
 * Reads the command line.
 *
 * @throws {UsageError} For anything nbdinfo would refuse too.
 */
function parseRequest(args: string[]): Request {
  const { options: o, positionals } = parseArgs(args, OPTIONS);
  if (o.has("help")) return { mode: "help" };
  if (positionals.length !== 1) {
    throw new UsageError(
      positionals.length === 0 ? "a URI is required" : "too many arguments",
    );
  }
  const modes = ["list", "map", "size", "can", "is"].filter((m) => o.has(m));
  if (modes.length > 1) {
    throw new UsageError(
      `you cannot use ${modes.map((m) => `--${m}`).join(" and ")} together`,
    );
  }
  if (o.has("totals") && !o.has("map")) {
    throw new UsageError("--totals needs --map");
  }
  const uri = positionals[0]!;
  const json = o.has("json");
  const can = o.get("can") ?? o.get("is");
  if (can !== undefined) {
    return { mode: "can", uri, test: featureTest(String(can)) };
  }
  const map = o.get("map");
  if (map !== undefined) {
    return {
      mode: "map",
      uri,
      json,
      context: typeof map === "string" ? map : "base:allocation",
      totals: o.has("totals"),
    };
  }
  const mode = o.has("list") ? "list" : o.has("size") ? "size" : "show";
  return { mode, uri, json };
}

/** Does what was asked: the text for stdout and the exit status. */
async function run(
  r: Exclude<Request, { mode: "help" }>,
  signal: AbortSignal,
): Promise<{ out: string; status: number }> {
  switch (r.mode) {
    case "can": {
      const g = await gather(r.uri, undefined, signal);
      return { out: "", status: r.test(g.session, g.export) ? 0 : 2 };
    }
    case "size": {
      const g = await gather(r.uri, undefined, signal);
      return { out: `${g.export.size}\n`, status: 0 };
    }
    case "map": {
      const { size, runs } = await readMap(r.uri, r.context, signal);
      const out = r.totals
        ? totalsOutput(r.context, size, runs, r.json)
        : mapOutput(r.context, runs, r.json);
      return { out, status: 0 };
    }
    case "list": {
      const { text, ok } = await listOutput(r.uri, r.json, signal);
      return { out: text, status: ok ? 0 : 1 };
    }
    case "show": {
      const g = await gather(r.uri, undefined, signal);
      const uri = exportUri(r.uri, g.export.exportName);
      const out = r.json
        ? JSON.stringify(
          { ...sessionJson(g.session), exports: [exportJson(uri, g.export)] },
          null,
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
 * @returns The exit status: 0, 1 on failure, 2 for a `--can`/`--is` "no",
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

if (import.meta.main) Deno.exit(await main(Deno.args));

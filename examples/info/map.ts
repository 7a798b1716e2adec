/**
 * `--map` and `--totals`: the extents of a metadata context over the whole
 * export, merged into runs of one type, as nbdinfo prints them.
 *
 * @module
 */

import { connect, STATE_HOLE, STATE_ZERO } from "../../mod.ts";
import { tlsEngineOption } from "../_cli.ts";
import { connectTarget, type Target } from "./facts.ts";
import { jsonText } from "./show.ts";

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

/** A run of extents of one type; offsets exact past 2^53. */
export interface MapRun {
  offset: bigint;
  length: bigint;
  type: number;
}

/** One extent as a {@linkcode StatusSource} reports it. */
export interface StatusExtent {
  length: bigint;
  flags: number;
}

/**
 * What walking a map needs of a connection, in exact 64-bit offsets, so
 * that the walk does not care where the numbers come from.
 */
export interface StatusSource {
  /** The export's size. */
  readonly size: bigint;
  /** The most one request asks about. */
  readonly maxLength: bigint;
  /**
   * The extents of the context from `offset`, for up to `length` bytes;
   * the server may describe less (the walk asks again) or, in the last
   * extent, more (the walk cuts it).
   */
  status(offset: bigint, length: bigint): Promise<StatusExtent[]>;
}

/**
 * The most one request asks about: the rest of the export, as nbdinfo
 * asks (the library keeps it to what the request header carries: 2^32
 * bytes less a block, or with extended headers 2^63 - 512).
 */
const ASK_ALL = 2n ** 63n - 1n;

/**
 * Walks the whole export, merging neighbours of one type into runs.
 *
 * @throws {Error} If a request is answered with no extents (which would
 * loop forever).
 */
export async function walkMap(source: StatusSource): Promise<MapRun[]> {
  const size = source.size;
  const runs: MapRun[] = [];
  let offset = 0n;
  while (offset < size) {
    const remaining = size - offset;
    const length = remaining < source.maxLength ? remaining : source.maxLength;
    const extents = await source.status(offset, length);
    const before = offset;
    for (const e of extents) {
      if (offset >= size) break;
      const rest = size - offset;
      const len = e.length < rest ? e.length : rest;
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
  return runs;
}

/**
 * Reads the whole extent map of `context`, merging neighbours of one type,
 * in bigint offsets: exact to 2^63 - 1.
 *
 * @throws {Error} If the server does not offer the context, or answers a
 * request with no extents.
 */
export async function readMap(
  target: Target,
  context: string,
  signal: AbortSignal,
): Promise<{
  size: bigint;
  runs: MapRun[];
}> {
  const nbd = await connect(connectTarget(target), {
    ...await tlsEngineOption(connectTarget(target)),
    metaContexts: [context],
    signal,
  });
  try {
    if (!nbd.metaContexts.includes(context)) {
      throw new Error(
        `--map: server does not support metadata context "${context}"`,
      );
    }
    const size = nbd.sizeBigInt;
    const source: StatusSource = {
      size,
      maxLength: ASK_ALL,
      async status(offset, length) {
        const reply = await nbd.blockStatus(offset, length, { signal });
        return (reply[context] ?? []).map((e) => ({
          length: e.length,
          flags: e.flags,
        }));
      },
    };
    return { size, runs: await walkMap(source) };
  } finally {
    await nbd.close();
  }
}

/** The runs, a line (or a JSON object) each. */
export function mapOutput(
  context: string,
  runs: MapRun[],
  json: boolean,
): string {
  if (json) {
    return jsonText(
      runs.map((r) => {
        const d = extentDescription(context, r.type);
        return d === null ? { ...r } : { ...r, description: d };
      }),
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

/** Bytes and share of each type, as `--totals`. */
export function totalsOutput(
  context: string,
  size: bigint,
  runs: MapRun[],
  json: boolean,
): string {
  const byType = new Map<number, bigint>();
  for (const r of runs) {
    byType.set(r.type, (byType.get(r.type) ?? 0n) + r.length);
  }
  const rows = [...byType].sort(([a], [b]) => a - b).map(([type, bytes]) => ({
    size: bytes,
    // nbdinfo prints "%g": six significant digits, of a double.
    percent: size
      ? Number(((Number(bytes) * 100) / Number(size)).toPrecision(6))
      : 0,
    type,
    description: extentDescription(context, type),
  }));
  if (json) {
    return jsonText(
      rows.map((r) => {
        const { description, ...rest } = r;
        return description === null ? rest : { ...rest, description };
      }),
      2,
    ) + "\n";
  }
  return rows.map((r) =>
    `${String(r.size).padStart(10)} ${r.percent.toFixed(1).padStart(5)}% ${
      String(r.type).padStart(3)
    }${r.description === null ? "" : ` ${r.description}`}\n`
  ).join("");
}

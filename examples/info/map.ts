/**
 * `--map` and `--totals`: the extents of a metadata context over the whole
 * export, merged into runs of one type, as nbdinfo prints them.
 *
 * @module
 */

import { connect, STATE_HOLE, STATE_ZERO } from "../../mod.ts";
import { connectTarget, type Target } from "./facts.ts";

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
export async function readMap(
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

/** The runs, a line (or a JSON object) each. */
export function mapOutput(
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

/** Bytes and share of each type, as `--totals`. */
export function totalsOutput(
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

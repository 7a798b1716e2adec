/**
 * The benchmark's output: the main table (medians, CPU per request, peak
 * memory, each row against its section's reference row of ours), the
 * summary of ours against each libnbd version, and the table of the
 * plug-in workloads' {@linkcode BenchRow}s.
 *
 * @module
 */

import { type BenchRow, median, MiB, type Row } from "./_harness.ts";

interface Rates {
  mibs: number;
  iops: number;
  secs: number;
  /** Client CPU microseconds per request, when every run measured it. */
  cpuPerOp: number | undefined;
  /** Peak RSS in MiB of a command line, when every run measured it. */
  rss: number | undefined;
}

function rates(row: Row): Rates {
  const cpu = row.runs.every((r) => r.cpu !== undefined)
    ? median(row.runs.map((r) => r.cpu! / r.ops * 1e6))
    : undefined;
  return {
    mibs: median(row.runs.map((r) => r.bytes / MiB / r.seconds)),
    iops: median(row.runs.map((r) => r.ops / r.seconds)),
    secs: median(row.runs.map((r) => r.seconds)),
    cpuPerOp: cpu,
    rss: row.runs.every((r) => r.rss !== undefined)
      ? median(row.runs.map((r) => r.rss! / MiB))
      : undefined,
  };
}

/** `n` with thousands separators and `digits` decimals. */
export function fmt(n: number, digits = 0): string {
  return n.toLocaleString("en-US", {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
}

/**
 * A Markdown table, columns padded to their widest cell; `numeric` columns
 * right-aligned.
 */
function markdownTable(
  head: string[],
  numeric: boolean[],
  lines: string[][],
): string[] {
  const widths = head.map((h, i) =>
    Math.max(h.length, ...lines.map((l) => l[i]!.length))
  );
  const show = (cells: string[]) =>
    "| " +
    cells.map((x, i) =>
      numeric[i] ? x.padStart(widths[i]!) : x.padEnd(widths[i]!)
    ).join(" | ") + " |";
  const rule = "|" +
    widths.map((w, i) =>
      numeric[i] ? "-".repeat(w + 1) + ":" : "-".repeat(w + 2)
    ).join("|") + "|";
  return [show(head), rule, ...lines.map(show)];
}

/** The table, as Markdown: each section's first row of ours is the reference. */
export function formatTable(rows: Row[], runs: number): string {
  const head = [
    "test",
    "client",
    "MiB/s",
    "IOPS",
    "median s",
    "CPU us/req",
    "peak RSS MiB",
    "ref/this",
  ];
  const numeric = [false, false, true, true, true, true, true, true];
  const lines: string[][] = [];
  const notes: string[] = [];
  let section = "";
  let ref: Rates | undefined;
  for (const row of rows) {
    if (row.section !== section) {
      section = row.section;
      ref = undefined;
    }
    if (row.runs.length === 0) {
      lines.push([section, row.client, "-", "-", "-", "-", "-", "-"]);
      notes.push(`${row.client}: ${row.note ?? "skipped"}`);
      continue;
    }
    const r = rates(row);
    if (row.ours && !ref) ref = r;
    const ratio = ref === r
      ? "ref"
      : ref
      ? `${fmt(ref.mibs / r.mibs, 2)}x`
      : "";
    lines.push([
      section,
      row.client,
      fmt(r.mibs, 1),
      fmt(r.iops),
      fmt(r.secs, 3),
      r.cpuPerOp === undefined ? "-" : fmt(r.cpuPerOp, 1),
      r.rss === undefined ? "-" : fmt(r.rss, 1),
      ratio,
    ]);
  }
  return [
    ...markdownTable(head, numeric, lines),
    "",
    `Median of ${runs} runs after one warm-up, clients taking turns. ` +
    '"ref/this": MiB/s of the section\'s "ref" row (our client) over ' +
    "this row's (above 1: ours is faster). CPU us/req: the client process's user + " +
    "system time per request (nbdkit's excluded); for command lines, the " +
    "whole process, start-up included, per 256 KiB of data. Command lines " +
    "(nbdcopy, deno run) are timed from spawn to exit; peak RSS: their " +
    "largest resident set (GNU time's %M). nbdcopy and examples/copy.ts " +
    "alike open at most one connection per thread, and one thread per " +
    "processor, whatever -C says (-T raises it).",
    ...notes.map((n) => `Skipped: ${n}`),
  ].join("\n");
}

/**
 * Both ratios per section: our reference row over the fastest row of each
 * libnbd version (the hardest comparison), e.g.
 * `seq read 2,048 MiB: 1.14 0.92x (nbdcopy 1.14 (defaults)), 1.22 …`.
 */
export function ratioSummary(rows: Row[], versions: string[]): string {
  const lines: string[] = [];
  const sections = [...new Set(rows.map((r) => r.section))];
  for (const section of sections) {
    const mine = rows.filter((r) => r.section === section && r.runs.length);
    const ref = mine.find((r) => r.ours);
    if (!ref) continue;
    const refRate = rates(ref).mibs;
    const parts: string[] = [];
    for (const v of versions) {
      const theirs = mine.filter((r) =>
        !r.ours && r.client.split(" ").includes(v)
      );
      if (theirs.length === 0) {
        parts.push(`${v} -`);
        continue;
      }
      const best = theirs.reduce((a, b) =>
        rates(a).mibs >= rates(b).mibs ? a : b
      );
      parts.push(
        `${v} ${fmt(refRate / rates(best).mibs, 2)}x (${best.client})`,
      );
    }
    lines.push(`${section}: ${parts.join(", ")}`);
  }
  return [
    "Ours over the fastest libnbd row of each version (above 1: ours is faster):",
    ...lines.map((l) => `- ${l}`),
  ].join("\n");
}

/**
 * The plug-in workloads' rows, as Markdown: each figure of ours beside the
 * peer's, and the ratio turned so that above 1 means ours is better.
 */
export function formatBenchRows(rows: BenchRow[]): string {
  const head = ["workload", "ours", "peer", "unit", "peer is", "ours vs peer"];
  const numeric = [false, true, true, false, false, true];
  const figure = (n: number) => fmt(n, Math.abs(n) >= 100 ? 0 : 2);
  const notes: string[] = [];
  const lines = rows.map((r) => {
    if (r.note) notes.push(`${r.name}: ${r.note}`);
    const ratio = r.peer === null || r.peer === 0 || r.ours === 0
      ? "-"
      : `${fmt(r.higherIsBetter ? r.ours / r.peer : r.peer / r.ours, 2)}x`;
    return [
      r.name,
      figure(r.ours),
      r.peer === null ? "-" : figure(r.peer),
      r.unit,
      r.peerName,
      ratio,
    ];
  });
  return [
    ...markdownTable(head, numeric, lines),
    "",
    '"ours vs peer": above 1, ours is better (faster, or less of what the ' +
    "unit counts when less is better).",
    ...notes.map((n) => `Note: ${n}`),
  ].join("\n");
}

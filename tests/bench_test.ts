/**
 * The benchmark's harness, without running a workload: the workload list,
 * the command line, and the two tables' arithmetic.
 */

import assert from "node:assert/strict";
import { WORKLOADS } from "../bench/bench.ts";
import {
  type BenchRow,
  GiB,
  MiB,
  parseConfig,
  type Row,
  type Run,
} from "../bench/_harness.ts";
import { formatBenchRows, formatTable, ratioSummary } from "../bench/_table.ts";

const names = WORKLOADS.map(([name]) => name);

Deno.test("WORKLOADS: unique names, each of one of the two shapes", () => {
  assert.equal(new Set(names).size, names.length);
  for (const [name, workload] of WORKLOADS) {
    const shapes = ["sections", "rows"].filter((k) =>
      typeof (workload as unknown as Record<string, unknown>)[k] === "function"
    );
    assert.equal(shapes.length, 1, `${name}: ${shapes}`);
  }
  assert.deepEqual(names, [
    "seq",
    "rand",
    "write",
    "one-at-a-time",
    "tls",
    "copy",
    "rate",
    "fuse",
    "gnutls",
  ], "the order of the output");
});

Deno.test("parseConfig()", async (t) => {
  await t.step("defaults: every workload, 2 GiB, 3 runs", () => {
    const c = parseConfig([], names);
    assert.deepEqual([c.size, c.runs, c.only], [2 * GiB, 3, []]);
  });

  await t.step("--only names workloads, and only known ones", () => {
    const c = parseConfig(["--quick", "--only=rand,tls"], names);
    assert.deepEqual([c.size, c.only], [256 * MiB, ["rand", "tls"]]);
    assert.throws(
      () => parseConfig(["--only=rand,nope"], names),
      (e: unknown) =>
        e instanceof RangeError && /no workload "nope"/.test(e.message) &&
        e.message.includes(names.join(", ")),
    );
  });

  await t.step("a bad option or size", () => {
    assert.throws(() => parseConfig(["--fast"], names), TypeError);
    assert.throws(() => parseConfig(["--size=3X"], names), RangeError);
    assert.throws(() => parseConfig(["--size=1000"], names), RangeError);
  });
});

Deno.test("formatTable() and ratioSummary(): ours over each peer", () => {
  const run = (seconds: number): Run => ({
    ops: 4,
    bytes: 4 * MiB,
    seconds,
    cpu: 0.001,
  });
  const rows: Row[] = [
    { section: "s", client: "ours", ours: true, runs: [run(1), run(3)] },
    { section: "s", client: "nbdsh 1.22", ours: false, runs: [run(4)] },
    {
      section: "s",
      client: "nbdsh 1.14",
      ours: false,
      runs: [],
      note: "not found",
    },
  ];
  const table = formatTable(rows, 2);
  // Ours: median of 4 and 1.33 MiB/s is 2.67; the peer's 1, so 2.67x.
  assert.match(table, /\| s +\| ours +\| +2\.7 \|.*\| +ref \|/);
  assert.match(table, /\| nbdsh 1\.22 +\|.*\| +2\.67x \|/);
  assert.match(table, /Skipped: nbdsh 1\.14: not found/);
  assert.match(
    ratioSummary(rows, ["1.14", "1.22"]),
    /- s: 1\.14 -, 1\.22 2\.67x \(nbdsh 1\.22\)/,
  );
});

Deno.test("formatBenchRows(): above 1 means ours is better, both ways", () => {
  const rows: BenchRow[] = [
    {
      name: "throughput",
      unit: "MiB/s",
      higherIsBetter: true,
      ours: 300,
      peer: 200,
      peerName: "nbd-client",
    },
    {
      name: "latency",
      unit: "ms",
      higherIsBetter: false,
      ours: 2,
      peer: 3,
      peerName: "nbd-client",
    },
    {
      name: "attach",
      unit: "ms",
      higherIsBetter: false,
      ours: 5,
      peer: null,
      peerName: "nbd-client",
      note: "nbd-client not installed",
    },
  ];
  const text = formatBenchRows(rows);
  assert.match(text, /\| throughput \| +300 \| +200 \| MiB\/s .*\| +1\.50x \|/);
  assert.match(text, /\| latency +\| +2\.00 \| +3\.00 \| ms .*\| +1\.50x \|/);
  assert.match(text, /\| attach +\| +5\.00 \| +- \| ms .*\| +- \|/);
  assert.match(text, /Note: attach: nbd-client not installed/);
});

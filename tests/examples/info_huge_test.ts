/**
 * `info` on exports past 2^53 bytes prints the export, exactly, as nbdinfo
 * does; before, it printed the library's advice to use `sizeBigInt`.
 */

import assert from "node:assert/strict";
import {
  mapOutput,
  type StatusSource,
  totalsOutput,
  walkMap,
} from "../../examples/info/map.ts";
import { nbdkit, qemuNbd, run, tempDir } from "../support/servers.ts";
import { runTool } from "./_tools.ts";

const SIZES = [2n ** 53n + 512n, 2n ** 63n - 1n];

Deno.test("info prints exports of 2^53 bytes and more exactly, as nbdinfo", async (t) => {
  for (const size of SIZES) {
    await t.step(`size ${size}`, async () => {
      const server = await nbdkit(["null", `size=${size}`]);
      try {
        const uri = server.uri();
        const json = await runTool("info", ["--json", "--no-content", uri]);
        assert.equal(json.code, 0, json.stderr);
        // Parsed by hand: JSON.parse would round the number.
        assert.match(json.text, new RegExp(`"export-size": ${size},`));
        const theirs = await run("nbdinfo", ["--json", uri]);
        assert.match(theirs, new RegExp(`"export-size": ${size},`));
        const sized = await runTool("info", ["--size", uri]);
        assert.equal(sized.text, `${size}\n`);
        assert.equal(sized.text, await run("nbdinfo", ["--size", uri]));
        const text = await runTool("info", ["--no-content", uri]);
        assert.equal(text.code, 0, text.stderr);
        assert.match(text.text, new RegExp(`\texport-size: ${size}\n`));
      } finally {
        await server.stop();
      }
    });
  }
});

/**
 * A source that answers as qemu-nbd 10 does for a `null-co` image over
 * extended headers: one extent, a hole, for all that was asked.
 */
function nullCo(size: bigint): StatusSource & { asked: bigint[] } {
  const asked: bigint[] = [];
  return {
    size,
    maxLength: 2n ** 63n - 1n,
    asked,
    status(offset, length) {
      asked.push(offset);
      return Promise.resolve([{ length, flags: 1 }]);
    },
  };
}

Deno.test("info --map: the walk and its output are exact past 2^53, as nbdinfo 1.22 prints qemu-nbd 10's null-co", async (t) => {
  for (const size of [2n ** 53n, 2n ** 62n]) {
    await t.step(`size ${size}`, async () => {
      const runs = await walkMap(nullCo(size));
      assert.deepEqual(runs, [{ offset: 0n, length: size, type: 1 }]);
      const ours = {
        map: mapOutput("base:allocation", runs, false),
        totals: totalsOutput("base:allocation", size, runs, false),
        json: mapOutput("base:allocation", runs, true),
      };
      const dir = await tempDir("trixie");
      const server = await qemuNbd([
        "-r",
        "--image-opts",
        `driver=null-co,size=${size}`,
      ], { dir, peers: "trixie" });
      try {
        const uri = server.uri();
        assert.equal(ours.map, await run("nbdinfo", ["--map", uri], "trixie"));
        assert.equal(
          ours.totals,
          await run("nbdinfo", ["--map", "--totals", uri], "trixie"),
        );
        // nbdinfo lays its JSON out otherwise; the numbers must be its own,
        // every digit (JSON.parse would round them).
        const theirs = await run("nbdinfo", ["--map", "--json", uri], "trixie");
        for (const text of [ours.json, theirs]) {
          assert.match(text, new RegExp(`"length": ${size},`));
          assert.match(text, /"offset": 0,/);
        }
      } finally {
        await server.stop();
        await Deno.remove(dir, { recursive: true }).catch(() => {});
      }
    });
  }
  await t.step("runs across 2^53 at odd offsets stay exact", async () => {
    // Lengths a double cannot hold: 2^53 + 1, and offsets past it.
    const lengths = [2n ** 53n + 1n, 3n, 5n, 2n ** 62n];
    const flags = [0, 0, 3, 1];
    const size = lengths.reduce((a, b) => a + b);
    let i = 0;
    const source: StatusSource = {
      size,
      maxLength: 2n ** 63n - 1n,
      status: () =>
        Promise.resolve(
          i < lengths.length
            ? [{ length: lengths[i]!, flags: flags[i++]! }]
            : [],
        ),
    };
    const runs = await walkMap(source);
    assert.deepEqual(runs, [
      { offset: 0n, length: 2n ** 53n + 4n, type: 0 },
      { offset: 2n ** 53n + 4n, length: 5n, type: 3 },
      { offset: 2n ** 53n + 9n, length: 2n ** 62n, type: 1 },
    ]);
    assert.equal(
      mapOutput("base:allocation", runs, false),
      "         0  9007199254740996    0  data\n" +
        "9007199254740996           5    3  hole,zero\n" +
        "9007199254741001  4611686018427387904    1  hole\n",
    );
  });
});

/**
 * `info` on exports past 2^53 bytes prints the export, exactly, as nbdinfo
 * does; before, it printed the library's advice to use `sizeBigInt`.
 */

import assert from "node:assert/strict";
import {
  mapOutput,
  type StatusSource,
  walkMap,
} from "../../examples/info/map.ts";
import { connect, STATE_HOLE, STATE_ZERO } from "../../mod.ts";
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
 * JSON with every number kept exact: each number becomes its digits as a
 * string before parsing (JSON.parse would round those past 2^53).
 */
function exactJson(text: string): unknown {
  return JSON.parse(text.replace(/(:\s*)(-?[0-9][0-9.e+-]*)/g, '$1"$2"'));
}

/**
 * qemu-nbd 10 (Debian 13) serving a `null-co` image of `size` bytes: a
 * hole whose reads are left undefined, or with `read-zeroes=on` zeroes.
 */
async function withNullCo(
  size: bigint,
  zeroes: boolean,
  body: (uri: string) => Promise<void>,
): Promise<void> {
  const dir = await tempDir("trixie");
  const server = await qemuNbd([
    "-r",
    "--image-opts",
    `driver=null-co,size=${size},read-zeroes=${zeroes ? "on" : "off"}`,
  ], { dir, peers: "trixie" });
  try {
    await body(server.uri());
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

Deno.test("info --map on qemu-nbd 10's null-co of 2^53 and 2^62 bytes prints what nbdinfo 1.22 prints", async (t) => {
  const cases = [2n ** 53n, 2n ** 62n].flatMap((size) =>
    [false, true].map((zeroes) => ({ size, zeroes }))
  );
  for (const { size, zeroes } of cases) {
    await t.step(
      `size ${size}${zeroes ? ", read-zeroes=on" : ""}`,
      async () => {
        await withNullCo(size, zeroes, async (uri) => {
          for (const args of [["--map"], ["--map", "--totals"]]) {
            const ours = await runTool("info", [...args, uri]);
            assert.equal(ours.code, 0, ours.stderr);
            assert.equal(ours.stderr, "");
            const theirs = await run("nbdinfo", [...args, uri], "trixie");
            assert.equal(ours.text, theirs, args.join(" "));
            assert.match(ours.text, new RegExp(`${size}`));
          }
          // nbdinfo lays its JSON out otherwise: the values must be its own,
          // every digit.
          for (
            const args of [["--map", "--json"], ["--map", "--totals", "--json"]]
          ) {
            const ours = await runTool("info", [...args, uri]);
            assert.equal(ours.code, 0, ours.stderr);
            const theirs = await run("nbdinfo", [...args, uri], "trixie");
            assert.deepEqual(exactJson(ours.text), exactJson(theirs));
            assert.match(ours.text, new RegExp(`: ${size},`));
          }
        });
      },
    );
  }
  await t.step(
    "the library maps the whole 2^62 bytes in one request",
    async () => {
      await withNullCo(2n ** 62n, true, async (uri) => {
        await using nbd = await connect(uri, {
          metaContexts: ["base:allocation"],
        });
        assert.equal(nbd.extendedHeaders, true);
        const map = await nbd.blockStatus(0n, nbd.sizeBigInt);
        assert.deepEqual(map["base:allocation"], [
          { offset: 0n, length: 2n ** 62n, flags: STATE_HOLE | STATE_ZERO },
        ]);
        assert.equal(nbd.stats.requests["NBD_CMD_BLOCK_STATUS"], 1);
        const tail = await nbd.read(2n ** 62n - 4096n, 4096);
        assert.deepEqual(tail, new Uint8Array(4096));
      });
    },
  );
});

Deno.test("info --map: runs past 2^53 stay exact", async (t) => {
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

Deno.test("copy says plainly that it stops below 2^53 bytes", async () => {
  const server = await nbdkit(["null", `size=${2n ** 62n}`]);
  try {
    const runs = [
      [server.uri(), "null:"],
      ["--dirty=base:allocation", "--map-only", server.uri()],
    ];
    for (const args of runs) {
      const r = await runTool("copy", args);
      assert.equal(r.code, 1);
      assert.match(
        r.stderr,
        /the export has 4611686018427387904 bytes; copy handles exports below 2\^53 bytes \(8 PiB\) only/,
      );
      assert.doesNotMatch(r.stderr, /sizeBigInt/);
    }
  } finally {
    await server.stop();
  }
});

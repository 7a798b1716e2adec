/**
 * `info` on exports past 2^53 bytes prints the export, exactly, as nbdinfo
 * does; before, it printed the library's advice to use `sizeBigInt`.
 */

import assert from "node:assert/strict";
import { nbdkit, run } from "../support/servers.ts";
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

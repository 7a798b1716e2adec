import assert from "node:assert/strict";
import manifest from "../../deno.json" with { type: "json" };
import { runTool } from "./_tools.ts";

/** Every tool, as `examples/<name>.ts`; a new tool adds its name here. */
const TOOLS = ["info", "copy", "connect", "nbd", "dump", "fuse"];

Deno.test("every tool prints its version with -V and --version", async (t) => {
  for (const tool of TOOLS) {
    for (const flag of ["-V", "--version"]) {
      await t.step(`${tool} ${flag}`, async () => {
        const r = await runTool(tool, [flag]);
        assert.equal(r.code, 0, r.stderr);
        assert.equal(r.stderr, "");
        assert.equal(
          r.text,
          `${tool} ${manifest.version}\n${manifest.name} ${manifest.version}\n` +
            `deno ${Deno.version.deno}\n`,
        );
      });
    }
  }
});

/**
 * What a server says reaches the terminal shown, never obeyed: an export
 * description or name, an option error reply's text, a command
 * error's text and a server command's stderr, full of escape sequences, C1
 * controls, NUL and DEL, come out of `info` and `copy` escaped, while
 * `--json` keeps every character exactly.
 */

import assert from "node:assert/strict";
import {
  CMD_BLOCK_STATUS,
  EIO,
  OPT_GO,
  OPT_INFO,
  REP_ERR_POLICY,
  REPLY_FLAG_DONE,
  REPLY_TYPE_ERROR,
} from "../../lib/constants.ts";
import {
  errorPayload,
  extendedChunk,
  optionReply,
  startTestServer,
  structuredChunk,
} from "../support/server.ts";
import { type RunResult, runTool } from "./_tools.ts";

/**
 * Sets the window title, clears the screen, turns it red, then a NUL, a DEL
 * and a one-character CSI (U+009B) clearing the screen again.
 */
const HOSTILE = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\x00nul\x7fdel\u009b2Jc1";

/** How `HOSTILE` must look once escaped. */
const SHOWN = "\\u001b]0;owned\\u0007\\u001b[2J\\u001b[31mred" +
  "\\u0000nul\\u007fdel\\u009b2Jc1";

/**
 * Raw C0 controls (tab and newline aside: the report's layout), DEL and C1
 * controls: none may reach a terminal.
 */
// deno-lint-ignore no-control-regex -- finding them is the point.
const RAW = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/;

/** Asserts that neither output of a run carries a raw control character. */
function assertNoRawControls(r: RunResult): void {
  const found = RAW.exec(r.text) ?? RAW.exec(r.stderr);
  assert.equal(
    found,
    null,
    `raw U+${found?.[0].charCodeAt(0).toString(16).padStart(4, "0")} in ${
      JSON.stringify({ stdout: r.text, stderr: r.stderr })
    }`,
  );
}

Deno.test("info shows a hostile export description escaped, and exact in --json", async (t) => {
  await using server = await startTestServer({
    exports: [{ name: "disk", size: 64 * 1024, description: HOSTILE }],
  });
  await t.step("text", async () => {
    const r = await runTool("info", ["--no-content", server.uri]);
    assert.equal(r.code, 0, r.stderr);
    assertNoRawControls(r);
    assert.ok(r.text.includes(`\tdescription: ${SHOWN}\n`), r.text);
  });
  await t.step("--list", async () => {
    const r = await runTool("info", ["--list", server.uri]);
    assert.equal(r.code, 0, r.stderr);
    assertNoRawControls(r);
    assert.ok(r.text.includes(`\tdescription: ${SHOWN}\n`), r.text);
  });
  await t.step("--json keeps every character and stays valid", async () => {
    const r = await runTool("info", ["--json", "--no-content", server.uri]);
    assert.equal(r.code, 0, r.stderr);
    assertNoRawControls(r);
    const doc = JSON.parse(r.text);
    assert.equal(doc.exports[0].description, HOSTILE);
  });
});

Deno.test("info shows a hostile export name escaped in text, exact in --json", async () => {
  // JSON.stringify quotes C0 controls but leaves DEL and C1 raw.
  const name = "disk\u009b2J\x7f\x1b[31m";
  await using server = await startTestServer({
    exports: [{ name, size: 64 * 1024 }],
  });
  const text = await runTool("info", ["--list", server.uri]);
  assert.equal(text.code, 0, text.stderr);
  assertNoRawControls(text);
  assert.ok(
    text.text.includes('export="disk\\u009b2J\\u007f\\u001b[31m":\n'),
    text.text,
  );
  const json = await runTool("info", ["--list", "--json", server.uri]);
  assert.equal(json.code, 0, json.stderr);
  assertNoRawControls(json);
  assert.equal(JSON.parse(json.text).exports[0]["export-name"], name);
});

Deno.test("info shows an option error reply's text escaped", async () => {
  // NBD_OPT_INFO and NBD_OPT_GO both refused, with the server's words.
  await using server = await startTestServer({
    exports: [{ name: "disk", size: 64 * 1024 }],
    onOption: (opt) =>
      opt.option === OPT_INFO || opt.option === OPT_GO
        ? [optionReply(opt.option, REP_ERR_POLICY, HOSTILE)]
        : undefined,
  });
  const r = await runTool("info", ["--no-content", server.uri]);
  assert.equal(r.code, 1);
  assertNoRawControls(r);
  assert.ok(r.stderr.includes(SHOWN), r.stderr);
  assert.match(r.stderr, /^info: .*NBD_REP_ERR_POLICY/);
});

Deno.test("info --map shows a command error's text escaped", async () => {
  await using server = await startTestServer({
    exports: [{ name: "disk", size: 64 * 1024 }],
    onCommand: (req) => {
      if (req.type !== CMD_BLOCK_STATUS) return undefined;
      const error = errorPayload(EIO, HOSTILE);
      return [
        req.extended
          ? extendedChunk(
            req.cookie,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            req.offset,
            error,
          )
          : structuredChunk(
            req.cookie,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            error,
          ),
      ];
    },
  });
  const r = await runTool("info", ["--map", server.uri]);
  assert.equal(r.code, 1);
  assertNoRawControls(r);
  assert.ok(r.stderr.includes(SHOWN), r.stderr);
  assert.match(r.stderr, /^info: .*EIO/);
});

Deno.test("a server command's stderr is shown escaped, by info and by copy", async (t) => {
  // The command fails at once, with the escapes on its stderr.
  const command = [
    "[",
    "sh",
    "-c",
    String.raw`printf '\033]0;owned\007\033[2J\302\233' >&2; exit 1`,
    "]",
  ];
  await t.step("info", async () => {
    const r = await runTool("info", ["--no-content", ...command]);
    assert.equal(r.code, 1);
    assertNoRawControls(r);
    assert.ok(
      r.stderr.includes("\\u001b]0;owned\\u0007\\u001b[2J\\u009b"),
      r.stderr,
    );
  });
  await t.step("copy", async () => {
    const r = await runTool("copy", [...command, "null:"]);
    assert.equal(r.code, 1);
    assertNoRawControls(r);
    assert.ok(
      r.stderr.includes("\\u001b]0;owned\\u0007\\u001b[2J\\u009b"),
      r.stderr,
    );
  });
});

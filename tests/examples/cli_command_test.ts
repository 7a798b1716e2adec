import assert from "node:assert/strict";
import { parseArgs, serverCommand, UsageError } from "../../examples/_cli.ts";

const SPECS = [
  { name: "json", kind: "flag" as const },
  { name: "can", kind: "value" as const },
  { name: "cannot", kind: "value" as const },
  { name: "verbose", kind: "flag" as const, short: "v" },
];

Deno.test("parseArgs() takes [ CMD ARGS ... ] as nbdinfo and nbdcopy do", async (t) => {
  await t.step("the command's options stay the command's", () => {
    const r = parseArgs(
      [
        "--json",
        "[",
        "qemu-nbd",
        "-r",
        "-f",
        "qcow2",
        "--json",
        "x",
        "]",
        "-v",
      ],
      SPECS,
    );
    assert.deepEqual(r.positionals, ["[ qemu-nbd -r -f qcow2 --json x ]"]);
    assert.deepEqual(r.commands, [[
      "qemu-nbd",
      "-r",
      "-f",
      "qcow2",
      "--json",
      "x",
    ]]);
    assert.deepEqual([...r.options.keys()], ["json", "verbose"]);
  });
  await t.step("after --, beside ordinary words, and two of them", () => {
    const r = parseArgs(
      [
        "--",
        "[",
        "nbdkit",
        "-s",
        "memory",
        "1G",
        "]",
        "out.raw",
        "[",
        "a",
        "b c",
        "]",
      ],
      SPECS,
    );
    assert.deepEqual(r.positionals, [
      "[ nbdkit -s memory 1G ]",
      "out.raw",
      "[ a b c ]",
    ]);
    assert.deepEqual(r.commands, [["nbdkit", "-s", "memory", "1G"], undefined, [
      "a",
      "b c",
    ]]);
  });
  await t.step("a [ without ], or with nothing inside, is refused", () => {
    assert.throws(
      () => parseArgs(["[", "nbdkit", "memory"], SPECS),
      UsageError,
    );
    assert.throws(() => parseArgs(["[", "]"], SPECS), UsageError);
  });
  await t.step("order: every option as it came", () => {
    const r = parseArgs([
      "--can",
      "trim",
      "-v",
      "--cannot",
      "flush",
      "--can",
      "zero",
    ], SPECS);
    assert.deepEqual(r.order, ["can", "verbose", "cannot", "can"]);
    assert.equal(r.options.get("can"), "zero");
  });
});

Deno.test("serverCommand() starts nbdkit -s over pipes, qemu-nbd and nbdkit on a socket", () => {
  assert.deepEqual(serverCommand(["nbdkit", "-s", "memory", "1G"]).options, {
    command: ["nbdkit", "-s", "memory", "1G"],
  });
  assert.deepEqual(
    serverCommand(["/usr/sbin/nbdkit", "--single", "null"]).options,
    {
      command: ["/usr/sbin/nbdkit", "--single", "null"],
    },
  );
  assert.deepEqual(serverCommand(["nbdkit", "memory", "1G"]).options, {
    command: ["nbdkit", "memory", "1G"],
    socketActivation: true,
  });
  const q = serverCommand(["qemu-nbd", "-r", "-f", "qcow2", "x.qcow2"]);
  assert.deepEqual(q.options, { command: q.argv, socketActivation: true });
  assert.equal(q.text, "[ qemu-nbd -r -f qcow2 x.qcow2 ]");
  // Anything else can only speak over its stdin and stdout.
  assert.deepEqual(
    serverCommand(["chroot", "/r", "nbdkit", "-s", "null"]).options,
    {
      command: ["chroot", "/r", "nbdkit", "-s", "null"],
    },
  );
});

import assert from "node:assert/strict";
import { diedBeforeInit } from "./harness.ts";

Deno.test("diedBeforeInit(): only a kernel that died before init gets a second boot", () => {
  const oops = "[    2.330777] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n" +
    "[    2.331389] RIP: 0010:sched_clock_cpu+0x9/0x1d0\n";
  assert.equal(diedBeforeInit(oops), true);
  assert.equal(
    diedBeforeInit(
      "[    3.1] Kernel panic - not syncing: Attempted to kill init!\n",
    ),
    true,
  );
  // Init ran the command: whatever came after is the test's to report.
  assert.equal(
    diedBeforeInit("kt-init: ready after 7.87s\n[   50.0] Oops: 0000 [#1]\n"),
    false,
  );
  // No crash on the console (a hang, a time-out): not booted again.
  assert.equal(diedBeforeInit("[    1.0] Linux version 6.12\n"), false);
  assert.equal(diedBeforeInit(""), false);
});

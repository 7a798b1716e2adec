/**
 * The netlink path of `ffi/` against a real nbd driver: boots Debian's
 * kernel under qemu (see harness.ts), runs guest_netlink.ts in it, and
 * asserts on what it wrote to the results share. Same packages and rules as
 * kernel_test.ts; it never skips.
 *
 * @module
 */

import { boot, ensurePackages, reportGuest } from "./harness.ts";

/** Every check guest_netlink.ts makes; one missing is a failure too. */
const CHECKS = [
  "family",
  "watch",
  "connect-1",
  "size-1",
  "status-1",
  "wire-capture",
  "io-1",
  "busy-error",
  "disconnect-1",
  "connect-2",
  "io-2",
  "server-two-connections",
  "status-2",
  "disconnect-2",
  "multi-conn-refused",
  "kernel-refusals",
  "persist-connect",
  "persist-link-dead",
  "persist-io-waits",
  "persist-reconfigure",
  "persist-waiting-write",
  "persist-write-after",
  "persist-read-back",
  "persist-disconnect",
  "dead-connect",
  "dead-link-dead",
  "dead-still-connected",
  "dead-io-error",
  "dead-freed",
  "supervised-persist",
  "supervised-no-persist",
  "supervised-external-disconnect",
  "supervised-two-links",
  "outlives-process",
  "read-only",
  "ioctl-detach-of-netlink-device",
  "netlink-disconnect-of-ioctl-device",
  "read-only-sticks",
  "relay",
  "watch-ends",
];

/** Seconds the guest may run; the host allows a little more. */
const GUEST_DEADLINE = 300;

Deno.test({
  name: "the netlink interface drives the Linux nbd driver in a qemu guest",
  async fn(t) {
    await ensurePackages();
    const result = await boot({
      command: "deno run -A tests/kernel/guest_netlink.ts",
      guestDeadline: GUEST_DEADLINE,
      hostTimeout: GUEST_DEADLINE + 30,
    });
    const read = async (name: string) => {
      try {
        return await Deno.readTextFile(`${result.resultsDir}/${name}`);
      } catch {
        return ""; // Reported below with the console log.
      }
    };
    const results = await read("results.txt");
    const timings = await read("timings.txt");
    const captured = await read("capture.txt");
    const lines = new Map<string, string>();
    for (const line of results.split("\n")) {
      const m = /^(ok|FAIL) ([\w-]+): ?(.*)$/.exec(line);
      if (m) lines.set(m[2]!, `${m[1]} ${m[3]}`);
    }
    const tail = result.console.split("\n").slice(-60).join("\n");
    const where =
      `console log: ${result.resultsDir}/console.log; last lines:\n${tail}`;
    console.log(
      `netlink kernel test: ${result.wallMs} ms wall; guest phases (ms): ${
        timings.trim().replaceAll("\n", ", ")
      }\n${results.trim()}\n${captured.trim()}`,
    );
    await reportGuest(t, "guest_netlink.ts", CHECKS, lines, result, where);
  },
});

/**
 * The netlink path of `ffi/` against a real nbd driver: boots Debian's
 * kernel under qemu (see harness.ts), runs guest_netlink.ts in it, and
 * asserts on what it wrote to the results share. Same packages and rules as
 * kernel_test.ts; it never skips.
 *
 * @module
 */

import {
  boot,
  ensurePackages,
  findKernel,
  guestOutput,
  type KernelChoice,
  reportGuest,
} from "./harness.ts";

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
  "persist-two-connect",
  "persist-two-link-dead",
  "persist-two-reconfigure",
  "persist-two-read-back",
  "persist-two-disconnect",
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

// Debian 12's kernel and Debian 13's (6.1 and 6.12), as kernel_test.ts
// boots both.
for (const choice of ["host", "trixie"] as KernelChoice[]) {
  const kernel = await findKernel(choice).catch(() => undefined);
  Deno.test({
    name: `the netlink interface drives the Linux nbd driver in a qemu guest (${
      kernel ? `${kernel.distribution}, ${kernel.version}` : choice
    })`,
    fn: (t) => netlinkRun(t, choice),
  });
}

async function netlinkRun(
  t: Deno.TestContext,
  choice: KernelChoice,
): Promise<void> {
  await ensurePackages();
  const result = await boot({
    kernel: choice,
    command: "deno run -A tests/kernel/guest_netlink.ts",
    guestDeadline: GUEST_DEADLINE,
    hostTimeout: GUEST_DEADLINE + 30,
  });
  const { files, lines, where } = await guestOutput(
    result,
    ["timings.txt", "capture.txt"],
    60,
  );
  const results = files["results.txt"]!;
  const timings = files["timings.txt"]!;
  const captured = files["capture.txt"]!;
  console.log(
    `netlink kernel test: ${result.wallMs} ms wall; guest phases (ms): ${
      timings.trim().replaceAll("\n", ", ")
    }\n${results.trim()}\n${captured.trim()}`,
  );
  await reportGuest(t, "guest_netlink.ts", CHECKS, lines, result, where);
}

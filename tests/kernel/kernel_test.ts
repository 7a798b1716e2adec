/**
 * The kernel handoff against a real nbd driver: boots each Debian kernel
 * under qemu (see harness.ts), the host's (Debian 12, 6.1) and Debian
 * 13's (6.12, from the root .ci/setup makes), once per kernel interface
 * (netlink, the default, and the ioctls of `--no-netlink`), runs guest.sh
 * in it, and asserts on what it wrote to the results share. Needs root-free qemu and the Debian packages
 * qemu-system-x86, linux-image-amd64 and busybox-static; under CI as root
 * it installs them, elsewhere it fails saying how. It never skips.
 *
 * @module
 */

import assert from "node:assert/strict";
import { makeTestPki } from "../support/certs.ts";
import {
  boot,
  ensurePackages,
  findKernel,
  guestOutput,
  type KernelChoice,
  reportGuest,
} from "./harness.ts";

/** Every check guest.sh makes in both modes; one missing is a failure too. */
const CHECKS = [
  "attach",
  "kernel-interface",
  "blkgetsize64",
  "writable",
  "library-probe",
  "busy-error",
  "missing-error",
  "permission-error",
  "list",
  "check-attached",
  "check-free",
  "connections-refused",
  "silent-server",
  "size-error",
  "write",
  "read-back",
  "server-side",
  "mkfs",
  "filesystem",
  "detach",
  "detach-free",
  "detach-client-exits",
  "read-only-export",
  "read-only-option",
  "block-size-option",
  "read-only-write-fails",
  "read-only-read",
  "sigterm",
  "sigint",
  "signal-free",
  "relay-attach",
  "relay-io",
  "relay-disconnect",
  "relay-free",
  "tls-attach",
  "tls-io",
  "tls-sigterm",
  "tls-free",
  "tcp-attach",
  "read-only-reset",
  "dead-io-error",
  "server-killed",
  "server-killed-free",
  "dead-device-no-hang",
  "any-free-device",
  "throughput-1",
];

/** What only the netlink mode checks (guest_netlink_cli.sh). */
const NETLINK_CHECKS = [
  "multi-attach",
  "multi-io",
  "server-two-connections",
  "throughput-2",
  "multi-sigterm",
  "multi-free",
  "persist-attach",
  "persist-before",
  "persist-io-waits",
  "persist-write-after",
  "persist-waiting-write",
  "persist-read-back",
  "persist-client",
  "outlives-process",
  "detach-orphan",
];

type Mode = "netlink" | "ioctl";

/**
 * Seconds the guest may run; the host allows a little more. A netlink run
 * took 170 s on a host at load average 5.
 */
const GUEST_DEADLINE = 420;

for (const choice of ["host", "trixie"] as KernelChoice[]) {
  const kernel = await findKernel(choice).catch(() => undefined);
  for (const mode of ["netlink", "ioctl"] as Mode[]) {
    Deno.test({
      name:
        `attach() drives the Linux nbd driver over ${mode} in a qemu guest (${
          kernel ? `${kernel.distribution}, ${kernel.version}` : choice
        })`,
      // One boot runs every check; the steps only report them.
      fn: (t) => guestRun(t, choice, mode),
    });
  }
}

async function guestRun(
  t: Deno.TestContext,
  choice: KernelChoice,
  mode: Mode,
): Promise<void> {
  await ensurePackages();
  const kernel = await findKernel(choice);
  const resultsDir = await Deno.makeTempDir({
    dir: "/var/tmp",
    prefix: "nbd-kernel-",
  });
  // The guest's nbdkit serves TLS with these; /tmp is hidden in there.
  {
    await using pki = await makeTestPki();
    for (
      const [from, to] of [[pki.serverDir, "server"], [
        pki.clientNoCertDir,
        "client",
      ]]
    ) {
      await Deno.mkdir(`${resultsDir}/pki/${to}`, { recursive: true });
      for await (const e of Deno.readDir(from!)) {
        await Deno.copyFile(
          `${from}/${e.name}`,
          `${resultsDir}/pki/${to}/${e.name}`,
        );
      }
    }
  }
  const result = await boot({
    kernel: choice,
    command: `sh tests/kernel/guest.sh ${mode}`,
    guestDeadline: GUEST_DEADLINE,
    hostTimeout: GUEST_DEADLINE + 30,
    resultsDir,
  });
  const { files, lines, where } = await guestOutput(
    result,
    ["timings.txt", "throughput.txt"],
    80,
  );
  const timings = files["timings.txt"]!;
  const throughput = files["throughput.txt"]!;
  console.log(
    `kernel test (${kernel.version}, ${mode}): ${result.wallMs} ms wall; guest phases (ms): ${
      timings.trim().replaceAll("\n", ", ")
    }${
      throughput.trim().split("\n").filter(Boolean).map((l) =>
        `\nthroughput: ${l}`
      ).join("")
    }`,
  );

  await t.step(`the guest runs ${kernel.version}`, () => {
    assert.ok(
      result.console.includes(`kernel ${kernel.version}`),
      `the guest did not report kernel ${kernel.version}\n${where}`,
    );
  });
  await reportGuest(
    t,
    "guest.sh",
    mode === "netlink" ? [...CHECKS, ...NETLINK_CHECKS] : CHECKS,
    lines,
    result,
    where,
  );
}

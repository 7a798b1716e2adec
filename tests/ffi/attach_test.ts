import assert from "node:assert/strict";
import { attach } from "../../ffi/attach.ts";
import { kernelGeometry } from "../../ffi/_geometry.ts";
import { KERNEL_MAX_BYTES, readSmallFile } from "../../ffi/_kernel.ts";
import { status } from "../../ffi/device.ts";
import { NbdKernelError } from "../../ffi/errors.ts";
import { netlinkAvailable } from "../../ffi/netlink/mod.ts";
import { DEFAULT_BLOCK_SIZE } from "../../lib/export.ts";
import { libc } from "../../ffi/_libc.ts";

// ffi/ opens libc once per process and keeps it (by design): open it
// before any test, so that the resource sanitizer counts it as no test's.
libc();

const MiB = 1024 * 1024;

Deno.test("kernelGeometry() fits an export to the kernel, or says why not", async (t) => {
  const info = (size: bigint, minimum = 1, preferred = 4096) => ({
    size,
    blockSize: { ...DEFAULT_BLOCK_SIZE, minimum, preferred },
  });
  await t.step("whole blocks of the preferred size", () => {
    assert.deepEqual(
      kernelGeometry("/dev/nbd0", info(BigInt(MiB)), 4096, undefined),
      {
        blockSize: 4096,
        blocks: 256n,
        bytes: MiB,
      },
    );
    // A tail shorter than a block is not shown.
    assert.deepEqual(
      kernelGeometry("/dev/nbd0", info(BigInt(MiB + 700)), 4096, 512),
      { blockSize: 512, blocks: 2049n, bytes: MiB + 512 },
    );
  });
  const refusal = (errno: number, message: RegExp) => (e: unknown) =>
    e instanceof NbdKernelError && e.reason === "size" && e.errno === errno &&
    e.device === "/dev/nbd0" && message.test(e.message);
  await t.step("each refusal is an NbdKernelError of reason size", () => {
    assert.throws(
      () => kernelGeometry("/dev/nbd0", info(100n), 4096, undefined),
      refusal(
        0,
        /^Cannot attach to \/dev\/nbd0: the export \(100 bytes\) is smaller than one block of 512 bytes/,
      ),
    );
    assert.throws(
      () =>
        kernelGeometry(
          "/dev/nbd0",
          info(KERNEL_MAX_BYTES + 1n),
          4096,
          undefined,
        ),
      refusal(75, /exceed the kernel's limit of 9223372036854775807/),
    );
    assert.throws(
      () => kernelGeometry("/dev/nbd0", info(2n ** 60n), 4096, undefined),
      refusal(75, /more than this API can report exactly/),
    );
    assert.throws(
      () =>
        kernelGeometry("/dev/nbd0", info(BigInt(MiB), 8192), 4096, undefined),
      refusal(
        0,
        /minimum block size 8192 is larger than the kernel's limit of 4096/,
      ),
    );
    assert.throws(
      () => kernelGeometry("/dev/nbd0", info(BigInt(MiB), 4096), 4096, 512),
      refusal(0, /Block size 512 is below the export's minimum of 4096/),
    );
  });
});

Deno.test("attach() checks its options before touching the device or the network", async () => {
  const target = "nbd+unix:///?socket=/nonexistent/nbd.sock";
  const cases: Array<
    [Record<string, unknown>, typeof TypeError | typeof RangeError, RegExp]
  > = [
    [
      { connectTimeout: 2 ** 31 },
      RangeError,
      /^connectTimeout must be a number of milliseconds from 0 to 2147483647/,
    ],
    [{ startTimeout: -1 }, RangeError, /^startTimeout must be/],
    [
      { readOnly: "yes" },
      TypeError,
      /^readOnly must be true or false, not "yes"$/,
    ],
    [{ relay: 1 }, TypeError, /^relay must be true or false, not 1$/],
    [{ signal: {} }, TypeError, /^attach\(\): signal must be an AbortSignal/],
    [
      { tls: "required" },
      TypeError,
      /^tls must be "disable", "prefer" or "require", not "required"$/,
    ],
    [
      { timeout: 1.5 },
      RangeError,
      /^timeout must be a whole number of seconds/,
    ],
    [
      { connections: 0 },
      RangeError,
      /^connections must be a whole number from 1 to 64, got 0$/,
    ],
    [{ connections: 65 }, RangeError, /^connections must be/],
    [{ connections: 1.5 }, RangeError, /^connections must be/],
    [
      { deadConnectionTimeout: -1 },
      RangeError,
      /^deadConnectionTimeout must be a whole number of seconds, got -1$/,
    ],
    [{ persist: "yes" }, TypeError, /^persist must be true or false/],
    [{ netlink: 0 }, TypeError, /^netlink must be true or false, not 0$/],
    [
      { netlink: false, connections: 2 },
      RangeError,
      /^2 connections needs the kernel's netlink interface, but netlink is false/,
    ],
    [
      { netlink: false, persist: true },
      RangeError,
      /^persist needs the kernel's netlink interface/,
    ],
    [
      { netlink: false, deadConnectionTimeout: 5 },
      RangeError,
      /^deadConnectionTimeout needs the kernel's netlink interface/,
    ],
  ];
  for (const [options, kind, message] of cases) {
    await assert.rejects(
      attach(target, "/dev/nbd15", options),
      (e: unknown) =>
        e instanceof kind && e.constructor === kind && message.test(e.message),
      JSON.stringify(options),
    );
  }
});

Deno.test("attach() and status() choose the kernel interface by what the kernel has", async (t) => {
  const target = "nbd+unix:///?socket=/nonexistent/nbd.sock";
  if (await netlinkAvailable()) {
    await t.step("status() asks the netlink family", async () => {
      for (const d of await status()) {
        assert.equal(d.source, "netlink");
        assert.equal(d.device, `/dev/nbd${d.index}`);
      }
    });
    return;
  }
  await t.step("netlink: true is refused without the family", async () => {
    await assert.rejects(
      attach(target, undefined, { netlink: true }),
      (e: unknown) =>
        e instanceof NbdKernelError && e.reason === "no-module" &&
        /^Cannot attach a free nbd device over netlink: the kernel has no generic netlink family "nbd"/
          .test(e.message),
    );
  });
  await t.step(
    "netlink-only options are refused without the family",
    async () => {
      for (
        const [options, what] of [
          [{ connections: 2 }, "2 connections"],
          [{ persist: true }, "persist"],
          [{ deadConnectionTimeout: 5 }, "deadConnectionTimeout"],
        ] as const
      ) {
        await assert.rejects(
          attach(target, undefined, options),
          (e: unknown) =>
            e instanceof NbdKernelError && e.reason === "no-module" &&
            e.message.startsWith(
              `Cannot attach a free nbd device with ${what}:`,
            ),
          what,
        );
      }
    },
  );
  await t.step("status() falls back to a sysfs scan", async () => {
    const devices = await status();
    for (const d of devices) assert.equal(d.source, "sysfs");
    if (readSmallFile("/sys/block/nbd0/size") === null) {
      assert.deepEqual(devices, []);
      assert.deepEqual(await status("/dev/nbd0"), []);
    }
  });
});

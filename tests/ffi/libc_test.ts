import assert from "node:assert/strict";
import { startDoItWorker } from "../../ffi/ioctl/_do_it_worker.ts";
import { FdStream } from "../../ffi/_fd_stream.ts";
import {
  cString,
  describeErrno,
  E,
  errno,
  F_OK,
  libc,
} from "../../ffi/_libc.ts";
import { socketPair } from "../../ffi/_relay.ts";
import {
  chooseBlockSize,
  deviceName,
  devicePath,
  ioctlName,
  NBD_DO_IT,
  pageSize,
  readSmallFile,
} from "../../ffi/_kernel.ts";
import { readExact, writeAll } from "../support/io.ts";

import { NbdKernelError } from "../../ffi/errors.ts";
import { attach, findFreeDevice, isAttached } from "../../ffi/mod.ts";

// ffi/ opens libc once per process and keeps it (by design): open it
// before any test, so that the resource sanitizer counts it as no test's.
libc();

Deno.test("libc() loads glibc and reads errno after a failed call", () => {
  const c = libc();
  assert.equal(c.access(cString("/nonexistent/nbd-test"), F_OK), -1);
  assert.equal(errno(), E.ENOENT);
  assert.match(describeErrno(E.ENOENT), /^2 \(ENOENT, No such file/);
  assert.ok([4096, 16384, 65536].includes(pageSize()));
});

Deno.test("readSmallFile() reads procfs through libc", () => {
  const text = readSmallFile("/proc/self/stat");
  assert.ok(text !== null && /^\d+ /.test(text));
  assert.equal(readSmallFile("/nonexistent/file"), null);
});

Deno.test("FdStream round-trips bytes over a socketpair", async () => {
  const [a, b] = socketPair();
  const left = new FdStream(a);
  const right = new FdStream(b);
  try {
    const data = new Uint8Array(1024 * 1024);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
    const writing = writeAll(left, data);
    const got = await readExact(right, data.length);
    await writing;
    assert.deepEqual(got, data);
    left.close();
    assert.equal(await right.read(new Uint8Array(8)), null);
  } finally {
    left.close();
    right.close();
  }
});

Deno.test("FdStream close() wakes a pending read", async () => {
  const [a, b] = socketPair();
  const left = new FdStream(a);
  const right = new FdStream(b);
  const reading = right.read(new Uint8Array(16));
  right.close();
  await assert.rejects(reading, /socket is closed/);
  left.close();
});

Deno.test("FdStream release() hands the descriptor over unclosed", () => {
  const [a, b] = socketPair();
  const s = new FdStream(a);
  assert.equal(s.release(), a);
  assert.throws(() => s.release(), /closed/);
  assert.equal(libc().close(a), 0);
  assert.equal(libc().close(b), 0);
});

Deno.test("deviceName() accepts nbd devices only", () => {
  assert.equal(deviceName("/dev/nbd0"), "nbd0");
  assert.equal(deviceName("nbd12"), "nbd12");
  assert.equal(devicePath("nbd3"), "/dev/nbd3");
  assert.throws(() => deviceName("/dev/sda"), TypeError);
  assert.equal(ioctlName(NBD_DO_IT), "NBD_DO_IT");
});

Deno.test("chooseBlockSize() clamps to [512, page] and keeps the export whole", async (t) => {
  const info = (size: bigint, minimum: number, preferred: number) => ({
    size,
    blockSize: { minimum, preferred, maximum: 32 << 20 },
  });
  await t.step("the server's preferred size within range", () => {
    assert.equal(chooseBlockSize(info(1n << 20n, 1, 4096), 4096), 4096);
    assert.equal(chooseBlockSize(info(1n << 20n, 1, 65536), 4096), 4096);
    assert.equal(chooseBlockSize(info(1n << 20n, 1, 1), 4096), 512);
  });
  await t.step("lowered while the size is not a multiple", () => {
    assert.equal(chooseBlockSize(info((1n << 20n) + 512n, 1, 4096), 4096), 512);
    assert.equal(chooseBlockSize(info((1n << 20n) + 1n, 1, 4096), 4096), 512);
  });
  await t.step("never below the server's minimum", () => {
    assert.equal(
      chooseBlockSize(info((1n << 20n) + 1024n, 2048, 4096), 4096),
      2048,
    );
    assert.throws(
      () => chooseBlockSize(info(1n << 20n, 8192, 8192), 4096),
      RangeError,
    );
    assert.throws(
      () => chooseBlockSize(info(1n << 20n, 4096, 4096), 4096, 512),
      /minimum/,
    );
  });
  await t.step("the caller's choice wins", () => {
    assert.equal(chooseBlockSize(info(1n << 20n, 1, 4096), 4096, 1024), 1024);
  });
});

Deno.test("findFreeDevice() and isAttached() say clearly when there is no nbd module", () => {
  let hasNbd = false;
  try {
    hasNbd = readSmallFile("/sys/block/nbd0/size") !== null;
  } catch {
    hasNbd = false;
  }
  if (hasNbd) {
    assert.match(findFreeDevice(), /^\/dev\/nbd\d+$/);
    return;
  }
  assert.throws(
    () => findFreeDevice(),
    (e: unknown) =>
      e instanceof NbdKernelError && e.reason === "no-module" &&
      /modprobe nbd/.test(e.message),
  );
  assert.throws(() => isAttached("/dev/nbd0"), NbdKernelError);
});

Deno.test("the NBD_DO_IT worker starts without read permission and reports errno", async () => {
  const worker = startDoItWorker();
  const messages: unknown[] = [];
  const done = new Promise<void>((resolve) => {
    worker.onmessage = (e) => {
      messages.push(e.data);
      if (e.data.type !== "started") resolve();
    };
  });
  // A socket is no nbd device: the kernel answers ENOTTY.
  const [a, b] = socketPair();
  try {
    worker.postMessage({ fd: a });
    await done;
  } finally {
    worker.terminate();
    libc().close(a);
    libc().close(b);
  }
  assert.equal((messages[0] as { type: string }).type, "started");
  assert.deepEqual(messages[1], {
    type: "returned",
    result: -1,
    errno: E.ENOTTY,
  });
});

Deno.test("NbdKernelError classifies errno and says what to do", async (t) => {
  await t.step("EBUSY is a busy device", () => {
    const e = new NbdKernelError(
      "/dev/nbd0",
      "NBD_SET_SOCK",
      E.EBUSY,
      "Cannot set up /dev/nbd0",
    );
    assert.equal(e.reason, "busy");
    assert.equal(e.errnoName, "EBUSY");
    assert.match(
      e.message,
      /^Cannot set up \/dev\/nbd0: NBD_SET_SOCK failed with 16 \(EBUSY, .*\)\. The device is in use/,
    );
  });
  await t.step("EACCES and EPERM need root", () => {
    for (const errno of [E.EACCES, E.EPERM]) {
      const e = new NbdKernelError(
        "/dev/nbd0",
        "open",
        errno,
        "Cannot open /dev/nbd0",
      );
      assert.equal(e.reason, "permission");
      assert.match(e.message, /needs root \(CAP_SYS_ADMIN\)$/);
    }
  });
  await t.step("ENOENT suggests modprobe nbd", () => {
    const e = new NbdKernelError(
      "/dev/nbd0",
      "",
      E.ENOENT,
      "No such device /dev/nbd0",
    );
    assert.equal(e.reason, "no-module");
    assert.match(
      e.message,
      /^No such device \/dev\/nbd0: 2 \(ENOENT, .*\)\. .*modprobe nbd$/,
    );
  });
});

Deno.test("attach() rejects bad options and a missing device before any traffic", async () => {
  await assert.rejects(
    attach({ path: "/nonexistent.sock" }, "/dev/nbd0", { blockSize: 1000 }),
    RangeError,
  );
  await assert.rejects(
    attach({ path: "/nonexistent.sock" }, "/dev/nbd0", { timeout: -1 }),
    RangeError,
  );
  await assert.rejects(
    attach({ path: "/nonexistent.sock" }, "/dev/sda"),
    TypeError,
  );
  if (readSmallFile("/sys/block/nbd0/size") === null) {
    await assert.rejects(
      attach({ path: "/nonexistent.sock" }, "/dev/nbd0"),
      (e: unknown) => e instanceof NbdKernelError && e.reason === "no-module",
    );
  }
});

Deno.test("NbdKernelError without call or errno is the message alone", () => {
  const e = new NbdKernelError("/dev/nbd0", "", 0, "Too small", "size");
  assert.equal(e.message, "Too small");
  assert.equal(e.errnoName, "unknown");
});

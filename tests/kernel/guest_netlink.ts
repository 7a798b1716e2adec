/**
 * Run in the guest (see netlink_test.ts): the netlink path of `ffi/`
 * against the real nbd driver. nbdkit serves on Unix sockets; each socket
 * is dialled and negotiated by the library over a libc descriptor, as the
 * direct path of attach() does, then handed to the kernel with
 * `NBD_CMD_CONNECT` (one and two sockets), checked with `NBD_CMD_STATUS`,
 * released with `NBD_CMD_DISCONNECT`. Then persist: the server is killed
 * with -9 and started again, `NBD_CMD_LINK_DEAD` arrives, a new socket goes
 * over with `NBD_CMD_RECONFIGURE` and the I/O that waited completes; and
 * without a reconfigure, I/O fails once the dead-connection timeout passes.
 *
 * Every check appends "ok NAME: detail" or "FAIL NAME: detail" to
 * $KT_RESULTS/results.txt and phases their milliseconds to timings.txt.
 *
 * Usage: deno run -A tests/kernel/guest_netlink.ts
 *
 * @module
 */

import {
  FLAG_CAN_MULTI_CONN,
  FLAG_HAS_FLAGS,
  FLAG_READ_ONLY,
} from "../../lib/constants.ts";
import type { ExportInfo } from "../../lib/export.ts";
import { negotiate } from "../../lib/_handshake.ts";
import { Transport } from "../../lib/transport.ts";
import { FdStream } from "../../ffi/_fd_stream.ts";
import {
  chooseBlockSize,
  openDeviceAsync,
  pageSize,
  setReadOnly,
} from "../../ffi/_kernel.ts";
import { libc } from "../../ffi/_libc.ts";
import { GenlSocket, resolveFamily } from "../../ffi/netlink/_socket.ts";
import {
  encodeGetFamily,
  type NetlinkMessage,
} from "../../ffi/netlink/_genl.ts";
import {
  encodeNbd,
  NBD_CMD_CONNECT,
  NBD_CMD_STATUS,
} from "../../ffi/netlink/_family.ts";
import { socketPair, startRelay } from "../../ffi/_relay.ts";
import { connectSocket } from "../../ffi/_socket.ts";
import { NbdKernelError } from "../../ffi/errors.ts";
import {
  connectDevice,
  type ConnectDeviceOptions,
  deviceStatus,
  disconnectDevice,
  type LinkDeadWatch,
  netlinkAvailable,
  reconfigureDevice,
  watchLinkDead,
} from "../../ffi/netlink/mod.ts";
import { superviseDevice } from "../../ffi/netlink/_supervisor.ts";
import { attach, detach } from "../../ffi/mod.ts";
import { until, within } from "../support/wait.ts";

const R = Deno.env.get("KT_RESULTS") ?? "/tmp/kt-results";
const W = "/tmp/ktn";
const MiB = 1 << 20;
await Deno.mkdir(W, { recursive: true });
await Deno.mkdir(R, { recursive: true });
await Deno.writeTextFile(`${R}/results.txt`, "");
await Deno.writeTextFile(`${R}/timings.txt`, "");
await Deno.writeTextFile(`${R}/capture.txt`, "");

const t0 = performance.now();
let phaseStart = t0;
async function phase(name: string): Promise<void> {
  const now = performance.now();
  await Deno.writeTextFile(
    `${R}/timings.txt`,
    `${name} ${Math.round(now - phaseStart)}\n`,
    { append: true },
  );
  phaseStart = now;
}

const oneLine = (s: string) => s.replaceAll("\n", " ").slice(0, 400);
async function report(ok: boolean, name: string, detail: string) {
  const line = `${ok ? "ok" : "FAIL"} ${name}: ${oneLine(detail)}`;
  console.log(`ktn: ${line}`);
  await Deno.writeTextFile(`${R}/results.txt`, line + "\n", { append: true });
}

/** Runs one check; a throw is its failure, with the error as detail. */
async function check(
  name: string,
  fn: () => Promise<string> | string,
): Promise<boolean> {
  try {
    await report(true, name, await fn());
    return true;
  } catch (e) {
    await report(false, name, e instanceof Error ? e.message : String(e));
    return false;
  }
}

function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new Error(message);
}

const text = (b: Uint8Array) => new TextDecoder().decode(b).trim();

async function run(
  cmd: string,
  args: string[],
): Promise<{ ok: boolean; err: string; ms: number }> {
  const started = performance.now();
  const r = await new Deno.Command(cmd, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  return {
    ok: r.success,
    err: text(r.stderr) || text(r.stdout),
    ms: Math.round(performance.now() - started),
  };
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch {
    return false;
  }
}

// --- servers ---------------------------------------------------------------

const sock = (name: string) => `${W}/${name}.sock`;

async function startServer(name: string, ...args: string[]): Promise<void> {
  await Deno.remove(sock(name)).catch(() => {});
  const r = await run("nbdkit", [
    "-U",
    sock(name),
    "-P",
    `${W}/${name}.pid`,
    ...args,
  ]);
  assert(r.ok, `nbdkit ${name} did not start: ${r.err}`);
  await until(`the socket of ${name}`, () => exists(sock(name)), 20_000);
}

async function serverPid(name: string): Promise<number> {
  return Number((await Deno.readTextFile(`${W}/${name}.pid`)).trim());
}

async function killServer(name: string, signal: Deno.Signal): Promise<void> {
  const pid = await serverPid(name);
  try {
    Deno.kill(pid, signal);
  } catch {
    return;
  }
  await until(`nbdkit ${name} to exit`, () => !pidAlive(pid), 20_000);
}

function pidAlive(pid: number): boolean {
  try {
    Deno.kill(pid, "SIGCONT");
    return true;
  } catch {
    return false;
  }
}

/** Connections the log filter saw, and which of them carried writes. */
async function logConnections(
  name: string,
): Promise<{ connections: Set<string>; writers: Set<string> }> {
  const log = await Deno.readTextFile(`${W}/${name}.log`);
  const connections = new Set<string>();
  const writers = new Set<string>();
  for (const line of log.split("\n")) {
    const m = /connection=(\d+) (Connect|Write)/.exec(line);
    if (m?.[2] === "Connect") connections.add(m[1]!);
    if (m?.[2] === "Write") writers.add(m[1]!);
  }
  return { connections, writers };
}

// --- the library's side: dial and negotiate for the kernel -----------------

/** One socket negotiated as attach()'s direct path does. */
async function dial(name: string): Promise<{ fd: number; info: ExportInfo }> {
  const fd = await connectSocket({ path: sock(name) });
  const stream = new FdStream(fd);
  const transport = new Transport(stream);
  try {
    const info = await within(
      30_000,
      `negotiating with ${name}`,
      negotiate(transport, {
        exportName: "",
        tls: "disable",
        structuredReplies: false,
        extendedHeaders: false,
        metaContexts: [],
        blockSizes: true,
      }),
    );
    assert(transport.buffered === 0, "the server sent bytes ahead");
    return { fd: stream.release(), info };
  } catch (e) {
    transport.close();
    throw e;
  }
}

function closeAll(fds: number[]): void {
  for (const fd of fds) libc().close(fd);
}

/** Dials `count` sockets and hands them to the kernel. */
async function connectServer(
  name: string,
  count: number,
  extra: Partial<ConnectDeviceOptions> = {},
): Promise<{ index: number; info: ExportInfo; size: number; ms: number }> {
  const started = performance.now();
  const fds: number[] = [];
  try {
    let info: ExportInfo | undefined;
    for (let i = 0; i < count; i++) {
      const d = await dial(name);
      fds.push(d.fd);
      info = d.info;
    }
    assert(info, "no connection");
    const blockSize = chooseBlockSize(info, pageSize());
    const size = (info.size / BigInt(blockSize)) * BigInt(blockSize);
    const index = await connectDevice({
      sockets: fds,
      size,
      blockSize,
      serverFlags: FLAG_HAS_FLAGS | info.flags,
      timeout: 60,
      ...extra,
    });
    return {
      index,
      info,
      size: Number(size),
      ms: Math.round(performance.now() - started),
    };
  } finally {
    // The kernel holds its own references once connected.
    closeAll(fds);
  }
}

const attached = (i: number) => exists(`/sys/block/nbd${i}/pid`);

async function connectedInStatus(index: number): Promise<boolean> {
  const list = await deviceStatus(index);
  assert(list.length === 1, `status of ${index}: ${JSON.stringify(list)}`);
  return list[0]!.connected;
}

async function waitFreed(index: number): Promise<number> {
  const started = performance.now();
  await until(
    `nbd${index} to be freed`,
    async () => !await attached(index) && !await connectedInStatus(index),
    20_000,
  );
  return Math.round(performance.now() - started);
}

async function blockdev(flag: string, index: number): Promise<string> {
  const r = await new Deno.Command("blockdev", {
    args: [flag, `/dev/nbd${index}`],
    stdout: "piped",
    stderr: "piped",
  }).output();
  return text(r.stdout) || text(r.stderr);
}

/** dd with a bound; `seek`/`skip` in MiB. */
function dd(args: string[], seconds = 90) {
  return run("timeout", [String(seconds), "dd", "bs=1M", ...args]);
}

async function writeAt(
  file: string,
  index: number,
  mib: number,
  count: number,
  seconds = 90,
) {
  return await dd(
    [
      `if=${file}`,
      `of=/dev/nbd${index}`,
      `seek=${mib}`,
      `count=${count}`,
      "oflag=direct",
      "conv=fsync",
      "status=none",
    ],
    seconds,
  );
}

async function readBack(
  index: number,
  mib: number,
  count: number,
): Promise<Uint8Array> {
  const out = `${W}/back-${index}-${mib}`;
  const r = await dd([
    `if=/dev/nbd${index}`,
    `of=${out}`,
    `skip=${mib}`,
    `count=${count}`,
    "iflag=direct",
    "status=none",
  ]);
  assert(r.ok, `reading nbd${index}: ${r.err}`);
  return await Deno.readFile(out);
}

function equal(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

async function pattern(name: string, mib: number): Promise<Uint8Array> {
  const bytes = new Uint8Array(mib * MiB);
  for (let at = 0; at < bytes.length; at += 65536) {
    crypto.getRandomValues(bytes.subarray(at, at + 65536));
  }
  await Deno.writeFile(`${W}/${name}`, bytes);
  return bytes;
}

// --- link-dead notifications, read by one loop ------------------------------

const dead: { index: number; at: number }[] = [];
let watch: LinkDeadWatch | undefined;
let watching: Promise<void> = Promise.resolve();

async function waitDead(index: number, since: number): Promise<number> {
  await until(
    `NBD_CMD_LINK_DEAD for nbd${index}`,
    () => dead.some((d) => d.index === index && d.at >= since),
    20_000,
  );
  const d = dead.find((d) => d.index === index && d.at >= since)!;
  return Math.round(d.at - since);
}

// --- raw messages, for the golden bytes of the host's wire tests -----------

const hexOf = (b: Uint8Array) =>
  Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");

/** A parsed message framed again, as it came off the socket. */
function raw(m: NetlinkMessage): string {
  const out = new Uint8Array(16 + m.payload.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, out.length, true);
  view.setUint16(4, m.type, true);
  view.setUint16(6, m.flags, true);
  view.setUint32(8, m.seq, true);
  view.setUint32(12, m.pid, true);
  out.set(m.payload, 16);
  return hexOf(out);
}

async function capture(label: string, hex: string): Promise<void> {
  await Deno.writeTextFile(`${R}/capture.txt`, `${label} ${hex}\n`, {
    append: true,
  });
}

// --- the checks ---------------------------------------------------------------

console.log(`ktn: kernel ${
  text(
    (await new Deno.Command("uname", { args: ["-r"], stdout: "piped" })
      .output()).stdout,
  )
}`);

await check("family", async () => {
  assert(await netlinkAvailable(), "netlinkAvailable() is false");
  const all = await deviceStatus();
  assert(all.length >= 6, `status lists ${all.length} devices`);
  assert(
    all.every((d) => !d.connected),
    `not all free: ${JSON.stringify(all)}`,
  );
  return `the nbd family resolves; NBD_CMD_STATUS lists ${all.length} devices, all free`;
});

await check("watch", async () => {
  watch = await watchLinkDead();
  const w = watch;
  watching = (async () => {
    for await (const index of w) dead.push({ index, at: performance.now() });
  })();
  return "joined nbd_mc_group";
});

await startServer(
  "one",
  "--filter=log",
  "memory",
  "size=64M",
  `logfile=${W}/one.log`,
);
await startServer(
  "two",
  "--filter=log",
  "memory",
  "size=64M",
  `logfile=${W}/two.log`,
);
await startServer(
  "single",
  "--filter=multi-conn",
  "memory",
  "size=16M",
  "multi-conn-mode=disable",
);
const data = await pattern("pattern", 8);
await phase("setup");

// --- one connection ---------------------------------------------------------
let one: Awaited<ReturnType<typeof connectServer>> | undefined;
await check("connect-1", async () => {
  one = await connectServer("one", 1, { index: 0 });
  assert(one.index === 0, `index ${one.index}, asked for 0`);
  assert(await attached(0), "no /sys/block/nbd0/pid");
  const pid = (await Deno.readTextFile("/sys/block/nbd0/pid")).trim();
  return `nbd0 up in ${one.ms} ms; pid file ${pid} (this process ${Deno.pid})`;
});
await check("size-1", async () => {
  const size = await blockdev("--getsize64", 0);
  assert(size === String(64 * MiB), `BLKGETSIZE64 ${size}`);
  return `BLKGETSIZE64 ${size}, logical block ${await blockdev("--getss", 0)}`;
});
await check("status-1", async () => {
  const all = await deviceStatus();
  const mine = all.find((d) => d.index === 0);
  assert(mine?.connected === true, `nbd0: ${JSON.stringify(mine)}`);
  assert(
    all.filter((d) => d.connected).length === 1,
    `connected: ${JSON.stringify(all.filter((d) => d.connected))}`,
  );
  return "NBD_CMD_STATUS: nbd0 connected, the others free";
});
await check("wire-capture", async () => {
  const socket = GenlSocket.open();
  // Not "two": its log must show exactly the connections of connect-2.
  const { fd } = await dial("single");
  try {
    let seq = socket.nextSeq();
    const [family] = await socket.request(
      encodeGetFamily(seq, "nbd"),
      seq,
      "CTRL_CMD_GETFAMILY",
      "",
      "capture",
    );
    assert(family, "no family reply");
    await capture("getfamily-reply", raw(family));
    const id = (await resolveFamily(socket))!.id;
    seq = socket.nextSeq();
    const [status] = await socket.request(
      encodeNbd(id, seq, NBD_CMD_STATUS, { index: 0 }),
      seq,
      "NBD_CMD_STATUS",
      "",
      "capture",
    );
    assert(status, "no status reply");
    await capture("status-reply-0", raw(status));
    seq = socket.nextSeq();
    const [connect] = await socket.request(
      encodeNbd(id, seq, NBD_CMD_CONNECT, {
        index: 4,
        sockets: [fd],
        size: 16n * BigInt(MiB),
        blockSize: 4096,
        serverFlags: FLAG_HAS_FLAGS,
      }),
      seq,
      "NBD_CMD_CONNECT",
      "",
      "capture",
    );
    assert(connect, "no connect reply");
    await capture("connect-reply-4", raw(connect));
    seq = socket.nextSeq();
    const [all] = await socket.request(
      encodeNbd(id, seq, NBD_CMD_STATUS, {}),
      seq,
      "NBD_CMD_STATUS",
      "",
      "capture",
    );
    assert(all, "no status reply");
    await capture("status-reply-all", raw(all));
    await disconnectDevice(4);
    await waitFreed(4);
    return "GETFAMILY, STATUS and CONNECT replies captured";
  } finally {
    socket.close();
    closeAll([fd]);
  }
});
await check("io-1", async () => {
  const w = await writeAt(`${W}/pattern`, 0, 0, 8);
  assert(w.ok, `dd write: ${w.err}`);
  const back = await readBack(0, 0, 8);
  assert(equal(back, data), "8 MiB read back differ");
  return `8 MiB written (${w.ms} ms) and read back equal`;
});
await check("busy-error", async () => {
  const { fd } = await dial("one");
  try {
    await connectDevice({
      index: 0,
      sockets: [fd],
      size: 64 * MiB,
      blockSize: 512,
      serverFlags: FLAG_HAS_FLAGS,
    });
    throw new Error("connected a busy device");
  } catch (e) {
    assert(
      e instanceof NbdKernelError && e.reason === "busy" && e.errno === 16,
      `unexpected: ${e}`,
    );
    return e.message;
  } finally {
    closeAll([fd]);
  }
});
await check("disconnect-1", async () => {
  const started = performance.now();
  await disconnectDevice(0);
  const ms = Math.round(performance.now() - started);
  const freed = await waitFreed(0);
  return `NBD_CMD_DISCONNECT ${ms} ms, freed ${freed} ms later`;
});
await phase("one-connection");

// --- two connections, any free device ---------------------------------------
let two: Awaited<ReturnType<typeof connectServer>> | undefined;
await check("connect-2", async () => {
  two = await connectServer("two", 2);
  assert(
    (two.info.flags & FLAG_CAN_MULTI_CONN) !== 0,
    "no NBD_FLAG_CAN_MULTI_CONN",
  );
  assert(await attached(two.index), `no pid file for nbd${two.index}`);
  const queues = [...Deno.readDirSync(`/sys/block/nbd${two.index}/mq`)].length;
  assert(queues === 2, `${queues} hardware queues`);
  return `any free device: nbd${two.index}, 2 sockets, 2 hardware queues, ${two.ms} ms`;
});
await check("io-2", async () => {
  assert(two, "not connected");
  // blk-mq picks the hardware queue, so the connection, by the submitting
  // CPU: one writer pinned to each CPU uses both connections.
  await Deno.writeFile(`${W}/half-0`, data.subarray(0, 4 * MiB));
  await Deno.writeFile(`${W}/half-1`, data.subarray(4 * MiB));
  const halves = await Promise.all([0, 1].map((cpu) =>
    run("taskset", [
      "-c",
      String(cpu),
      "timeout",
      "90",
      "dd",
      "bs=1M",
      `if=${W}/half-${cpu}`,
      `of=/dev/nbd${two!.index}`,
      `seek=${4 * cpu}`,
      "count=4",
      "oflag=direct",
      "conv=fsync",
      "status=none",
    ])
  ));
  for (const h of halves) assert(h.ok, `dd write: ${h.err}`);
  const back = await readBack(two.index, 0, 8);
  assert(equal(back, data), "8 MiB read back differ");
  return `8 MiB written by two writers, one per CPU (${
    halves.map((h) => h.ms).join(", ")
  } ms), and read back equal`;
});
await check("server-two-connections", async () => {
  const { connections, writers } = await logConnections("two");
  assert(connections.size === 2, `${connections.size} connections`);
  assert(writers.size === 2, `writes came on ${[...writers]}`);
  return `nbdkit saw connections ${[...connections]}, writes on both`;
});
await check("status-2", async () => {
  assert(two, "not connected");
  assert(await connectedInStatus(two.index), "not connected in status");
  return `nbd${two.index} connected`;
});
await check("disconnect-2", async () => {
  assert(two, "not connected");
  await disconnectDevice(two.index);
  return `freed ${await waitFreed(two.index)} ms after NBD_CMD_DISCONNECT`;
});
await phase("two-connections");

await check("multi-conn-refused", async () => {
  const a = await dial("single");
  const b = await dial("single");
  try {
    assert((a.info.flags & FLAG_CAN_MULTI_CONN) === 0, "multi-conn offered");
    await connectDevice({
      sockets: [a.fd, b.fd],
      size: a.info.size,
      blockSize: 512,
      serverFlags: FLAG_HAS_FLAGS | a.info.flags,
    });
    throw new Error("connected two sockets without multi-conn");
  } catch (e) {
    assert(
      e instanceof NbdKernelError && /NBD_FLAG_CAN_MULTI_CONN/.test(e.message),
      `unexpected: ${e}`,
    );
    return e.message;
  } finally {
    closeAll([a.fd, b.fd]);
  }
});
await check("kernel-refusals", async () => {
  const out: string[] = [];
  try {
    await reconfigureDevice(5, {});
    throw new Error("reconfigured a free device");
  } catch (e) {
    assert(e instanceof NbdKernelError && e.errno === 22, `reconfigure: ${e}`);
    out.push(e.message);
  }
  try {
    await disconnectDevice(200);
    throw new Error("disconnected a missing device");
  } catch (e) {
    assert(e instanceof NbdKernelError && e.errno === 22, `disconnect: ${e}`);
    out.push(e.message);
  }
  const none = await deviceStatus(200);
  assert(none.length === 0, `status of 200: ${JSON.stringify(none)}`);
  return out.join(" | ");
});

// Throughput with 1 and 2 connections is measured through the command
// line, on both kernels (guest_netlink_cli.sh).

// --- persist: kill -9, restart, reconfigure ---------------------------------
const disk = `${W}/disk.img`;
{
  const f = await Deno.open(disk, { create: true, write: true });
  await f.truncate(64 * MiB);
  f.close();
}
await startServer("p", "file", disk);
const before = data.subarray(0, 4 * MiB);
const during = data.subarray(4 * MiB, 8 * MiB);
const after = await pattern("after", 4);
await Deno.writeFile(`${W}/before`, before);
await Deno.writeFile(`${W}/during`, during);
let persist: Awaited<ReturnType<typeof connectServer>> | undefined;
await check("persist-connect", async () => {
  persist = await connectServer("p", 1, {
    index: 1,
    deadConnectionTimeout: 60,
  });
  const w = await writeAt(`${W}/before`, 1, 0, 4);
  assert(w.ok, `dd write: ${w.err}`);
  return `nbd1 up, 4 MiB written before the kill`;
});
let pending: Promise<{ ok: boolean; err: string; ms: number }> | undefined;
let pendingDone = false;
await check("persist-link-dead", async () => {
  const since = performance.now();
  await killServer("p", "SIGKILL");
  const ms = await waitDead(1, since);
  return `NBD_CMD_LINK_DEAD for nbd1 ${ms} ms after kill -9`;
});
await check("persist-io-waits", async () => {
  // Issued while the server is down: the kernel holds it.
  pending = writeAt(`${W}/during`, 1, 4, 4, 120);
  void pending.then(() => pendingDone = true);
  await new Promise((r) => setTimeout(r, 2000));
  assert(!pendingDone, "the write finished while the server was down");
  assert(await connectedInStatus(1), "nbd1 not connected in status");
  return "a write issued with the server down is still waiting after 2 s; nbd1 stays connected";
});
await check("persist-reconfigure", async () => {
  const started = performance.now();
  await startServer("p", "file", disk);
  const { fd, info } = await dial("p");
  try {
    assert(persist, "not connected");
    assert(info.size === persist.info.size, `size changed: ${info.size}`);
    await reconfigureDevice(1, { sockets: [fd] });
  } finally {
    closeAll([fd]);
  }
  return `server restarted, new socket negotiated and handed over in ${
    Math.round(performance.now() - started)
  } ms`;
});
await check("persist-waiting-write", async () => {
  assert(pending, "no pending write");
  const r = await within(120_000, "the waiting write", pending);
  assert(r.ok, `dd: ${r.err}`);
  return `the write issued while down completed (${r.ms} ms from issue)`;
});
await check("persist-write-after", async () => {
  await Deno.writeFile(`${W}/after`, after);
  const w = await writeAt(`${W}/after`, 1, 8, 4);
  assert(w.ok, `dd write: ${w.err}`);
  return `4 MiB written after the restart in ${w.ms} ms`;
});
await check("persist-read-back", async () => {
  const back = await readBack(1, 0, 12);
  assert(equal(back.subarray(0, 4 * MiB), before), "before differs");
  assert(equal(back.subarray(4 * MiB, 8 * MiB), during), "during differs");
  assert(equal(back.subarray(8 * MiB), after), "after differs");
  const file = await Deno.readFile(disk);
  assert(equal(file.subarray(0, 4 * MiB), before), "server file: before");
  assert(equal(file.subarray(4 * MiB, 8 * MiB), during), "server file: during");
  assert(equal(file.subarray(8 * MiB, 12 * MiB), after), "server file: after");
  return "12 MiB from before, during and after the restart read back equal, on the device and in the server's file";
});
await check("persist-disconnect", async () => {
  await disconnectDevice(1);
  return `freed ${await waitFreed(1)} ms after NBD_CMD_DISCONNECT`;
});
await phase("persist");

// --- persist over two connections: both die, both are replaced -------------
const diskTwo = `${W}/disk-two.img`;
{
  const f = await Deno.open(diskTwo, { create: true, write: true });
  await f.truncate(64 * MiB);
  f.close();
}
await startServer("p2", "file", diskTwo);
let pendingTwo: Promise<{ ok: boolean; err: string; ms: number }> | undefined;
await check("persist-two-connect", async () => {
  const c = await connectServer("p2", 2, {
    index: 3,
    deadConnectionTimeout: 60,
  });
  assert(c.index === 3, `connected nbd${c.index}`);
  const w = await writeAt(`${W}/before`, 3, 0, 4);
  assert(w.ok, `dd write: ${w.err}`);
  return "nbd3 up over 2 connections, 4 MiB written before the kill";
});
await check("persist-two-link-dead", async () => {
  const since = performance.now();
  await killServer("p2", "SIGKILL");
  await until(
    "NBD_CMD_LINK_DEAD for both links of nbd3",
    () => dead.filter((d) => d.index === 3 && d.at >= since).length >= 2,
    20_000,
  );
  let done = false;
  pendingTwo = writeAt(`${W}/during`, 3, 4, 4, 120);
  void pendingTwo.then(() => done = true);
  await new Promise((r) => setTimeout(r, 1000));
  assert(!done, "the write finished while the server was down");
  assert(await connectedInStatus(3), "nbd3 not connected in status");
  return "both links reported dead; nbd3 stays connected, a write issued then still waits after 1 s";
});
await check("persist-two-reconfigure", async () => {
  const started = performance.now();
  await startServer("p2", "file", diskTwo);
  const a = await dial("p2");
  const b = await dial("p2");
  try {
    await reconfigureDevice(3, { sockets: [a.fd, b.fd] });
  } finally {
    closeAll([a.fd, b.fd]);
  }
  assert(pendingTwo, "no pending write");
  const r = await within(120_000, "the waiting write", pendingTwo);
  assert(r.ok, `dd: ${r.err}`);
  return `two new sockets handed over in ${
    Math.round(performance.now() - started)
  } ms; the write issued while down completed`;
});
await check("persist-two-read-back", async () => {
  const back = await readBack(3, 0, 8);
  assert(equal(back.subarray(0, 4 * MiB), before), "before differs");
  assert(equal(back.subarray(4 * MiB, 8 * MiB), during), "during differs");
  const file = await Deno.readFile(diskTwo);
  assert(equal(file.subarray(0, 8 * MiB), back), "the server's file differs");
  return "8 MiB from before and during the restart read back equal, on the device and in the server's file";
});
await check("persist-two-disconnect", async () => {
  await disconnectDevice(3);
  return `freed ${await waitFreed(3)} ms after NBD_CMD_DISCONNECT`;
});
await phase("persist-two");

// --- no reconfigure: I/O fails once the dead-connection timeout passes -------
const DEAD_TIMEOUT = 5;
await startServer("np", "memory", "size=16M");
await check("dead-connect", async () => {
  const c = await connectServer("np", 1, {
    index: 2,
    deadConnectionTimeout: DEAD_TIMEOUT,
  });
  const r = await readBack(c.index, 0, 1);
  assert(r.length === MiB, "short read");
  return `nbd2 up with a ${DEAD_TIMEOUT} s dead-connection timeout`;
});
await check("dead-link-dead", async () => {
  const listener = GenlSocket.open();
  try {
    const family = (await resolveFamily(listener))!;
    listener.join(family.groups.get("nbd_mc_group")!, "nbd_mc_group");
    const since = performance.now();
    await killServer("np", "SIGKILL");
    const ms = await waitDead(2, since);
    const datagram = await listener.receive(
      performance.now() + 5000,
      undefined,
      "capture",
    );
    if (datagram) await capture("link-dead-2", hexOf(datagram));
    return `LINK_DEAD ${ms} ms after kill -9`;
  } finally {
    listener.close();
  }
});
await check("dead-still-connected", async () => {
  assert(await connectedInStatus(2), "not connected");
  assert(await attached(2), "no pid file");
  return "without a disconnect the kernel keeps nbd2 connected";
});
await check("dead-io-error", async () => {
  const r = await dd([
    "if=/dev/nbd2",
    "of=/dev/null",
    "count=1",
    "iflag=direct",
    "status=none",
  ], 60);
  assert(!r.ok, "the read succeeded");
  assert(
    r.ms >= (DEAD_TIMEOUT - 1) * 1000 && r.ms <= (DEAD_TIMEOUT + 15) * 1000,
    `failed after ${r.ms} ms`,
  );
  return `read failed after ${r.ms} ms: ${r.err}`;
});
await check("dead-freed", async () => {
  await disconnectDevice(2);
  const ms = await waitFreed(2);
  const r = await dd(
    ["if=/dev/nbd2", "of=/dev/null", "count=1", "status=none"],
    20,
  );
  assert(r.ms < 19_000, "reading the freed device hangs");
  return `freed ${ms} ms after NBD_CMD_DISCONNECT; a read then returns at once (${r.ms} ms)`;
});
await phase("dead");

// --- the supervisor: persist, no persist, a disconnect from elsewhere -------
const disk2 = `${W}/disk2.img`;
{
  const f = await Deno.open(disk2, { create: true, write: true });
  await f.truncate(16 * MiB);
  f.close();
}
await startServer("sp", "file", disk2);
await Deno.writeFile(`${W}/one-a`, data.subarray(0, MiB));
await Deno.writeFile(`${W}/one-b`, data.subarray(MiB, 2 * MiB));
await check("supervised-persist", async () => {
  const w = await watchLinkDead();
  const c = await connectServer("sp", 1, {
    index: 5,
    deadConnectionTimeout: 30,
  });
  const events: string[] = [];
  const supervised = superviseDevice({
    index: c.index,
    watch: w,
    redial: async () => {
      const d = await dial("sp");
      if (d.info.size !== c.info.size) {
        closeAll([d.fd]);
        throw new Error(`the export's size changed to ${d.info.size}`);
      }
      return d.fd;
    },
    debug: (event) => void events.push(event),
  });
  const a = await writeAt(`${W}/one-a`, 5, 0, 1);
  assert(a.ok, `write before: ${a.err}`);
  await killServer("sp", "SIGKILL");
  const down = performance.now();
  const b = writeAt(`${W}/one-b`, 5, 1, 1, 60);
  await new Promise((r) => setTimeout(r, 1500));
  await startServer("sp", "file", disk2);
  const rb = await within(60_000, "the write during the restart", b);
  assert(rb.ok, `write during the restart: ${rb.err}`);
  const waited = Math.round(performance.now() - down);
  await until("the reconnect count", () => supervised.reconnects === 1, 5000);
  const back = await readBack(5, 0, 2);
  assert(equal(back, data.subarray(0, 2 * MiB)), "2 MiB read back differ");
  const release = await supervised.disconnect();
  assert(
    release.reason === "disconnect" && release.requested,
    `release: ${JSON.stringify(release)}`,
  );
  assert(!await attached(5), "nbd5 still attached");
  return `killed and restarted: reconfigured after ${waited} ms, data before and during read back; ${
    [...new Set(events)].join(",")
  }; ${release.message}`;
});
await startServer("sn", "memory", "size=16M");
await check("supervised-no-persist", async () => {
  const w = await watchLinkDead();
  const c = await connectServer("sn", 1, {
    index: 5,
    deadConnectionTimeout: 30,
  });
  const supervised = superviseDevice({ index: c.index, watch: w });
  const since = performance.now();
  await killServer("sn", "SIGKILL");
  const release = await within(20_000, "the release", supervised.closed);
  const ms = Math.round(performance.now() - since);
  assert(
    release.reason === "lost" && !release.requested,
    `release: ${JSON.stringify(release)}`,
  );
  await waitFreed(5);
  const r = await dd([
    "if=/dev/nbd5",
    "of=/dev/null",
    "count=1",
    "iflag=direct",
    "status=none",
  ], 60);
  assert(r.ms < 5000, `a read took ${r.ms} ms`);
  return `released ${ms} ms after kill -9 (${release.message}); nbd5 free, a read returns in ${r.ms} ms`;
});
await startServer("sn", "memory", "size=16M");
await check("supervised-external-disconnect", async () => {
  const w = await watchLinkDead();
  const c = await connectServer("sn", 1, { index: 5 });
  const supervised = superviseDevice({ index: c.index, watch: w });
  await disconnectDevice(5);
  const release = await within(10_000, "the release", supervised.closed);
  assert(
    release.reason === "lost" && /another process/.test(release.message),
    `release: ${JSON.stringify(release)}`,
  );
  return release.message;
});
await check("supervised-two-links", async () => {
  // Two server processes on one file stand in for one server whose
  // connections can die one at a time.
  const disk3 = `${W}/disk3.img`;
  const f = await Deno.open(disk3, { create: true, write: true });
  await f.truncate(16 * MiB);
  f.close();
  await startServer("fa", "file", disk3);
  await startServer("fb", "file", disk3);
  const w = await watchLinkDead();
  const a = await dial("fa");
  const b = await dial("fb");
  try {
    await connectDevice({
      index: 5,
      sockets: [a.fd, b.fd],
      size: a.info.size,
      blockSize: 4096,
      serverFlags: FLAG_HAS_FLAGS | a.info.flags,
    });
  } finally {
    closeAll([a.fd, b.fd]);
  }
  const supervised = superviseDevice({ index: 5, watch: w, connections: 2 });
  let released = false;
  void supervised.closed.then(() => released = true);
  const since = performance.now();
  await killServer("fa", "SIGKILL");
  await waitDead(5, since);
  await new Promise((r) => setTimeout(r, 1000));
  assert(!released && await attached(5), "released after one dead link");
  const wr = await writeAt(`${W}/one-a`, 5, 0, 1, 30);
  assert(wr.ok, `write over the live link: ${wr.err}`);
  const back = await readBack(5, 0, 1);
  assert(equal(back, data.subarray(0, MiB)), "1 MiB read back differs");
  await killServer("fb", "SIGKILL");
  const release = await within(20_000, "the release", supervised.closed);
  assert(release.reason === "lost", `release: ${JSON.stringify(release)}`);
  await waitFreed(5);
  return `one of two links dead: the device stays and I/O goes over the other; both dead: ${release.message}`;
});
await phase("supervisor");

await startServer("orphan", "memory", "size=16M");
await check("outlives-process", async () => {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      "tests/kernel/guest_netlink_child.ts",
      sock("orphan"),
      "4",
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let said = "";
  try {
    await within(
      60_000,
      "the child's device",
      (async () => {
        while (!said.includes("up")) {
          const { value, done } = await reader.read();
          if (done) throw new Error(`the child exited: ${said}`);
          said += value;
        }
      })(),
    );
  } finally {
    reader.releaseLock();
  }
  child.kill("SIGKILL");
  const status = await child.status;
  await child.stdout.cancel().catch(() => {});
  await child.stderr.cancel().catch(() => {});
  assert(status.signal === "SIGKILL", `child: ${JSON.stringify(status)}`);
  assert(await attached(4), "nbd4 went with the process");
  assert(await connectedInStatus(4), "nbd4 not connected");
  const w = await writeAt(`${W}/one-a`, 4, 0, 1);
  assert(w.ok, `write after the process died: ${w.err}`);
  const back = await readBack(4, 0, 1);
  assert(equal(back, data.subarray(0, MiB)), "1 MiB read back differs");
  await disconnectDevice(4);
  await waitFreed(4);
  return "after kill -9 of the process that connected it, nbd4 stays connected and does I/O, until NBD_CMD_DISCONNECT";
});

// --- read-only, and the two interfaces on each other's devices -------------
await check("read-only", async () => {
  const ro = await connectServer("orphan", 1, {
    index: 4,
    serverFlags: FLAG_HAS_FLAGS | FLAG_READ_ONLY,
  });
  const getro = await blockdev("--getro", 4);
  const w = await writeAt(`${W}/one-a`, 4, 0, 1, 30);
  await disconnectDevice(ro.index);
  await waitFreed(4);
  assert(getro === "1", `BLKROGET ${getro}`);
  assert(!w.ok, "a write to a read-only device succeeded");
  const rw = await connectServer("orphan", 1, { index: 4 });
  const again = await blockdev("--getro", 4);
  await disconnectDevice(rw.index);
  await waitFreed(4);
  assert(again === "0", `BLKROGET after a read-only connection: ${again}`);
  return `NBD_FLAG_READ_ONLY: BLKROGET 1, writes fail (${w.err}); the next writable connection has BLKROGET 0`;
});
await check("ioctl-detach-of-netlink-device", async () => {
  await connectServer("orphan", 1, { index: 4 });
  const was = await detach("/dev/nbd4", { netlink: false });
  assert(was, "detach() says it was not attached");
  await waitFreed(4);
  return "detach() (NBD_DISCONNECT + NBD_CLEAR_SOCK ioctls) frees a device connected over netlink";
});
await check("netlink-disconnect-of-ioctl-device", async () => {
  const dev = await attach({ path: sock("orphan") }, "/dev/nbd4", {
    handleSignals: false,
    netlink: false,
  });
  await disconnectDevice(4);
  const release = await within(20_000, "the ioctl release", dev.closed);
  await waitFreed(4);
  return `NBD_CMD_DISCONNECT of a device attached with NBD_DO_IT: ${release.reason}, requested ${release.requested}: ${release.message}`;
});
await check("read-only-sticks", async () => {
  // BLKROSET from a read-only ioctl session stays on the block device.
  const dev = await attach({ path: sock("orphan") }, "/dev/nbd4", {
    handleSignals: false,
    readOnly: true,
    netlink: false,
  });
  await dev.disconnect();
  await waitFreed(4);
  const c = await connectServer("orphan", 1, { index: 4 });
  const inherited = await blockdev("--getro", 4);
  const fd = await openDeviceAsync("/dev/nbd4");
  try {
    setReadOnly("/dev/nbd4", fd, false);
  } finally {
    libc().close(fd);
  }
  const after = await blockdev("--getro", 4);
  const w = await writeAt(`${W}/one-a`, 4, 0, 1, 30);
  await disconnectDevice(c.index);
  await waitFreed(4);
  assert(after === "0" && w.ok, `BLKROGET ${after} after BLKROSET 0; ${w.err}`);
  return `a writable netlink connection after a read-only ioctl session: BLKROGET ${inherited}; after BLKROSET 0 it is ${after} and writes work`;
});
await check("relay", async () => {
  // attach()'s relay path (TLS) over netlink: the kernel gets one end of a
  // socketpair, this process copies between the other end and the server.
  const stream = new FdStream(await connectSocket({ path: sock("orphan") }));
  const transport = new Transport(stream);
  const info = await negotiate(transport, {
    structuredReplies: false,
    extendedHeaders: false,
    metaContexts: [],
    blockSizes: true,
  });
  const [kernelEnd, ourEnd] = socketPair();
  const relay = startRelay(new FdStream(ourEnd), transport.stream);
  try {
    await connectDevice({
      index: 4,
      sockets: [kernelEnd],
      size: info.size,
      blockSize: 4096,
      serverFlags: FLAG_HAS_FLAGS | info.flags,
    });
  } finally {
    closeAll([kernelEnd]);
  }
  const w = await writeAt(`${W}/one-a`, 4, 0, 1);
  assert(w.ok, `write: ${w.err}`);
  const back = await readBack(4, 0, 1);
  assert(equal(back, data.subarray(0, MiB)), "1 MiB read back differs");
  const started = performance.now();
  await within(
    20_000,
    "NBD_CMD_DISCONNECT over the relay",
    disconnectDevice(4),
  );
  const ms = Math.round(performance.now() - started);
  await waitFreed(4);
  await within(10_000, "the relay to stop", relay.done);
  return `1 MiB through the relay; NBD_CMD_DISCONNECT ${ms} ms, the relay ended on its own${
    relay.error ? ` with ${relay.error}` : ""
  }`;
});
await phase("interfaces");

await check("watch-ends", async () => {
  assert(watch, "no watch");
  await watch.return();
  await within(5000, "the watch loop", watching);
  return `the subscription ended; ${dead.length} LINK_DEAD seen: ${
    dead.map((d) => d.index).join(",")
  }`;
});

for (
  const name of [
    "one",
    "two",
    "single",
    "p",
    "np",
    "sp",
    "sn",
    "orphan",
  ]
) {
  await killServer(name, "SIGTERM").catch(() => {});
}
await Deno.writeTextFile(
  `${R}/timings.txt`,
  `total ${Math.round(performance.now() - t0)}\n`,
  { append: true },
);
const results = await Deno.readTextFile(`${R}/results.txt`);
Deno.exit(/^FAIL/m.test(results) ? 1 : 0);

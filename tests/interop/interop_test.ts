/**
 * The same checks against every real server we can start: nbdkit (several
 * plugins, filters and handshakes), qemu-nbd and nbd-server. Each row of
 * {@linkcode CONFIGS} says what its server offers; every check either
 * exercises the feature against the server or, where the server lacks it,
 * checks that the client refuses with `NbdUnsupportedError` before sending
 * anything (libnbd's `interop/`, redis's per-connector loop).
 */

import { seeded } from "../support/random.ts";
import assert from "node:assert/strict";
import {
  type BlockSize,
  connect,
  type ConnectOptions,
  listExports,
  type NbdClient,
  NbdCommandError,
  NbdConnectionClosedError,
  NbdError,
  NbdOptionError,
  probe,
  type Protocol,
  STATE_HOLE,
  STATE_ZERO,
} from "../../mod.ts";
import {
  assertBytes,
  extentsOf,
  fill,
  isZero,
  pattern,
  readAll,
  refusesWritesBeforeTraffic,
  rejectsBeforeTraffic,
  Trace,
} from "./_support.ts";
import {
  nbdkit,
  nbdServer,
  type Peers,
  qemuNbd,
  run,
  type Server,
  sparseFile,
  tempDir,
} from "../support/servers.ts";
import { within } from "../support/wait.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB;
const DEFAULT_BLOCK_SIZE: BlockSize = {
  minimum: 1,
  preferred: 4096,
  maximum: 0xffffffff,
};
/** The spec's interoperable ceiling, which the client keeps to by default. */
const INTEROP_MAX_PAYLOAD = 32 * MiB;

// Where each check writes, so that no check sees another's data.
const R_DATA = 0;
const R_MANY = 4 * MiB;
const R_SPLIT = 8 * MiB; // up to 32 MiB + 64 KiB long
const R_RANDOM = 41 * MiB; // 4 MiB
const R_ZERO = 48 * MiB;
const R_ZERO_NO_HOLE = 49 * MiB;
const R_FAST_ZERO = 50 * MiB;
const R_TRIM = 51 * MiB;
const R_FUA = 52 * MiB;
const R_STREAM = 53 * MiB;
const R_MULTI = 58 * MiB;
const R_UNTOUCHED = 60 * MiB;
/** Where a backing file holds data that no check reads or writes. */
const R_BACKING = 62 * MiB;

/** What a server configuration offers, as the checks expect it. */
interface Expect {
  protocol: Protocol;
  structuredReplies: boolean;
  /** Extended headers are negotiated (qemu-nbd 10; no other server here). */
  extendedHeaders?: boolean;
  readOnly: boolean;
  flush: boolean;
  fua: boolean;
  trim: boolean;
  writeZeroes: boolean;
  fastZero: boolean;
  cache: boolean;
  df: boolean;
  /** `base:allocation` is negotiated. */
  blockStatus: boolean;
  /** Block sizes in force (advertised, or the defaults). */
  blockSize: BlockSize;
  /**
   * What `listExports()` returns, or `"unlistable"` for handshakes without
   * options (oldstyle, non-fixed newstyle).
   */
  exports: Array<{ name: string; description: string }> | "unlistable";
  /** For read-only exports: what the export holds. */
  content?: (offset: number, length: number) => Uint8Array;
  /** A trimmed range reads back as zeroes (not required by the spec). */
  trimReadsZeroes: boolean;
  /** After `writeZeroes()`, `base:allocation` sets `NBD_STATE_ZERO`. */
  zeroStatus: boolean;
  /** `base:allocation` flags of a range nobody wrote. */
  untouchedFlags?: number;
  /** `NBD_FLAG_CAN_MULTI_CONN`: connections see each other's flushed writes. */
  multiConn: boolean;
  /** Replies to a mix of slow and fast requests arrive out of order. */
  reorders?: boolean;
  /** `probe()` (NBD_OPT_INFO) reports this size instead of the real one. */
  probeSize?: number;
  /**
   * The server advertises flush, FUA, trim, write zeroes and cache but fails
   * each with EINVAL: nbdkit 1.32 with `-o` ("invalid request: NBD_CMD_FLUSH:
   * flush operation not supported"; libnbd and qemu-io get the same). The
   * client must send them (the flags say so) and survive each errno.
   */
  refusesAdvertised?: boolean;
}

/** One server configuration: how to start it and what it offers. */
interface Config {
  name: string;
  /** Whose server: the host's (Debian 12) or the Debian 13 root's. */
  peers: Peers;
  programs: string[];
  start(dir: string): Promise<Server>;
  exportName: string;
  options?: ConnectOptions;
  expect: Expect;
}

const ALL_FEATURES = {
  protocol: "fixed newstyle",
  structuredReplies: true,
  readOnly: false,
  flush: true,
  fua: true,
  trim: true,
  writeZeroes: true,
  fastZero: true,
  cache: true,
  df: true,
  blockStatus: true,
  blockSize: DEFAULT_BLOCK_SIZE,
  exports: [{ name: "", description: "" }],
  trimReadsZeroes: true,
  zeroStatus: true,
  untouchedFlags: STATE_HOLE | STATE_ZERO,
  multiConn: true,
} as const satisfies Expect;

const NO_STRUCTURED_REPLIES = {
  structuredReplies: false,
  df: false,
  blockStatus: false,
} as const;

/** The first MiB of the read-only raw image, written before serving it. */
const RAW_PREFIX = fill(99, 0, MiB);
function rawContent(offset: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  if (offset < MiB) {
    out.set(RAW_PREFIX.subarray(offset, Math.min(MiB, offset + length)));
  }
  return out;
}

/**
 * nbd-server with a writable `disk` (flush, FUA and trim switched on) and a
 * read-only `spare`.
 */
async function nbdServerDisk(dir: string, tcp: boolean): Promise<Server> {
  await sparseFile(`${dir}/disk.img`, SIZE);
  await sparseFile(`${dir}/spare.img`, MiB);
  return await nbdServer({
    disk: {
      exportname: `${dir}/disk.img`,
      flush: true,
      fua: true,
      trim: true,
    },
    spare: { exportname: `${dir}/spare.img`, readonly: true },
  }, { dir, tcp });
}

/** What {@linkcode nbdServerDisk} offers. */
const NBD_SERVER_DISK: Expect = {
  ...ALL_FEATURES,
  ...NO_STRUCTURED_REPLIES,
  fastZero: false,
  cache: false,
  exports: [
    { name: "disk", description: "" },
    { name: "spare", description: "" },
  ],
  trimReadsZeroes: false,
  // nbd-server 3.24 answers NBD_OPT_INFO before it opens the file and
  // so reports size 0 (nbdinfo shows the same); NBD_OPT_GO is right.
  probeSize: 0,
};

/**
 * The nbdkit rows, for the host's nbdkit 1.32 and the Debian 13 root's
 * nbdkit 1.42.
 */
function nbdkitRows(peers: Peers): Config[] {
  // nbdkit 1.42's memory plugin advertises its 32 KiB pages as the
  // preferred block size; 1.32 advertises nothing.
  const memory: Expect = peers === "host" ? ALL_FEATURES : {
    ...ALL_FEATURES,
    blockSize: { ...DEFAULT_BLOCK_SIZE, preferred: 32 * KiB },
  };
  return [
    {
      name: "nbdkit memory",
      peers,
      programs: ["nbdkit"],
      start: (dir) => nbdkit(["memory", String(SIZE)], { dir, peers }),
      exportName: "",
      expect: memory,
    },
    {
      name: "nbdkit memory over loopback TCP",
      peers,
      programs: ["nbdkit"],
      start: (dir) =>
        nbdkit(["memory", String(SIZE)], { dir, tcp: true, peers }),
      exportName: "",
      expect: memory,
    },
    {
      name: "nbdkit memory without structured replies (--no-sr)",
      peers,
      programs: ["nbdkit"],
      start: (dir) =>
        nbdkit(["--no-sr", "memory", String(SIZE)], { dir, peers }),
      exportName: "",
      expect: { ...memory, ...NO_STRUCTURED_REPLIES },
    },
    {
      name: "nbdkit memory with the oldstyle handshake (-o)",
      peers,
      programs: ["nbdkit"],
      start: (dir) => nbdkit(["-o", "memory", String(SIZE)], { dir, peers }),
      exportName: "",
      expect: {
        ...ALL_FEATURES,
        ...NO_STRUCTURED_REPLIES,
        protocol: "oldstyle",
        exports: "unlistable",
        refusesAdvertised: true,
      },
    },
    {
      name: "nbdkit memory with plain newstyle and zeroes (--mask-handshake=0)",
      peers,
      programs: ["nbdkit"],
      start: (dir) =>
        nbdkit(["--mask-handshake=0", "memory", String(SIZE)], { dir, peers }),
      exportName: "",
      expect: {
        ...ALL_FEATURES,
        ...NO_STRUCTURED_REPLIES,
        protocol: "newstyle",
        exports: "unlistable",
      },
    },
    {
      name: "nbdkit memory with plain newstyle, no zeroes (--mask-handshake=2)",
      peers,
      programs: ["nbdkit"],
      start: (dir) =>
        nbdkit(["--mask-handshake=2", "memory", String(SIZE)], { dir, peers }),
      exportName: "",
      expect: {
        ...ALL_FEATURES,
        ...NO_STRUCTURED_REPLIES,
        protocol: "newstyle",
        exports: "unlistable",
      },
    },
    {
      name: "nbdkit memory without FUA, zeroes, cache or multi-conn (filters)",
      peers,
      programs: ["nbdkit"],
      start: (dir) =>
        nbdkit([
          "--filter=fua",
          "--filter=nozero",
          "--filter=nocache",
          "--filter=multi-conn",
          "memory",
          String(SIZE),
          // The fua filter's default fuamode=none hides FUA.
          "zeromode=none",
          "cachemode=none",
          "multi-conn-mode=disable",
        ], { dir, peers }),
      exportName: "",
      expect: {
        ...memory,
        fua: false,
        writeZeroes: false,
        fastZero: false,
        cache: false,
        multiConn: false,
      },
    },
    {
      name: "nbdkit memory with block size limits (blocksize-policy filter)",
      peers,
      programs: ["nbdkit"],
      start: (dir) =>
        nbdkit([
          "--filter=blocksize-policy",
          "memory",
          String(SIZE),
          "blocksize-minimum=512",
          "blocksize-preferred=4096",
          "blocksize-maximum=64K",
          // The server fails what breaks the limits, so a client that does
          // not split would see EINVAL rather than pass by luck.
          "blocksize-error-policy=error",
        ], { dir, peers }),
      exportName: "",
      expect: {
        ...ALL_FEATURES,
        blockSize: { minimum: 512, preferred: 4096, maximum: 64 * KiB },
      },
    },
    {
      name: "nbdkit memory with slow reads (delay filter)",
      peers,
      programs: ["nbdkit"],
      start: (dir) =>
        nbdkit([
          "--filter=delay",
          "memory",
          String(SIZE),
          "delay-read=20ms",
          "delay-write=1ms",
        ], { dir, peers }),
      exportName: "",
      expect: { ...memory, reorders: true },
    },
    {
      name: "nbdkit file plugin with several named exports",
      peers,
      programs: ["nbdkit"],
      start: async (dir) => {
        await Deno.mkdir(`${dir}/exports`);
        await sparseFile(`${dir}/exports/disk`, SIZE);
        await sparseFile(`${dir}/exports/spare`, MiB);
        return await nbdkit([
          "--filter=exportname",
          "file",
          `dir=${dir}/exports`,
          "exportname-list=explicit",
          "exportname-strict=true",
          "exportname=disk",
          "exportname=spare",
          "exportdesc=fixed:interop export",
        ], { dir, peers });
      },
      exportName: "disk",
      expect: {
        ...ALL_FEATURES,
        fastZero: false,
        exports: [
          { name: "disk", description: "interop export" },
          { name: "spare", description: "interop export" },
        ],
      },
    },
    {
      name: "nbdkit pattern (read-only)",
      peers,
      programs: ["nbdkit"],
      start: (dir) => nbdkit(["pattern", String(SIZE)], { dir, peers }),
      exportName: "",
      expect: {
        ...ALL_FEATURES,
        readOnly: true,
        flush: false,
        fua: false,
        trim: false,
        writeZeroes: false,
        fastZero: false,
        content: pattern,
        untouchedFlags: 0,
      },
    },
  ];
}

/** The qemu-nbd rows, for the host's qemu 7.2 and the root's qemu 10. */
function qemuRows(peers: Peers): Config[] {
  return [
    {
      name: "qemu-nbd qcow2 over a backing file, with a dirty bitmap (-B)",
      peers,
      programs: ["qemu-nbd", "qemu-img", "qemu-io"],
      start: async (dir) => {
        // The backing file holds data past every region a check uses, so
        // reads through the chain are exercised without disturbing them.
        const base = `${dir}/base.qcow2`;
        const img = `${dir}/disk.qcow2`;
        const q = ["-q", "-f", "qcow2"];
        await run("qemu-img", ["create", ...q, base, String(SIZE)], peers);
        await run("qemu-io", [
          "-f",
          "qcow2",
          "-c",
          `write -P 0x3c ${R_BACKING} 1M`,
          base,
        ], peers);
        await run(
          "qemu-img",
          ["create", ...q, "-b", base, "-F", "qcow2", img],
          peers,
        );
        await run(
          "qemu-img",
          ["bitmap", "--add", "--enable", img, "b0"],
          peers,
        );
        return await qemuNbd(["-f", "qcow2", "-B", "b0", img], { dir, peers });
      },
      exportName: "",
      expect: {
        ...ALL_FEATURES,
        extendedHeaders: peers === "trixie",
        blockSize: { minimum: 1, preferred: 4096, maximum: 32 * MiB },
        // qemu-nbd ignores discards unless started with --discard=unmap.
        trimReadsZeroes: false,
      },
    },
    {
      name: "qemu-nbd raw with discards (--discard=unmap)",
      peers,
      programs: ["qemu-nbd"],
      start: async (dir) => {
        const img = `${dir}/disk.raw`;
        await sparseFile(img, SIZE);
        return await qemuNbd(
          ["-f", "raw", "--discard=unmap", img],
          { dir, peers },
        );
      },
      exportName: "",
      expect: {
        ...ALL_FEATURES,
        extendedHeaders: peers === "trixie",
        blockSize: { minimum: 1, preferred: 4096, maximum: 32 * MiB },
      },
    },
    {
      name: "qemu-nbd raw, read-only, named export (-r -x)",
      peers,
      programs: ["qemu-nbd"],
      start: async (dir) => {
        const img = `${dir}/disk.raw`;
        await sparseFile(img, SIZE);
        const f = await Deno.open(img, { write: true });
        try {
          await f.write(RAW_PREFIX);
        } finally {
          f.close();
        }
        return await qemuNbd(
          ["-f", "raw", "-r", "-x", "ro", "-D", "read-only raw", img],
          { dir, peers },
        );
      },
      exportName: "ro",
      expect: {
        ...ALL_FEATURES,
        readOnly: true,
        trim: false,
        writeZeroes: false,
        fastZero: false,
        blockSize: { minimum: 1, preferred: 4096, maximum: 32 * MiB },
        extendedHeaders: peers === "trixie",
        exports: [{ name: "ro", description: "read-only raw" }],
        content: rawContent,
      },
    },
  ];
}

/** The Debian 13 root's rows are named by their version. */
function named(rows: Config[], from: string, to: string): Config[] {
  return rows.map((r) => ({ ...r, name: r.name.replace(from, to) }));
}

const CONFIGS: Config[] = [
  ...nbdkitRows("host"),
  ...qemuRows("host"),
  {
    name: "nbd-server",
    peers: "host",
    programs: ["nbd-server"],
    start: (dir) => nbdServerDisk(dir, false),
    exportName: "disk",
    expect: NBD_SERVER_DISK,
  },
  {
    name: "nbd-server with its defaults (no flush, FUA or trim)",
    peers: "host",
    programs: ["nbd-server"],
    start: async (dir) => {
      await sparseFile(`${dir}/disk.img`, SIZE);
      return await nbdServer({ plain: { exportname: `${dir}/disk.img` } }, {
        dir,
      });
    },
    exportName: "plain",
    expect: {
      ...NBD_SERVER_DISK,
      flush: false,
      fua: false,
      trim: false,
      exports: [{ name: "plain", description: "" }],
    },
  },
  {
    name: "nbd-server over loopback TCP",
    peers: "host",
    programs: ["nbd-server"],
    start: (dir) => nbdServerDisk(dir, true),
    exportName: "disk",
    expect: NBD_SERVER_DISK,
  },
  ...named(nbdkitRows("trixie"), "nbdkit", "nbdkit 1.42"),
  ...named(qemuRows("trixie"), "qemu-nbd", "qemu-nbd 10"),
];

/** Every NBD_CMD_* of `type` sent while `body` ran. */
async function commandsDuring(
  trace: Trace,
  command: string,
  body: () => Promise<unknown>,
): Promise<Array<Record<string, unknown>>> {
  const before = trace.commands().length;
  await body();
  return trace.commands().slice(before).filter((c) => c.command === command);
}

/**
 * Runs `call`, which the server must fail with EINVAL (one request, not the
 * connection), then checks that the connection still carries a read.
 */
async function failsWithEinval(
  client: NbdClient,
  command: string,
  call: () => Promise<unknown>,
): Promise<void> {
  await assert.rejects(call, (e: unknown) => {
    assert.ok(e instanceof NbdCommandError, `got ${e}`);
    assert.equal(e.command, command);
    assert.equal(e.errno, 22);
    assert.equal(e.errnoName, "EINVAL");
    assert.match(e.message, /failed with 22 \(EINVAL\)/);
    return true;
  });
  assert.equal(client.failure, undefined);
  assert.equal((await client.read(0, 512)).length, 512);
}

/**
 * `call` fails because the server's handshake has no options, in the
 * client's words for it ("the oldstyle", "non-fixed newstyle").
 */
async function refusedWithoutOptions(
  protocol: Protocol,
  call: () => Promise<unknown>,
): Promise<void> {
  const article = protocol === "oldstyle"
    ? "the oldstyle"
    : "non-fixed newstyle";
  await assert.rejects(
    call,
    (e: unknown) =>
      e instanceof NbdError &&
      e.message.includes(`speaks ${article} handshake`),
  );
}

/** Cookies in the order their replies completed. */
function completionOrder(trace: Trace, from: number): bigint[] {
  return trace.events.slice(from).filter((e) =>
    e.event === "recv simple reply" ||
    (e.event === "recv chunk" && e.fields.done === true)
  ).map((e) => e.fields.cookie as bigint);
}

async function runChecks(
  t: Deno.TestContext,
  c: Config,
  server: Server,
): Promise<void> {
  const x = c.expect;
  const trace = new Trace();
  const maxInFlight = 128;
  const options: ConnectOptions = {
    metaContexts: ["base:allocation"],
    debug: trace.hook,
    maxInFlight,
    ...c.options,
  };
  const client: NbdClient = await within(
    10_000,
    "connect()",
    connect(server.target(c.exportName), options),
  );
  const writable = !x.readOnly;
  /** What the export should hold, for read-only exports. */
  const content = (offset: number, length: number) => {
    assert.ok(x.content, "a read-only row must say what the export holds");
    return x.content(offset, length);
  };
  /**
   * A command behind a transmission flag: where the flag is clear the
   * client refuses it before traffic (`refusal`: feature and message);
   * where the server advertises what it then refuses, it fails with
   * EINVAL and the connection carries on; elsewhere `served` runs.
   */
  const byFlag = async (
    flag: boolean,
    command: string,
    call: () => Promise<unknown>,
    refusal: [feature: string, message: RegExp],
    served: () => Promise<unknown> = call,
  ): Promise<void> => {
    if (!flag) await rejectsBeforeTraffic(trace, call, ...refusal);
    else if (x.refusesAdvertised) await failsWithEinval(client, command, call);
    else await served();
  };
  try {
    await t.step(
      `connect() negotiates the ${x.protocol} handshake, the size and the flags`,
      () => {
        assert.equal(client.protocol, x.protocol);
        assert.equal(client.size, SIZE);
        assert.equal(client.exportName, c.exportName);
        assert.equal(client.structuredReplies, x.structuredReplies);
        // Only qemu-nbd 10 speaks extended headers: against the others
        // the client must have fallen back instead of failing.
        assert.equal(client.extendedHeaders, x.extendedHeaders ?? false);
        assert.equal(client.tls, false);
        assert.equal(client.state, "open");
        assert.deepEqual(
          {
            readOnly: client.readOnly,
            flush: client.canFlush,
            fua: client.canFua,
            trim: client.canTrim,
            writeZeroes: client.canWriteZeroes,
            fastZero: client.canFastZero,
            cache: client.canCache,
            df: client.canDf,
            blockStatus: client.canBlockStatus,
          },
          {
            readOnly: x.readOnly,
            flush: x.flush,
            fua: x.fua,
            trim: x.trim,
            writeZeroes: x.writeZeroes,
            fastZero: x.fastZero,
            cache: x.cache,
            df: x.df,
            blockStatus: x.blockStatus,
          },
        );
        assert.deepEqual(client.blockSize, x.blockSize);
        assert.deepEqual(
          client.metaContexts,
          x.blockStatus ? ["base:allocation"] : [],
        );
      },
    );

    if (writable) {
      await t.step("read() returns what write() stored", async () => {
        const data = fill(1, R_DATA, MiB);
        await client.write(R_DATA, data);
        assertBytes(await client.read(R_DATA, MiB), data, "read back");
        // Unaligned pieces of it, when the export allows them.
        const min = x.blockSize.minimum;
        const off = R_DATA + 3 * min;
        assertBytes(
          await client.read(off, 5 * min),
          data.subarray(3 * min, 8 * min),
          "read of a piece",
        );
      });
    } else {
      await t.step(
        "write(), trim() and writeZeroes() on a read-only export fail before traffic",
        async () => {
          await refusesWritesBeforeTraffic(trace, client, 4096);
        },
      );
      await t.step("read() returns what the export holds", async () => {
        assertBytes(await client.read(0, MiB), content(0, MiB), "first MiB");
        assertBytes(
          await client.read(SIZE - 64 * KiB, 64 * KiB),
          content(SIZE - 64 * KiB, 64 * KiB),
          "last 64 KiB",
        );
      });
    }

    await t.step(
      "many requests in flight complete with the right data, however the replies are ordered",
      async () => {
        const block = 4 * KiB;
        const count = 256;
        const reads: Promise<Uint8Array>[] = [];
        const writes: Promise<void>[] = [];
        let before: Uint8Array;
        if (writable) {
          before = fill(2, R_MANY, count * block);
          await client.write(R_MANY, before);
        } else {
          before = content(R_MANY, count * block);
        }
        trace.resetPeak();
        const mark = trace.events.length;
        for (let i = 0; i < count; i++) {
          reads.push(client.read(R_MANY + i * block, block));
          if (writable) {
            const at = R_MANY + (count + i) * block;
            writes.push(client.write(at, fill(3, at, block)));
          }
        }
        const got = await within(
          30_000,
          "requests in flight",
          Promise.all(reads),
        );
        await within(30_000, "writes in flight", Promise.all(writes));
        for (const [i, bytes] of got.entries()) {
          assertBytes(
            bytes,
            before.subarray(i * block, (i + 1) * block),
            `read ${i}`,
          );
        }
        if (writable) {
          const at = R_MANY + count * block;
          assertBytes(
            await client.read(at, count * block),
            fill(3, at, count * block),
            "the blocks written in flight",
          );
        }
        assert.ok(
          trace.peakInFlight > 1,
          `only ${trace.peakInFlight} request(s) were in flight at once`,
        );
        assert.ok(
          trace.peakInFlight <= maxInFlight,
          `${trace.peakInFlight} requests in flight, over maxInFlight ${maxInFlight}`,
        );
        if (x.reorders) {
          const order = completionOrder(trace, mark);
          const sorted = [...order].sort((
            a,
            b,
          ) => (a < b ? -1 : a > b ? 1 : 0));
          assert.notDeepEqual(
            order,
            sorted,
            "the delay filter should have made replies overtake each other",
          );
        }
      },
    );

    await t.step(
      "read() and write() split requests larger than the server's maximum",
      async () => {
        const maxIo = Math.min(x.blockSize.maximum, INTEROP_MAX_PAYLOAD);
        const length = maxIo + 64 * KiB;
        const expected = writable
          ? fill(4, R_SPLIT, length)
          : content(R_SPLIT, length);
        if (writable) {
          const sent = await commandsDuring(
            trace,
            "NBD_CMD_WRITE",
            () => client.write(R_SPLIT, expected),
          );
          assert.ok(sent.length >= 2, `${sent.length} write request(s)`);
          for (const s of sent) assert.ok((s.length as number) <= maxIo);
        }
        let back: Uint8Array = new Uint8Array();
        const sent = await commandsDuring(
          trace,
          "NBD_CMD_READ",
          async () => {
            back = await client.read(R_SPLIT, length);
          },
        );
        assert.ok(sent.length >= 2, `${sent.length} read request(s)`);
        for (const s of sent) assert.ok((s.length as number) <= maxIo);
        assertBytes(back, expected, "split read");
      },
    );

    await t.step(
      x.flush
        ? "flush() succeeds where NBD_FLAG_SEND_FLUSH is set"
        : "flush() fails before traffic where NBD_FLAG_SEND_FLUSH is clear",
      async () => {
        await byFlag(x.flush, "NBD_CMD_FLUSH", () => client.flush(), [
          "flush",
          /does not support flush/,
        ]);
      },
    );

    if (writable) {
      await t.step(
        x.fua
          ? "write() with fua sets NBD_CMD_FLAG_FUA"
          : "write() with fua fails before traffic where NBD_FLAG_SEND_FUA is clear",
        async () => {
          const data = fill(5, R_FUA, 64 * KiB);
          const write = () => client.write(R_FUA, data, { fua: true });
          await byFlag(
            x.fua,
            "NBD_CMD_WRITE",
            write,
            ["fua", /does not support FUA/],
            async () => {
              const sent = await commandsDuring(trace, "NBD_CMD_WRITE", write);
              assert.ok(sent.every((s) => s.flags === 1));
              assertBytes(await client.read(R_FUA, data.length), data, "fua");
            },
          );
        },
      );

      await t.step(
        x.trim
          ? "trim() is accepted where NBD_FLAG_SEND_TRIM is set"
          : "trim() fails before traffic where NBD_FLAG_SEND_TRIM is clear",
        async () => {
          const trim = () => client.trim(R_TRIM, MiB);
          await byFlag(
            x.trim,
            "NBD_CMD_TRIM",
            trim,
            ["trim", /does not support trim/],
            async () => {
              await client.write(R_TRIM, fill(6, R_TRIM, MiB));
              await trim();
              const back = await client.read(R_TRIM, MiB);
              // The spec leaves trimmed content unspecified; some servers
              // zero it.
              if (x.trimReadsZeroes) assert.ok(isZero(back), "trimmed range");
            },
          );
        },
      );

      await t.step(
        x.writeZeroes
          ? "writeZeroes() makes the range read back as zeroes"
          : "writeZeroes() fails before traffic where NBD_FLAG_SEND_WRITE_ZEROES is clear",
        async () => {
          const zero = () => client.writeZeroes(R_ZERO, MiB);
          await byFlag(
            x.writeZeroes,
            "NBD_CMD_WRITE_ZEROES",
            zero,
            ["writeZeroes", /does not support write zeroes/],
            async () => {
              await client.write(R_ZERO, fill(7, R_ZERO, 2 * MiB));
              await zero();
              assert.ok(isZero(await client.read(R_ZERO, MiB)), "zeroed range");
              const sent = await commandsDuring(
                trace,
                "NBD_CMD_WRITE_ZEROES",
                () => client.writeZeroes(R_ZERO_NO_HOLE, MiB, { noHole: true }),
              );
              assert.ok(sent.length >= 1 && sent.every((s) => s.flags === 2));
              assert.ok(
                isZero(await client.read(R_ZERO_NO_HOLE, MiB)),
                "range zeroed with noHole",
              );
            },
          );
        },
      );

      await t.step(
        x.fastZero
          ? "writeZeroes() with fastZero either zeroes or fails with ENOTSUP"
          : "writeZeroes() with fastZero fails before traffic where NBD_FLAG_SEND_FAST_ZERO is clear",
        async () => {
          const zero = () =>
            client.writeZeroes(R_FAST_ZERO, MiB, { fastZero: true });
          await byFlag(
            x.fastZero,
            "NBD_CMD_WRITE_ZEROES",
            zero,
            x.writeZeroes
              ? ["fastZero", /does not support fast zero/]
              : ["writeZeroes", /does not support write zeroes/],
            async () => {
              await client.write(R_FAST_ZERO, fill(8, R_FAST_ZERO, MiB));
              try {
                await zero();
                assert.ok(isZero(await client.read(R_FAST_ZERO, MiB)));
              } catch (e) {
                // The spec's way for a server to say "not faster than
                // writing".
                assert.ok(e instanceof NbdCommandError, `got ${e}`);
                assert.equal(e.errnoName, "ENOTSUP");
                assert.equal(e.errno, 95);
                assert.match(
                  e.message,
                  /NBD_CMD_WRITE_ZEROES .* failed with 95/,
                );
              }
            },
          );
        },
      );
    }

    await t.step(
      x.cache
        ? "cache() is accepted where NBD_FLAG_SEND_CACHE is set"
        : "cache() fails before traffic where NBD_FLAG_SEND_CACHE is clear",
      async () => {
        await byFlag(x.cache, "NBD_CMD_CACHE", () => client.cache(0, MiB), [
          "cache",
          /does not support cache/,
        ]);
      },
    );

    await t.step(
      x.df
        ? "read() with df returns the data in one chunk"
        : "read() with df fails before traffic without structured replies or NBD_FLAG_SEND_DF",
      async () => {
        const expected = writable
          ? fill(1, R_DATA, 64 * KiB)
          : content(0, 64 * KiB);
        if (x.df) {
          assertBytes(
            await client.read(0, 64 * KiB, { df: true }),
            expected,
            "df read",
          );
        } else {
          await rejectsBeforeTraffic(
            trace,
            () => client.read(0, 64 * KiB, { df: true }),
            "df",
            /does not support DF/,
          );
        }
      },
    );

    await t.step(
      x.blockStatus
        ? "blockStatus() reports data, and zeroes where zeroed or trimmed"
        : "blockStatus() fails before traffic when no metadata context was negotiated",
      async () => {
        if (!x.blockStatus) {
          await rejectsBeforeTraffic(
            trace,
            () => client.blockStatus(0, MiB),
            "blockStatus",
            /no metadata context was negotiated/,
          );
          return;
        }
        const ctx = "base:allocation";
        // Data never reads as zero, so no server may call it zero.
        const dataStart = writable ? R_DATA : 0;
        for (const e of await extentsOf(client, ctx, dataStart, MiB)) {
          if (writable || !isZero(content(e.offset, e.length))) {
            assert.equal(e.flags & STATE_ZERO, 0, `data at ${e.offset}`);
          }
        }
        if (writable && x.writeZeroes && x.zeroStatus) {
          for (const e of await extentsOf(client, ctx, R_ZERO, MiB)) {
            assert.ok(
              e.flags & STATE_ZERO,
              `zeroed extent ${e.offset}+${e.length} has flags ${e.flags}`,
            );
          }
        }
        if (writable && x.trim && x.trimReadsZeroes && !x.refusesAdvertised) {
          for (const e of await extentsOf(client, ctx, R_TRIM, MiB)) {
            assert.ok(
              e.flags & STATE_ZERO,
              `trimmed extent ${e.offset}+${e.length} has flags ${e.flags}`,
            );
          }
        }
        if (x.untouchedFlags !== undefined) {
          assert.deepEqual(
            await extentsOf(client, ctx, R_UNTOUCHED, MiB),
            [{ offset: R_UNTOUCHED, length: MiB, flags: x.untouchedFlags }],
          );
        }
        const one = await client.blockStatus(0, SIZE, { reqOne: true });
        assert.equal(one[ctx]?.length, 1, "NBD_CMD_FLAG_REQ_ONE");
      },
    );

    await t.step(
      "out-of-range and misaligned requests fail with RangeError before traffic",
      async () => {
        const sent = trace.commands().length;
        const min = x.blockSize.minimum;
        await assert.rejects(
          () => client.read(SIZE - min, 2 * min),
          (e: unknown) =>
            e instanceof RangeError &&
            /beyond the end of the export/.test(e.message),
        );
        await assert.rejects(
          () => client.read(0, 0),
          (e: unknown) =>
            e instanceof RangeError && /positive integer/.test(e.message),
        );
        if (min > 1) {
          await assert.rejects(
            () => client.read(min / 2, min),
            (e: unknown) =>
              e instanceof RangeError &&
              e.message.includes(
                `multiples of the export's minimum block size ${min}`,
              ),
          );
        }
        assert.equal(trace.commands().length, sent);
      },
    );

    await t.step(
      x.exports === "unlistable"
        ? `listExports() fails clearly against ${x.protocol} handshakes`
        : "listExports() names the server's exports",
      async () => {
        if (x.exports === "unlistable") {
          await refusedWithoutOptions(
            x.protocol,
            () => listExports(server.target()),
          );
          return;
        }
        const listed = await within(
          10_000,
          "listExports()",
          listExports(server.target()),
        );
        const byName = (a: { name: string }, b: { name: string }) =>
          a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
        assert.deepEqual(
          listed.map((e) => ({ ...e })).sort(byName),
          [...x.exports].sort(byName),
        );
      },
    );

    await t.step(
      x.exports === "unlistable"
        ? `probe() fails clearly against ${x.protocol} handshakes`
        : "probe() describes the export as connect() found it",
      async () => {
        if (x.exports === "unlistable") {
          await refusedWithoutOptions(
            x.protocol,
            () => probe(server.target(c.exportName)),
          );
          return;
        }
        const p = await within(
          10_000,
          "probe()",
          probe(server.target(c.exportName)),
        );
        assert.equal(p.exportName, c.exportName);
        assert.equal(p.sizeBigInt, BigInt(x.probeSize ?? SIZE));
        assert.equal(p.flags, client.flags);
        assert.deepEqual(p.blockSize ?? DEFAULT_BLOCK_SIZE, client.blockSize);
        assert.equal(p.structuredReplies, x.structuredReplies);
        assert.equal(p.extendedHeaders, x.extendedHeaders ?? false);
        assert.equal(p.protocol, "fixed newstyle");
        if (x.structuredReplies) {
          assert.ok(p.metaContexts.includes("base:allocation"));
        } else {
          assert.deepEqual(p.metaContexts, []);
        }
        if (x.exports.length > 1) {
          await assert.rejects(
            () => probe(server.target("no-such-export")),
            (e: unknown) =>
              e instanceof NbdOptionError &&
              e.replyName.startsWith("NBD_REP_ERR_") &&
              /no-such-export/.test(e.message),
          );
        }
      },
    );

    await t.step(
      "the debug hook names events, options, commands and replies",
      () => {
        assert.ok(trace.events.length > 0);
        for (const { event, fields } of trace.events) {
          assert.match(event, /^[a-z][a-z ]+$/, `event name ${event}`);
          for (const key of ["option", "command", "reply", "type"]) {
            if (!(key in fields) || fields[key] === undefined) continue;
            // Known numbers must arrive as their names (NBD_OPT_GO, not 7).
            assert.equal(
              typeof fields[key],
              "string",
              `${event}: ${key}=${String(fields[key])} is not a name`,
            );
          }
        }
        const names = new Set(trace.events.map((e) => e.event));
        if (x.protocol === "oldstyle") {
          assert.ok(names.has("recv oldstyle greeting"));
        } else {
          // Plain newstyle has one option only; fixed newstyle ends in GO.
          const last = x.protocol === "newstyle"
            ? "NBD_OPT_EXPORT_NAME"
            : "NBD_OPT_GO";
          assert.ok(
            trace.events.some((e) =>
              e.event === "send option" && e.fields.option === last
            ),
            `no ${last} sent`,
          );
        }
        const commands = new Set(trace.commands().map((c) => c.command));
        assert.ok(commands.has("NBD_CMD_READ"));
        if (writable) assert.ok(commands.has("NBD_CMD_WRITE"));
        if (x.structuredReplies) {
          assert.ok(
            trace.events.some((e) =>
              e.event === "recv chunk" &&
              e.fields.type === "NBD_REPLY_TYPE_OFFSET_DATA"
            ),
          );
        }
      },
    );

    if (writable) {
      await t.step(
        "a random mix of requests in flight matches a shadow copy of the export",
        async () => {
          const block = Math.max(4 * KiB, x.blockSize.minimum);
          const blocks = (4 * MiB) / block;
          const shadow = await client.read(R_RANDOM, 4 * MiB);
          const ops = ["read", "write"];
          if (x.writeZeroes && !x.refusesAdvertised) ops.push("zero");
          if (x.trim && x.trimReadsZeroes && !x.refusesAdvertised) {
            ops.push("trim");
          }
          const next = seeded(0x2545f491);
          const random = (n: number) => next() % n;
          for (let round = 0; round < 8; round++) {
            // Distinct blocks, so requests of one round commute.
            const chosen = new Set<number>();
            while (chosen.size < 64) chosen.add(random(blocks));
            const before = shadow.slice();
            const pending: Promise<void>[] = [];
            for (const b of chosen) {
              const at = R_RANDOM + b * block;
              const rel = b * block;
              const op = ops[random(ops.length)];
              if (op === "read") {
                pending.push(
                  client.read(at, block).then((got) =>
                    assertBytes(
                      got,
                      before.subarray(rel, rel + block),
                      `round ${round}: read of block ${b}`,
                    )
                  ),
                );
              } else if (op === "write") {
                const data = fill(100 + round, at, block);
                shadow.set(data, rel);
                pending.push(client.write(at, data));
              } else {
                shadow.fill(0, rel, rel + block);
                pending.push(
                  op === "zero"
                    ? client.writeZeroes(at, block)
                    : client.trim(at, block),
                );
              }
            }
            await within(30_000, `round ${round}`, Promise.all(pending));
          }
          assertBytes(
            await client.read(R_RANDOM, 4 * MiB),
            shadow,
            "the region after every round",
          );
        },
      );
    }

    await t.step(
      writable
        ? "readable() and writable() stream bytes in order through the export"
        : "readable() streams the export's bytes in order",
      async () => {
        const length = 4 * MiB + 3 * KiB;
        const expected = writable
          ? fill(9, R_STREAM, length)
          : content(R_STREAM, length);
        if (writable) {
          // Odd-sized pieces, so the stream must realign them.
          const pieces = ReadableStream.from(
            (function* () {
              for (let at = 0; at < length; at += 100_000) {
                yield expected.slice(at, Math.min(length, at + 100_000));
              }
            })(),
          );
          await within(
            30_000,
            "writable()",
            pieces.pipeTo(
              client.writable({
                offset: R_STREAM,
                flush: x.flush && !x.refusesAdvertised,
              }),
            ),
          );
        }
        const joined = await readAll(
          client.readable({ offset: R_STREAM, length }),
          "readable()",
        );
        assertBytes(joined, expected, "streamed bytes");
      },
    );

    await t.step(
      x.multiConn
        ? "a second connection sees the first one's flushed writes (NBD_FLAG_CAN_MULTI_CONN)"
        : "NBD_FLAG_CAN_MULTI_CONN is clear",
      async () => {
        assert.equal(client.canMultiConn, x.multiConn);
        if (!x.multiConn) return;
        await using other = await within(
          10_000,
          "second connection",
          connect(server.target(c.exportName), c.options ?? {}),
        );
        const block = 64 * KiB;
        if (writable) {
          const data = fill(10, R_MULTI, block);
          await client.write(R_MULTI, data);
          if (x.flush && !x.refusesAdvertised) await client.flush();
          assertBytes(
            await other.read(R_MULTI, block),
            data,
            "other connection",
          );
          // And the other way round, with both connections still open.
          const back = fill(11, R_MULTI, block);
          await other.write(R_MULTI, back);
          if (x.flush && !x.refusesAdvertised) await other.flush();
          assertBytes(
            await client.read(R_MULTI, block),
            back,
            "first connection",
          );
        } else {
          assertBytes(
            await other.read(R_MULTI, block),
            await client.read(R_MULTI, block),
            "both connections",
          );
        }
      },
    );

    await t.step(
      "close() disconnects cleanly and the server accepts a new connection",
      async () => {
        await within(10_000, "close()", client.close());
        assert.equal(client.state, "closed");
        assert.equal(client.failure, undefined);
        assert.equal(trace.commands().at(-1)?.command, "NBD_CMD_DISC");
        await assert.rejects(
          () => client.read(0, 4096),
          (e: unknown) =>
            e instanceof NbdConnectionClosedError &&
            /Cannot call read\(\): the client is closed/.test(e.message),
        );
        await client.close(); // twice is fine
        await using again = await within(
          10_000,
          "reconnect",
          connect(server.target(c.exportName), c.options ?? {}),
        );
        const back = await again.read(0, 4096);
        assertBytes(
          back,
          writable ? fill(1, R_DATA, 4096) : content(0, 4096),
          "after reconnecting",
        );
      },
    );
  } finally {
    await client.close();
  }
}

for (const c of CONFIGS) {
  Deno.test({
    name: `interop: ${c.name}`,
    async fn(t) {
      const dir = await tempDir(c.peers);
      let server: Server | undefined;
      try {
        server = await c.start(dir);
        await runChecks(t, c, server);
      } finally {
        await server?.stop();
        await Deno.remove(dir, { recursive: true }).catch(() => {});
      }
    },
  });
}

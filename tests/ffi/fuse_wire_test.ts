import assert from "node:assert/strict";
import {
  decodeRequest,
  encodeAttr,
  encodeEntry,
  encodeError,
  encodeHeader,
  encodeInit,
  encodeOpen,
  encodeReaddir,
  encodeStatfs,
  encodeWrite,
  expectsReply,
  type FuseRequest,
  OP,
  opName,
  SIZES,
} from "../../ffi/fuse/_wire.ts";
import { NbdFuseError } from "../../ffi/fuse/errors.ts";

/** Little-endian fields as hex, for golden bytes written out by hand. */
const u16 = (n: number) => [n & 0xff, n >>> 8];
const u32 = (
  n: number,
) => [n & 0xff, (n >>> 8) & 0xff, (n >>> 16) & 0xff, n >>> 24];
const u64 = (
  n: number,
) => [...u32(n % 2 ** 32), ...u32(Math.floor(n / 2 ** 32))];

/** A request as the kernel frames it: in_header, then the body. */
function request(
  opcode: number,
  unique: number,
  nodeid: number,
  body: number[],
): Uint8Array {
  const len = 40 + body.length;
  return new Uint8Array([
    ...u32(len),
    ...u32(opcode),
    ...u64(unique),
    ...u64(nodeid),
    ...u32(0), // uid
    ...u32(0), // gid
    ...u32(4242), // pid
    ...u16(0), // total_extlen
    ...u16(0), // padding
    ...body,
  ]);
}

function hex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

const HEAD = { uid: 0, gid: 0, pid: 4242 };

/** Each golden request and what it decodes to. */
const REQUESTS: Array<[string, Uint8Array, Partial<FuseRequest>]> = [
  [
    "FUSE_INIT 7.45",
    request(OP.INIT, 2, 0, [
      ...u32(7),
      ...u32(45),
      ...u32(131072),
      ...u32(0x73fffffb),
      ...u32(0),
      ...new Array(44).fill(0),
    ]),
    {
      kind: "init",
      major: 7,
      minor: 45,
      maxReadahead: 131072,
      flags: 0x73fffffb,
      unique: 2n,
      nodeid: 0n,
      ...HEAD,
    },
  ],
  [
    "FUSE_LOOKUP nbd",
    request(OP.LOOKUP, 4, 1, [0x6e, 0x62, 0x64, 0]),
    { kind: "lookup", name: "nbd", unique: 4n, nodeid: 1n },
  ],
  [
    "FUSE_GETATTR",
    request(OP.GETATTR, 6, 2, [...u32(1), ...u32(0), ...u64(7)]),
    { kind: "getattr", fh: 7n, nodeid: 2n },
  ],
  [
    "FUSE_SETATTR size",
    request(OP.SETATTR, 8, 2, [
      ...u32(1 << 3),
      ...u32(0),
      ...u64(0),
      ...u64(65536),
      ...new Array(88 - 24).fill(0),
    ]),
    { kind: "setattr", valid: 8, fh: 0n, size: 65536n },
  ],
  [
    "FUSE_OPEN O_RDWR",
    request(OP.OPEN, 10, 2, [...u32(0o100002), ...u32(0)]),
    { kind: "open", flags: 0o100002 },
  ],
  [
    "FUSE_OPENDIR",
    request(OP.OPENDIR, 12, 1, [...u32(0o200000), ...u32(0)]),
    { kind: "opendir", flags: 0o200000 },
  ],
  [
    "FUSE_READ 128 KiB at 1 MiB",
    request(OP.READ, 14, 2, [
      ...u64(0),
      ...u64(1 << 20),
      ...u32(131072),
      ...u32(0),
      ...u64(0),
      ...u32(0x8002),
      ...u32(0),
    ]),
    { kind: "read", fh: 0n, offset: 1048576n, size: 131072 },
  ],
  [
    "FUSE_READDIR",
    request(OP.READDIR, 16, 1, [
      ...u64(0),
      ...u64(2),
      ...u32(4096),
      ...u32(0),
      ...u64(0),
      ...u32(0),
      ...u32(0),
    ]),
    { kind: "readdir", offset: 2n, size: 4096 },
  ],
  [
    "FUSE_RELEASE",
    request(OP.RELEASE, 18, 2, [...u64(3), ...u32(2), ...u32(0), ...u64(0)]),
    { kind: "release", fh: 3n },
  ],
  [
    "FUSE_FLUSH",
    request(OP.FLUSH, 20, 2, [...u64(3), ...u32(0), ...u32(0), ...u64(99)]),
    { kind: "flush", fh: 3n },
  ],
  [
    "FUSE_FSYNC",
    request(OP.FSYNC, 22, 2, [...u64(3), ...u32(1), ...u32(0)]),
    { kind: "fsync", fh: 3n, fsyncFlags: 1 },
  ],
  [
    "FUSE_FALLOCATE punch hole",
    request(OP.FALLOCATE, 24, 2, [
      ...u64(0),
      ...u64(4096),
      ...u64(8192),
      ...u32(3),
      ...u32(0),
    ]),
    { kind: "fallocate", offset: 4096n, length: 8192n, mode: 3 },
  ],
  ["FUSE_STATFS", request(OP.STATFS, 26, 1, []), { kind: "statfs" }],
  ["FUSE_INTERRUPT", request(OP.INTERRUPT, 28, 0, [...u64(14)]), {
    kind: "interrupt",
    target: 14n,
  }],
  ["FUSE_FORGET", request(OP.FORGET, 30, 2, [...u64(1)]), { kind: "forget" }],
  ["FUSE_DESTROY", request(OP.DESTROY, 32, 0, []), { kind: "destroy" }],
  [
    "FUSE_GETXATTR (answered ENOSYS)",
    request(OP.GETXATTR, 34, 2, [...u32(0), ...u32(0), 0x61, 0]),
    { kind: "other", opcode: 22 },
  ],
];

Deno.test("decodeRequest()", async (t) => {
  await t.step("SIZES are the kernel's struct sizes", () => {
    assert.equal(SIZES.inHeader, 40);
    assert.equal(SIZES.outHeader, 16);
    assert.equal(SIZES.initOut, 64);
    assert.equal(SIZES.attr, 88);
    assert.equal(SIZES.entryOut, 128);
    assert.equal(SIZES.attrOut, 104);
    assert.equal(SIZES.setattrIn, 88);
    assert.equal(SIZES.readIn, 40);
    assert.equal(SIZES.writeIn, 40);
    assert.equal(SIZES.openOut, 16);
    assert.equal(SIZES.statfsOut, 80);
    assert.equal(SIZES.fallocateIn, 32);
  });

  for (const [name, bytes, expected] of REQUESTS) {
    await t.step(`decodes ${name}, and fails on every cut`, () => {
      const req = decodeRequest(bytes);
      for (const [k, v] of Object.entries(expected)) {
        assert.deepEqual((req as unknown as Record<string, unknown>)[k], v, k);
      }
      assert.equal(req.len, bytes.length);
      for (let cut = 0; cut < bytes.length; cut++) {
        assert.throws(
          () => decodeRequest(bytes.subarray(0, cut)),
          (e: unknown) =>
            e instanceof NbdFuseError && e.reason === "protocol" &&
            /cut short: \d+ of \d+ bytes/.test(e.message),
          `cut at ${cut}`,
        );
      }
    });
  }

  await t.step("a WRITE's data is a view of the request, not a copy", () => {
    const data = [1, 2, 3, 4, 5];
    const bytes = request(OP.WRITE, 40, 2, [
      ...u64(0),
      ...u64(512),
      ...u32(5),
      ...u32(0),
      ...u64(0),
      ...u32(0),
      ...u32(0),
      ...data,
    ]);
    const req = decodeRequest(bytes);
    assert.equal(req.kind, "write");
    if (req.kind !== "write") return;
    assert.equal(req.offset, 512n);
    assert.deepEqual([...req.data], data);
    assert.equal(req.data.buffer, bytes.buffer);
    assert.equal(req.data.byteOffset, 80);
    for (let cut = 0; cut < bytes.length; cut++) {
      assert.throws(() => decodeRequest(bytes.subarray(0, cut)), NbdFuseError);
    }
  });

  await t.step(
    "a WRITE whose size disagrees with its length is refused",
    () => {
      const bytes = request(OP.WRITE, 40, 2, [
        ...u64(0),
        ...u64(0),
        ...u32(9),
        ...u32(0),
        ...u64(0),
        ...u32(0),
        ...u32(0),
        1,
        2,
      ]);
      assert.throws(
        () => decodeRequest(bytes),
        /FUSE_WRITE of 9 bytes carries 2/,
      );
    },
  );

  await t.step("a header whose length is below 40 is refused", () => {
    const bytes = request(OP.STATFS, 1, 1, []);
    bytes[0] = 39;
    assert.throws(() => decodeRequest(bytes), /shorter than its header/);
  });

  await t.step("a LOOKUP name without NUL is refused", () => {
    assert.throws(
      () => decodeRequest(request(OP.LOOKUP, 1, 1, [0x61])),
      /no terminating NUL/,
    );
  });

  await t.step("FORGET, BATCH_FORGET and INTERRUPT expect no reply", () => {
    const kinds = REQUESTS.map(([, b]) => decodeRequest(b)).filter((r) =>
      !expectsReply(r)
    ).map((r) => r.kind);
    assert.deepEqual(kinds, ["interrupt", "forget"]);
    assert.equal(opName(15), "15 (FUSE_READ)");
    assert.equal(opName(999), "999 (unknown)");
  });
});

const ATTR = {
  ino: 2n,
  size: 1048576n,
  mode: 0o100644,
  nlink: 1,
  uid: 0,
  gid: 0,
  time: 1700000000n,
  blksize: 4096,
};

function attrHex(): string {
  return hex(
    new Uint8Array([
      ...u64(2),
      ...u64(1048576),
      ...u64(2048),
      ...u64(1700000000),
      ...u64(1700000000),
      ...u64(1700000000),
      ...u32(0),
      ...u32(0),
      ...u32(0),
      ...u32(0o100644),
      ...u32(1),
      ...u32(0),
      ...u32(0),
      ...u32(0),
      ...u32(4096),
      ...u32(0),
    ]),
  );
}

function outHead(len: number, error: number, unique: number): string {
  return hex(
    new Uint8Array([...u32(len), ...u32(error >>> 0), ...u64(unique)]),
  );
}

Deno.test("reply encoders", async (t) => {
  const buf = new Uint8Array(4096).fill(0xee);
  const out = (n: number) => hex(buf.subarray(0, n));

  await t.step("encodeError() writes the header with -errno", () => {
    assert.equal(out(encodeError(buf, 7n, 38)), outHead(16, -38, 7));
  });

  await t.step("encodeHeader() alone is an empty success", () => {
    assert.equal(out(encodeHeader(buf, 9n, 0)), outHead(16, 0, 9));
  });

  await t.step("encodeInit() answers 7.45 with max_pages and max_write", () => {
    const n = encodeInit(buf, 2n, {
      minor: 45,
      maxReadahead: 131072,
      flags: 0x0040_8021,
      maxBackground: 16,
      congestionThreshold: 12,
      maxWrite: 1 << 20,
      maxPages: 256,
    });
    assert.equal(n, 80);
    assert.equal(
      out(n),
      outHead(80, 0, 2) + hex(
        new Uint8Array([
          ...u32(7),
          ...u32(45),
          ...u32(131072),
          ...u32(0x0040_8021),
          ...u16(16),
          ...u16(12),
          ...u32(1 << 20),
          ...u32(1),
          ...u16(256),
          ...u16(0),
          ...u32(0),
          ...u32(0),
          ...u16(0),
          ...new Array(22).fill(0),
        ]),
      ),
    );
  });

  await t.step("encodeEntry() carries node id, timeouts and fuse_attr", () => {
    const n = encodeEntry(buf, 4n, ATTR, 3600n);
    assert.equal(n, 16 + 128);
    assert.equal(
      out(n),
      outHead(144, 0, 4) +
        hex(
          new Uint8Array([
            ...u64(2),
            ...u64(0),
            ...u64(3600),
            ...u64(3600),
            ...u32(0),
            ...u32(0),
          ]),
        ) +
        attrHex(),
    );
  });

  await t.step("encodeAttr() carries the timeout and fuse_attr", () => {
    const n = encodeAttr(buf, 6n, ATTR, 3600n);
    assert.equal(n, 16 + 104);
    assert.equal(
      out(n),
      outHead(120, 0, 6) +
        hex(new Uint8Array([...u64(3600), ...u32(0), ...u32(0)])) + attrHex(),
    );
  });

  await t.step("encodeOpen() carries fh and FOPEN flags", () => {
    assert.equal(
      out(encodeOpen(buf, 10n, 5n, 0x41)),
      outHead(32, 0, 10) +
        hex(new Uint8Array([...u64(5), ...u32(0x41), ...u32(0)])),
    );
  });

  await t.step("encodeWrite() carries the size written", () => {
    assert.equal(
      out(encodeWrite(buf, 12n, 1 << 20)),
      outHead(24, 0, 12) + hex(new Uint8Array([...u32(1 << 20), ...u32(0)])),
    );
  });

  await t.step("encodeStatfs() reports blocks and nothing free", () => {
    assert.equal(
      out(
        encodeStatfs(buf, 14n, {
          blocks: 256n,
          bsize: 4096,
          files: 1n,
          namelen: 255,
        }),
      ),
      outHead(96, 0, 14) + hex(
        new Uint8Array([
          ...u64(256),
          ...u64(0),
          ...u64(0),
          ...u64(1),
          ...u64(0),
          ...u32(4096),
          ...u32(255),
          ...u32(4096),
          ...u32(0),
          ...new Array(24).fill(0),
        ]),
      ),
    );
  });

  const ENTRIES = [
    { ino: 1n, name: ".", type: 4 },
    { ino: 1n, name: "..", type: 4 },
    { ino: 2n, name: "nbd", type: 8 },
  ];
  const dirent = (ino: number, off: number, name: string, type: number) => {
    const padded = [...new TextEncoder().encode(name)];
    while (padded.length % 8) padded.push(0);
    return [
      ...u64(ino),
      ...u64(off),
      ...u32(name.length),
      ...u32(type),
      ...padded,
    ];
  };

  await t.step(
    "encodeReaddir() lists entries with next offsets, padded to 8",
    () => {
      const body = [
        ...dirent(1, 1, ".", 4),
        ...dirent(1, 2, "..", 4),
        ...dirent(2, 3, "nbd", 8),
      ];
      assert.equal(
        out(encodeReaddir(buf, 16n, ENTRIES, 0n, 4096)),
        outHead(16 + body.length, 0, 16) + hex(new Uint8Array(body)),
      );
    },
  );

  await t.step(
    "encodeReaddir() resumes at an offset and stops at the size",
    () => {
      assert.equal(
        out(encodeReaddir(buf, 18n, ENTRIES, 2n, 4096)),
        outHead(48, 0, 18) + hex(new Uint8Array(dirent(2, 3, "nbd", 8))),
      );
      assert.equal(
        out(encodeReaddir(buf, 20n, ENTRIES, 0n, 40)),
        outHead(48, 0, 20) + hex(new Uint8Array(dirent(1, 1, ".", 4))),
      );
      assert.equal(
        out(encodeReaddir(buf, 22n, ENTRIES, 3n, 4096)),
        outHead(16, 0, 22),
      );
    },
  );
});

import assert from "node:assert/strict";
import {
  align4,
  attrNested,
  attrString,
  attrU32,
  attrU64,
  attrU8,
  decodeAck,
  decodeFamily,
  encodeGenl,
  encodeGetFamily,
  type NetlinkMessage,
  NLMSG_ERROR,
  parseAttributes,
  parseMessages,
  refusal,
  SIZES,
} from "../../ffi/netlink/_genl.ts";
import {
  decodeIndex,
  decodeLinkDead,
  decodeStatus,
  encodeNbd,
  NBD_ATTR_DEVICE_LIST,
  NBD_ATTR_INDEX,
  NBD_CMD_CONNECT,
  NBD_CMD_DISCONNECT,
  NBD_CMD_LINK_DEAD,
  NBD_CMD_RECONFIGURE,
  NBD_CMD_STATUS,
  NBD_DEVICE_CONNECTED,
  NBD_DEVICE_INDEX,
  NBD_DEVICE_ITEM,
} from "../../ffi/netlink/_family.ts";
import { NbdKernelError, NbdSystemCallError } from "../../ffi/errors.ts";
import { libc } from "../../ffi/_libc.ts";

// ffi/ opens libc once per process and keeps it (by design): open it
// before any test, so that the resource sanitizer counts it as no test's.
libc();

function hex(s: string): Uint8Array<ArrayBuffer> {
  const clean = s.replace(/[^0-9a-f]/gi, "");
  const out = new Uint8Array(clean.length / 2);
  for (let i = 0; i < out.length; i++) {
    out[i] = parseInt(clean.slice(2 * i, 2 * i + 2), 16);
  }
  return out;
}

function only(datagram: Uint8Array): NetlinkMessage {
  const messages = parseMessages(datagram);
  assert.equal(messages.length, 1);
  return messages[0]!;
}

/** A message of the given type around a payload, as the kernel frames it. */
function frame(
  type: number,
  flags: number,
  seq: number,
  payload: Uint8Array,
): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(SIZES.nlmsghdr + payload.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, out.length, true);
  view.setUint16(4, type, true);
  view.setUint16(6, flags, true);
  view.setUint32(8, seq, true);
  view.setUint32(12, 0x7f6e, true);
  out.set(payload, SIZES.nlmsghdr);
  return out;
}

function genl(cmd: number, attributes: Uint8Array[]): Uint8Array<ArrayBuffer> {
  const body = attributes.reduce((n, a) => n + a.length, 0);
  const out = new Uint8Array(SIZES.genlmsghdr + body);
  out[0] = cmd;
  out[1] = 1;
  let at = SIZES.genlmsghdr;
  for (const a of attributes) {
    out.set(a, at);
    at += a.length;
  }
  return out;
}

/**
 * Feeds every prefix of a message's payload, framed with its own length,
 * to `decode`: each either decodes or throws NbdSystemCallError, never
 * anything else (no RangeError from a DataView read past the end).
 */
function everyCut(
  message: Uint8Array,
  decode: (m: NetlinkMessage) => unknown,
): number {
  const m = only(message);
  let refused = 0;
  for (let cut = 0; cut < m.payload.length; cut++) {
    const framed = frame(m.type, m.flags, m.seq, m.payload.subarray(0, cut));
    try {
      decode(only(framed));
    } catch (e) {
      assert.ok(
        e instanceof NbdSystemCallError && !(e instanceof NbdKernelError),
        `cut at ${cut}: ${e}`,
      );
      assert.match(e.message, /^Malformed netlink message/);
      refused++;
    }
  }
  return refused;
}

// Captured from a 6.18 kernel: CTRL_CMD_GETFAMILY "nlctrl", its reply and
// the ack (flags NLM_F_CAPPED), with NETLINK_EXT_ACK and NETLINK_CAP_ACK.
const GETFAMILY_NLCTRL = hex(
  "20000000 1000 0500 07000000 00000000 03010000 0b000200 6e6c6374726c0000",
);
const NLCTRL_REPLY = hex(
  "8800000010000000070000006e7f0000010200000b0002006e6c6374726c0000" +
    "060001001000000008000300020000000800040000000000080005000000000" +
    "02c000600140001000800010003000000080002000e00000014000200080001" +
    "000a000000080002000c0000001c0007001800010008000200100000000b000" +
    "1006e6f746966790000",
);
const NLCTRL_ACK = hex(
  "24000000 0200 0001 07000000 6e7f0000 00000000 20000000 10000500 07000000 00000000",
);
// The same request with a name longer than the policy allows: EINVAL with
// the kernel's text, capped (flags 0x0300) and not capped (0x0200).
const EINVAL_CAPPED = hex(
  "68000000 0200 0003 07000000 6e7f0000 eaffffff 34000000 10000500 07000000 00000000" +
    "27000100 417474726962757465206661696c656420706f6c6963792076616c69646174696f6e0000" +
    "08000200 14000000" + // NLMSGERR_ATTR_OFFS 20
    "14000480 08000700 0f000000 08000100 0c000000", // NLMSGERR_ATTR_POLICY
);
const EINVAL_ECHOED = hex(
  "8c000000 0200 0002 07000000 747f0000 eaffffff 34000000 10000500 07000000 00000000" +
    "03010000 1f000200 612d6e616d652d6c6f6e6765722d7468616e2d7369787465656e0000" +
    "27000100 417474726962757465206661696c656420706f6c6963792076616c69646174696f6e0000" +
    "08000200 14000000" +
    "14000480 08000700 0f000000 08000100 0c000000",
);
// An unknown family: ENOENT, no extended-ack attributes.
const ENOENT_ACK = hex(
  "24000000 0200 0001 07000000 6e7f0000 feffffff 24000000 10000500 07000000 00000000",
);

Deno.test("SIZES are the sums of the kernel's header fields", () => {
  assert.equal(SIZES.nlmsghdr, 16);
  assert.equal(SIZES.genlmsghdr, 4);
  assert.equal(SIZES.nlattr, 4);
  assert.equal(SIZES.nlmsgerr, 4);
  assert.deepEqual([0, 1, 4, 5, 8].map(align4), [0, 4, 4, 8, 8]);
});

Deno.test("encodeGetFamily() matches the captured request", () => {
  assert.deepEqual(encodeGetFamily(7, "nlctrl"), GETFAMILY_NLCTRL);
});

Deno.test("attribute encoders pad to 4 bytes and check ranges", () => {
  assert.deepEqual(attrU8(2, 1), hex("05000200 01000000"));
  assert.deepEqual(attrU32(1, 0xdeadbeef), hex("08000100 efbeadde"));
  assert.deepEqual(attrU64(2, 1n << 33n), hex("0c000200 0000000002000000"));
  assert.deepEqual(attrString(2, "nbd"), hex("08000200 6e626400"));
  assert.deepEqual(attrString(2, "abcd"), hex("09000200 6162636400000000"));
  assert.deepEqual(
    attrNested(7, [attrU32(1, 5)]),
    hex("0c000780 08000100 05000000"),
  );
  assert.throws(() => attrU32(1, -1), RangeError);
  assert.throws(() => attrU32(1, 2 ** 32), RangeError);
  assert.throws(() => attrU32(1, 1.5), RangeError);
  assert.throws(() => attrU64(1, -1n), RangeError);
  assert.throws(() => attrU64(1, 1n << 64n), RangeError);
});

Deno.test("encodeNbd() NBD_CMD_CONNECT: every attribute, in the kernel's layout", () => {
  const bytes = encodeNbd(0x1a, 42, NBD_CMD_CONNECT, {
    index: 3,
    sockets: [5, 6],
    size: 8n << 20n,
    blockSize: 4096,
    timeout: 30,
    serverFlags: 0x10d,
    clientFlags: 2,
    deadConnectionTimeout: 10,
  });
  const expected = hex(
    "80000000 1a00 0500 2a000000 00000000" + // nlmsghdr: REQUEST|ACK
      "01010000" + // NBD_CMD_CONNECT, version 1
      "08000100 03000000" + // NBD_ATTR_INDEX 3
      "0c000200 0000800000000000" + // NBD_ATTR_SIZE_BYTES 8 MiB
      "0c000300 0010000000000000" + // NBD_ATTR_BLOCK_SIZE_BYTES 4096
      "0c000400 1e00000000000000" + // NBD_ATTR_TIMEOUT 30
      "0c000500 0d01000000000000" + // NBD_ATTR_SERVER_FLAGS 0x10d
      "0c000600 0200000000000000" + // NBD_ATTR_CLIENT_FLAGS 2
      "1c000780" + // NBD_ATTR_SOCKETS, nested
      "0c000180 08000100 05000000" + // NBD_SOCK_ITEM { NBD_SOCK_FD 5 }
      "0c000180 08000100 06000000" + // NBD_SOCK_ITEM { NBD_SOCK_FD 6 }
      "0c000800 0a00000000000000", // NBD_ATTR_DEAD_CONN_TIMEOUT 10
  );
  // header, genl header, index, five u64s, two sockets, dead timeout
  assert.equal(expected.length, 16 + 4 + 8 + 5 * 12 + (4 + 2 * 12) + 12);
  assert.deepEqual(bytes, expected);
});

Deno.test("encodeNbd() DISCONNECT, RECONFIGURE and STATUS carry only what is given", () => {
  assert.deepEqual(
    encodeNbd(0x1a, 1, NBD_CMD_DISCONNECT, { index: 2 }),
    hex("1c000000 1a00 0500 01000000 00000000 02010000 08000100 02000000"),
  );
  assert.deepEqual(
    encodeNbd(0x1a, 2, NBD_CMD_RECONFIGURE, { index: 2, sockets: [9] }),
    hex(
      "2c000000 1a00 0500 02000000 00000000 03010000 08000100 02000000" +
        "10000780 0c000180 08000100 09000000",
    ),
  );
  assert.deepEqual(
    encodeNbd(0x1a, 3, NBD_CMD_STATUS, {}),
    hex("14000000 1a00 0500 03000000 00000000 05010000"),
  );
});

Deno.test("parseMessages() splits a datagram and checks every length", async (t) => {
  const datagram = new Uint8Array(NLCTRL_REPLY.length + NLCTRL_ACK.length);
  datagram.set(NLCTRL_REPLY);
  datagram.set(NLCTRL_ACK, NLCTRL_REPLY.length);
  await t.step("whole: the reply and the ack", () => {
    const [reply, ack] = parseMessages(datagram);
    assert.equal(reply?.type, 0x10);
    assert.equal(reply?.seq, 7);
    assert.equal(reply?.payload.length, 0x88 - 16);
    assert.equal(ack?.type, NLMSG_ERROR);
  });
  await t.step("every cut: whole messages or a typed error", () => {
    for (let cut = 0; cut < datagram.length; cut++) {
      const prefix = datagram.subarray(0, cut);
      if (cut === NLCTRL_REPLY.length) {
        assert.equal(parseMessages(prefix).length, 1);
        continue;
      }
      assert.throws(
        () => parseMessages(prefix),
        (e) =>
          e instanceof NbdSystemCallError &&
          /^Malformed netlink message \((datagram|header)\)/.test(e.message),
        `cut at ${cut}`,
      );
    }
  });
  await t.step("a length below the header or past the end", () => {
    const bad = NLCTRL_ACK.slice();
    new DataView(bad.buffer).setUint32(0, 15, true);
    assert.throws(() => parseMessages(bad), /says 15 bytes, 36 arrived/);
    new DataView(bad.buffer).setUint32(0, 37, true);
    assert.throws(() => parseMessages(bad), /says 37 bytes, 36 arrived/);
  });
});

Deno.test("parseAttributes() refuses lengths that run past the end", () => {
  assert.throws(
    () => parseAttributes(hex("09000200 61626364"), "test"),
    /attribute 2 says 9 bytes, 8 are left/,
  );
  assert.throws(
    () => parseAttributes(hex("03000200"), "test"),
    /attribute 2 says 3 bytes/,
  );
  assert.throws(
    () => parseAttributes(hex("0800"), "test"),
    /2 bytes left, less than an attribute header/,
  );
  // The last attribute may end without its padding.
  const [a] = parseAttributes(hex("05000200 01"), "test");
  assert.deepEqual(a?.payload, Uint8Array.of(1));
});

Deno.test("decodeFamily() reads the captured nlctrl reply", () => {
  const family = decodeFamily(parseMessages(NLCTRL_REPLY)[0]!);
  assert.equal(family.id, 0x10);
  assert.equal(family.name, "nlctrl");
  assert.equal(family.version, 2);
  assert.deepEqual([...family.groups], [["notify", 0x10]]);
  const refused = everyCut(NLCTRL_REPLY, decodeFamily);
  assert.ok(refused > 0);
});

Deno.test("decodeFamily() reads the nbd family with its multicast group", () => {
  const reply = frame(
    0x10,
    0,
    9,
    genl(1, [
      attrString(2, "nbd"),
      hex("06000100 1b000000"), // CTRL_ATTR_FAMILY_ID 0x1b
      attrU32(3, 1),
      attrU32(5, 10),
      attrNested(7, [
        attrNested(1, [attrU32(2, 0x0b), attrString(1, "nbd_mc_group")]),
      ]),
    ]),
  );
  const family = decodeFamily(only(reply));
  assert.deepEqual(family, {
    id: 0x1b,
    name: "nbd",
    version: 1,
    maxAttribute: 10,
    groups: new Map([["nbd_mc_group", 0x0b]]),
  });
  everyCut(reply, decodeFamily);
  // Without an id there is no family.
  assert.throws(
    () => decodeFamily(only(frame(0x10, 0, 9, genl(1, [attrString(2, "x")])))),
    /no CTRL_ATTR_FAMILY_ID/,
  );
  // A family id of the wrong size.
  assert.throws(
    () => decodeFamily(only(frame(0x10, 0, 9, genl(1, [attrU32(1, 0x1b)])))),
    /attribute 1 has 4 bytes, expected 2/,
  );
});

Deno.test("decodeAck() reads acks and refusals with the kernel's text", async (t) => {
  await t.step("a success ack", () => {
    assert.deepEqual(decodeAck(only(NLCTRL_ACK)), {
      errno: 0,
      message: undefined,
      offset: undefined,
      seq: 7,
    });
  });
  await t.step("ENOENT without extended-ack attributes", () => {
    const ack = decodeAck(only(ENOENT_ACK));
    assert.equal(ack.errno, 2);
    assert.equal(ack.message, undefined);
  });
  for (
    const [name, bytes] of [["capped", EINVAL_CAPPED], [
      "with the request echoed",
      EINVAL_ECHOED,
    ]] as const
  ) {
    await t.step(`EINVAL ${name}: text and offset`, () => {
      const ack = decodeAck(only(bytes));
      assert.equal(ack.errno, 22);
      assert.equal(ack.message, "Attribute failed policy validation");
      assert.equal(ack.offset, 20);
      assert.equal(ack.seq, 7);
      everyCut(bytes, decodeAck);
    });
  }
  await t.step("refusal() names the command, errno and text", () => {
    const e = refusal(
      decodeAck(only(EINVAL_CAPPED)),
      "NBD_CMD_CONNECT",
      "/dev/nbd0",
      "Cannot connect /dev/nbd0",
    );
    assert.ok(e instanceof NbdKernelError);
    assert.equal(e.errno, 22);
    assert.equal(e.errnoName, "EINVAL");
    assert.equal(e.call, "NBD_CMD_CONNECT");
    assert.equal(e.device, "/dev/nbd0");
    assert.equal(e.reason, "other");
    assert.match(
      e.message,
      /^Cannot connect \/dev\/nbd0 \(the kernel says: Attribute failed policy validation\): NBD_CMD_CONNECT failed with 22 \(EINVAL/,
    );
    const busy = refusal(
      { errno: 16, message: undefined, offset: undefined, seq: 1 },
      "NBD_CMD_CONNECT",
      "/dev/nbd1",
      "Cannot connect /dev/nbd1",
    );
    assert.equal(busy.reason, "busy");
    assert.equal(
      refusal(
        { errno: 1, message: undefined, offset: undefined, seq: 1 },
        "NBD_CMD_CONNECT",
        "",
        "x",
      ).reason,
      "permission",
    );
  });
  await t.step("cut short, or with a positive error", () => {
    assert.throws(
      () => decodeAck(only(frame(NLMSG_ERROR, 0, 1, new Uint8Array(19)))),
      /19 bytes, the error and the echoed header take 20/,
    );
    const positive = NLCTRL_ACK.slice();
    new DataView(positive.buffer).setInt32(16, 5, true);
    assert.throws(() => decodeAck(only(positive)), /positive error 5/);
    // An echoed request longer than the message.
    const long = EINVAL_ECHOED.slice();
    new DataView(long.buffer).setUint32(20, 0x200, true);
    assert.throws(() => decodeAck(only(long)), /runs past/);
  });
});

// Captured in the test guest from Debian 12's 6.1 kernel (nbds_max=6):
// the nbd family, NBD_CMD_STATUS for nbd0 and for all devices (nbd0 and
// nbd4 connected), the reply to NBD_CMD_CONNECT of nbd4, and the
// NBD_CMD_LINK_DEAD multicast for nbd2.
const NBD_FAMILY_REPLY = hex(
  "b4000000100000004f1be83232ea65b101020000080002006e62640006000100200000" +
    "0008000300010000000800040000000000080005000a0000005400060014000100080001" +
    "0001000000080002000a000000140002000800010002000000080002000a000000140003" +
    "000800010003000000080002000a000000140004000800010005000000080002000a0000" +
    "0024000700200001000800020009000000110001006e62645f6d635f67726f757000000000",
);
const STATUS_ONE = hex(
  "2c00000020000000511be83232ea65b10501000018000900140001000800010000000000" +
    "0500020001000000",
);
const STATUS_ALL = hex(
  "9000000020000000531be83232ea65b1050100007c000900" +
    "14000100080001000000000005000200010000001400010008000100010000000500020000000000" +
    "14000100080001000200000005000200000000001400010008000100030000000500020000000000" +
    "14000100080001000400000005000200010000001400010008000100050000000500020000000000",
);
const CONNECT_REPLY = hex(
  "1c00000020000000521be83232ea65b1010100000800010004000000",
);
const LINK_DEAD = hex(
  "1c000000200000000000000000000000040100000800010002000000",
);

Deno.test("the captured 6.1 messages decode", async (t) => {
  await t.step("CTRL_CMD_GETFAMILY nbd", () => {
    const family = decodeFamily(only(NBD_FAMILY_REPLY));
    assert.equal(family.id, 0x20);
    assert.equal(family.name, "nbd");
    assert.equal(family.version, 1);
    assert.equal(family.maxAttribute, 10);
    assert.deepEqual([...family.groups], [["nbd_mc_group", 9]]);
    everyCut(NBD_FAMILY_REPLY, decodeFamily);
  });
  await t.step("NBD_CMD_STATUS", () => {
    assert.deepEqual(decodeStatus(only(STATUS_ONE)), [
      { index: 0, connected: true },
    ]);
    assert.deepEqual(
      decodeStatus(only(STATUS_ALL)),
      [0, 1, 2, 3, 4, 5].map((index) => ({
        index,
        connected: index === 0 || index === 4,
      })),
    );
    everyCut(STATUS_ALL, decodeStatus);
  });
  await t.step("the NBD_CMD_CONNECT reply", () => {
    assert.equal(decodeIndex(only(CONNECT_REPLY), NBD_CMD_CONNECT), 4);
    everyCut(CONNECT_REPLY, (m) => decodeIndex(m, NBD_CMD_CONNECT));
  });
  await t.step("NBD_CMD_LINK_DEAD", () => {
    assert.deepEqual(decodeLinkDead(LINK_DEAD, 0x20), [{ index: 2 }]);
    assert.deepEqual(decodeLinkDead(LINK_DEAD, 0x21), []);
    for (let cut = 0; cut < LINK_DEAD.length; cut++) {
      assert.throws(
        () => decodeLinkDead(LINK_DEAD.subarray(0, cut), 0x20),
        NbdSystemCallError,
      );
    }
  });
});

// The nbd family's messages, framed as drivers/block/nbd.c builds them
// (genlmsg_put_reply, nla_nest_start_noflag: nests without NLA_F_NESTED).
const FAMILY = 0x1b;
const STATUS_REPLY = frame(
  FAMILY,
  0,
  5,
  genl(NBD_CMD_STATUS, [
    hex("2c000900"), // NBD_ATTR_DEVICE_LIST, 44 bytes
    hex("14000100"), // NBD_DEVICE_ITEM
    attrU32(NBD_DEVICE_INDEX, 1),
    attrU8(NBD_DEVICE_CONNECTED, 0),
    hex("14000100"),
    attrU32(NBD_DEVICE_INDEX, 0),
    attrU8(NBD_DEVICE_CONNECTED, 1),
  ]),
);

Deno.test("decodeStatus() reads the device list", () => {
  assert.deepEqual(decodeStatus(only(STATUS_REPLY)), [
    { index: 0, connected: true },
    { index: 1, connected: false },
  ]);
  everyCut(STATUS_REPLY, decodeStatus);
  // An index that does not exist: an empty list.
  const empty = frame(
    FAMILY,
    0,
    5,
    genl(NBD_CMD_STATUS, [hex("04000900")]),
  );
  assert.deepEqual(decodeStatus(only(empty)), []);
  // An item without its connected state.
  const partial = frame(
    FAMILY,
    0,
    5,
    genl(NBD_CMD_STATUS, [
      attrNested(NBD_ATTR_DEVICE_LIST, [
        attrNested(NBD_DEVICE_ITEM, [attrU32(NBD_DEVICE_INDEX, 3)]),
      ]),
    ]),
  );
  assert.throws(() => decodeStatus(only(partial)), /lacks/);
  // Another command's message.
  assert.throws(
    () => decodeStatus(only(frame(FAMILY, 0, 5, genl(NBD_CMD_CONNECT, [])))),
    /command 1/,
  );
});

Deno.test("decodeIndex() reads the connect reply", () => {
  const reply = frame(
    FAMILY,
    0,
    8,
    genl(NBD_CMD_CONNECT, [attrU32(NBD_ATTR_INDEX, 4)]),
  );
  assert.equal(decodeIndex(only(reply), NBD_CMD_CONNECT), 4);
  everyCut(reply, (m) => decodeIndex(m, NBD_CMD_CONNECT));
  assert.throws(
    () =>
      decodeIndex(
        only(frame(FAMILY, 0, 8, genl(NBD_CMD_CONNECT, []))),
        NBD_CMD_CONNECT,
      ),
    /no NBD_ATTR_INDEX/,
  );
  assert.throws(
    () => decodeIndex(only(reply), NBD_CMD_STATUS),
    /command 1 \(NBD_CMD_CONNECT\)/,
  );
});

Deno.test("decodeLinkDead() picks the nbd family's LINK_DEAD out of a datagram", () => {
  const dead = (index: number) =>
    frame(FAMILY, 0, 0, genl(NBD_CMD_LINK_DEAD, [attrU32(1, index)]));
  const other = frame(0x1c, 0, 0, genl(NBD_CMD_LINK_DEAD, [attrU32(1, 9)]));
  const status = STATUS_REPLY;
  const overrun = frame(4, 0, 0, new Uint8Array(0));
  const parts = [dead(2), other, status, overrun, dead(0)];
  const datagram = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    datagram.set(p, at);
    at += p.length;
  }
  assert.deepEqual(decodeLinkDead(datagram, FAMILY), [
    { index: 2 },
    { overrun: true },
    { index: 0 },
  ]);
  everyCut(dead(3), (m) => decodeIndex(m, NBD_CMD_LINK_DEAD));
  assert.throws(
    () =>
      decodeLinkDead(
        frame(FAMILY, 0, 0, genl(NBD_CMD_LINK_DEAD, [])),
        FAMILY,
      ),
    /no NBD_ATTR_INDEX/,
  );
});

Deno.test("encodeGenl() always asks for an ack", () => {
  const bytes = encodeGenl({
    family: 0x20,
    cmd: 9,
    version: 2,
    seq: 0xffffffff,
    attributes: [],
    flags: 0x300,
  });
  assert.deepEqual(
    bytes,
    hex("14000000 2000 0503 ffffffff 00000000 09020000"),
  );
});

import assert from "node:assert/strict";
import { GenlSocket, resolveFamily } from "../../ffi/netlink/_socket.ts";
import {
  attrString,
  CTRL_ATTR_FAMILY_NAME,
  CTRL_CMD_GETFAMILY,
  decodeFamily,
  encodeGenl,
  encodeGetFamily,
  GENL_ID_CTRL,
} from "../../ffi/netlink/_genl.ts";
import { NbdKernelError } from "../../ffi/errors.ts";
import { netlinkAvailable } from "../../ffi/netlink/mod.ts";
import { libc } from "../../ffi/_libc.ts";

// ffi/ opens libc once per process and keeps it (by design): open it
// before any test, so that the resource sanitizer counts it as no test's.
libc();

// The host kernel has no nbd driver, but every Linux has the generic
// netlink controller: the socket path is checked against it.

Deno.test("GenlSocket.request() resolves the controller's own family", async () => {
  const socket = GenlSocket.open();
  try {
    const seq = socket.nextSeq();
    const replies = await socket.request(
      encodeGetFamily(seq, "nlctrl"),
      seq,
      "CTRL_CMD_GETFAMILY",
      "",
      "Resolving nlctrl",
    );
    assert.equal(replies.length, 1);
    const family = decodeFamily(replies[0]!);
    assert.equal(family.id, GENL_ID_CTRL);
    assert.equal(family.name, "nlctrl");
    assert.ok(family.groups.has("notify"));
  } finally {
    socket.close();
  }
});

Deno.test("GenlSocket.request() turns a refusal into NbdKernelError with the kernel's text", async () => {
  const socket = GenlSocket.open();
  try {
    const seq = socket.nextSeq();
    // Longer than the policy's GENL_NAMSIZ: refused by validation, which
    // says why in an extended ack.
    const request = encodeGenl({
      family: GENL_ID_CTRL,
      cmd: CTRL_CMD_GETFAMILY,
      version: 1,
      seq,
      attributes: [attrString(CTRL_ATTR_FAMILY_NAME, "x".repeat(40))],
    });
    await assert.rejects(
      socket.request(request, seq, "CTRL_CMD_GETFAMILY", "", "Resolving"),
      (e) =>
        e instanceof NbdKernelError && e.errno === 22 &&
        e.call === "CTRL_CMD_GETFAMILY" &&
        /^Resolving \(the kernel says: .+\): CTRL_CMD_GETFAMILY failed with 22 \(EINVAL/
          .test(e.message),
    );
    // The socket is still in step: the next request gets its own answer.
    const next = socket.nextSeq();
    const replies = await socket.request(
      encodeGetFamily(next, "nlctrl"),
      next,
      "CTRL_CMD_GETFAMILY",
      "",
      "Resolving nlctrl",
    );
    assert.equal(decodeFamily(replies[0]!).name, "nlctrl");
  } finally {
    socket.close();
  }
});

Deno.test("netlinkAvailable() agrees with resolving the nbd family", async () => {
  const socket = GenlSocket.open();
  let family;
  try {
    family = await resolveFamily(socket);
  } finally {
    socket.close();
  }
  assert.equal(await netlinkAvailable(), family !== null);
  if (family) {
    assert.equal(family.name, "nbd");
    assert.ok(family.groups.has("nbd_mc_group"));
  }
});

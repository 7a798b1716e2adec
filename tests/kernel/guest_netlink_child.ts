/**
 * Run in the guest by guest_netlink.ts: connects a device over netlink,
 * says "up" on stdout, then waits to be killed. It shows what outlives the
 * process on the netlink path.
 *
 * Usage: deno run -A tests/kernel/guest_netlink_child.ts SOCKET INDEX
 *
 * @module
 */

import { FLAG_HAS_FLAGS } from "../../lib/constants.ts";
import { negotiate } from "../../lib/_handshake.ts";
import { Transport } from "../../lib/transport.ts";
import { FdStream } from "../../ffi/_fd_stream.ts";
import { libc } from "../../ffi/_libc.ts";
import { connectSocket } from "../../ffi/_socket.ts";
import { connectDevice } from "../../ffi/netlink/mod.ts";

const [path, index] = Deno.args;
if (!path || !index) throw new Error("usage: SOCKET INDEX");
const stream = new FdStream(await connectSocket({ path }));
const info = await negotiate(new Transport(stream), {
  structuredReplies: false,
  extendedHeaders: false,
  metaContexts: [],
  blockSizes: true,
});
const fd = stream.release();
await connectDevice({
  index: Number(index),
  sockets: [fd],
  size: (info.size / 4096n) * 4096n,
  blockSize: 4096,
  serverFlags: FLAG_HAS_FLAGS | info.flags,
});
libc().close(fd);
console.log("up");
// Killed by the parent; the bound only keeps a lost child from lingering.
await new Promise((resolve) => setTimeout(resolve, 120_000));

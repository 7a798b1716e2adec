/**
 * Run in the guest: attaches a Unix-socket export through the relay path
 * (over TLS when given a certificate directory, else a plain relay by
 * request), writes and reads through the device with dd, disconnects with
 * `disconnect()`, and prints one JSON line for guest.sh.
 *
 * With `KT_MODE=ioctl` in the environment it attaches with `netlink: false`.
 *
 * Usage: deno run -A tests/kernel/guest_relay.ts SOCKET DEVICE PATTERN [CERTDIR]
 *
 * @module
 */

import { attach, isAttached } from "../../ffi/mod.ts";

const [socket, device, pattern, certificates] = Deno.args;
if (!socket || !device || !pattern) {
  throw new Error("usage: guest_relay.ts SOCKET DEVICE PATTERN");
}
const out: Record<string, unknown> = {};

async function run(cmd: string, args: string[]): Promise<boolean> {
  const r = await new Deno.Command(cmd, { args, stderr: "piped" }).output();
  if (!r.success) out[`${cmd}-error`] = new TextDecoder().decode(r.stderr);
  return r.success;
}

const started = performance.now();
const ms = () => Math.round(performance.now() - started);
const dev = await attach(
  certificates
    ? {
      path: socket,
      tls: "require",
      tlsCertificates: certificates,
      tlsHostname: "localhost",
    }
    : { path: socket },
  device,
  {
    relay: true,
    handleSignals: false,
    timeout: 30,
    ...(Deno.env.get("KT_MODE") === "ioctl" ? { netlink: false } : {}),
  },
);
out.route = dev.route;
out.kernelInterface = dev.kernelInterface;
out.size = dev.size;
out.tls = dev.info.tls;
out.attachMs = ms();
const copy = `${pattern}.relay`;
const wrote = await run("timeout", [
  "60",
  "dd",
  `if=${pattern}`,
  `of=${device}`,
  "bs=1M",
  "count=1",
  "oflag=direct",
  "conv=fsync",
  "status=none",
]);
const read = await run("timeout", [
  "60",
  "dd",
  `if=${device}`,
  `of=${copy}`,
  "bs=1M",
  "count=1",
  "iflag=direct",
  "status=none",
]);
// 1 MiB: every byte crosses this process twice, slowly under emulation.
const a = (await Deno.readFile(pattern)).subarray(0, 1 << 20);
const b = read ? await Deno.readFile(copy) : new Uint8Array();
out.io = wrote && read && a.length === b.length &&
  a.every((v, i) => v === b[i]);
out.ioMs = ms();
const release = await dev.disconnect();
out.disconnectMs = ms();
out.reason = release.reason;
out.requested = release.requested;
const deadline = Date.now() + 20_000;
while (isAttached(device) && Date.now() < deadline) {
  await new Promise((r) => setTimeout(r, 50));
}
out.free = !isAttached(device);
console.log(JSON.stringify(out));

/**
 * `connect`: attach an NBD export to a Linux nbd device and stay in the
 * foreground until interrupted, as `nbd-client` and `qemu-nbd -c` do;
 * detach a device with `-d`, list devices with `-l`, check one with `-c`.
 *
 * ```sh
 * deno run --allow-net --allow-ffi examples/connect.ts nbd://127.0.0.1/disk /dev/nbd0
 * deno run --allow-net --allow-ffi examples/connect.ts -C 2 --persist nbd://127.0.0.1/disk
 * deno run --allow-net --allow-ffi examples/connect.ts -d /dev/nbd0
 * ```
 *
 * These two permissions are all it needs for TCP and Unix-socket exports:
 * devices and sysfs are reached through libc. TLS exports with a
 * certificate directory also need `--allow-read` for the certificates.
 * Attaching needs root.
 *
 * The kernel is told through netlink where it has the `nbd` family (then
 * a device on the direct route outlives this process), else, or with
 * `--no-netlink`, through ioctls. SIGINT and SIGTERM disconnect cleanly
 * and exit 0. If the server goes away (with `--persist`: and does not come
 * back), the device is released and the exit status is 1. Errors are one
 * line on stderr.
 *
 * @module
 */

import {
  attach,
  type AttachOptions,
  detach,
  type DeviceStatus,
  isAttached,
  status,
} from "../ffi/mod.ts";
import {
  errorLine,
  type OptionSpec,
  parseArgs,
  parseCount,
  parseSize,
  UsageError,
  VERSION_OPTION,
  versionText,
  visible,
  warn,
  warnUsage,
} from "./_cli.ts";

const USAGE = `Usage:
  connect [OPTIONS] URI [DEVICE]   attach the export to DEVICE (default: a
                                   free /dev/nbdN) until interrupted
  connect -d DEVICE                detach DEVICE (as nbd-client -d)
  connect -l                       list the nbd devices and their state
  connect -c DEVICE                exit 0 if DEVICE is attached, 1 if not

Options:
  -r, --read-only                  make the device read-only
  -t, --timeout SECONDS            request timeout of the kernel
  -b, --block-size SIZE            logical block size, 512 to the page size
  -C, --connections N              N connections (the export must allow
                                   multi-conn; needs netlink)
      --persist                    when the server goes away, dial again
                                   and carry on; I/O waits meanwhile
      --dead-timeout SECONDS       how long I/O waits for a dead connection
                                   to be replaced (default 60 with
                                   --persist, else 0)
      --no-netlink                 use the ioctl interface (one connection;
                                   the device goes with this process)
      --tls                        require TLS (as nbds:// does)
      --tls-certificates DIR       ca-cert.pem [client-cert.pem client-key.pem]
      --tls-hostname NAME          name the server certificate must carry
      --tls-verify-peer=false      accept any server certificate
      --debug                      trace the handshake and kernel calls
  -h, --help                       this text
  -V, --version                    print the version and exit`;

const SPECS: OptionSpec[] = [
  { name: "disconnect", kind: "value", short: "d" },
  { name: "list", kind: "flag", short: "l" },
  { name: "check", kind: "value", short: "c" },
  { name: "connections", kind: "value", short: "C" },
  { name: "persist", kind: "flag" },
  { name: "dead-timeout", kind: "value" },
  { name: "no-netlink", kind: "flag" },
  { name: "read-only", kind: "flag", short: "r" },
  { name: "timeout", kind: "value", short: "t" },
  { name: "block-size", kind: "value", short: "b" },
  { name: "tls", kind: "flag" },
  { name: "tls-certificates", kind: "value" },
  { name: "tls-hostname", kind: "value" },
  { name: "tls-verify-peer", kind: "value" },
  { name: "debug", kind: "flag" },
  { name: "help", kind: "flag", short: "h" },
  VERSION_OPTION,
];

/** One line on stdout; what a server or the kernel said is shown escaped. */
function say(line: string): void {
  Deno.stdout.writeSync(new TextEncoder().encode(visible(line) + "\n"));
}

/**
 * Runs the tool: attaches and waits for the release, or detaches with `-d`.
 *
 * @param args Command-line arguments, without the program name.
 * @returns The exit status: 0 after a requested disconnect (SIGINT/SIGTERM),
 *   a detach, a list, or a check of an attached device; 1 on failure, when
 *   the server went away, for a device `-c` finds free, for `-l` with no
 *   nbd devices, or for a usage mistake (as `info` and `copy`).
 */
export async function main(args: string[]): Promise<number> {
  try {
    return await run(args);
  } catch (e) {
    if (e instanceof UsageError) {
      warnUsage("connect", e);
      return 1;
    }
    warn(errorLine("connect", e));
    return 1;
  }
}

async function run(args: string[]): Promise<number> {
  const { options, positionals } = parseArgs(args, SPECS);
  if (options.has("help")) {
    Deno.stdout.writeSync(new TextEncoder().encode(USAGE + "\n"));
    return 0;
  }
  if (options.has("version")) {
    Deno.stdout.writeSync(new TextEncoder().encode(versionText("connect")));
    return 0;
  }
  const noNetlink = options.has("no-netlink");
  const detachDevice = options.get("disconnect");
  if (typeof detachDevice === "string") {
    if (positionals.length > 0) {
      throw new UsageError("-d takes only the device");
    }
    const was = await detach(
      detachDevice,
      noNetlink ? { netlink: false } : {},
    );
    if (!was) warn(`connect: ${detachDevice} was not attached`);
    return 0;
  }
  if (options.has("list")) {
    if (positionals.length > 0) throw new UsageError("-l takes no arguments");
    const devices = await status();
    if (devices.length === 0) {
      warn(
        "connect: no nbd devices; is the nbd module loaded? Try: modprobe nbd",
      );
      return 1;
    }
    for (const d of devices) say(statusLine(d));
    return 0;
  }
  const checkDevice = options.get("check");
  if (typeof checkDevice === "string") {
    if (positionals.length > 0) {
      throw new UsageError("-c takes only the device");
    }
    const attached = isAttached(checkDevice);
    say(`${checkDevice}: ${attached ? "attached" : "not attached"}`);
    return attached ? 0 : 1;
  }
  if (positionals.length < 1 || positionals.length > 2) {
    throw new UsageError("expected a URI and a device");
  }
  const uri = positionals[0]!;
  const device = positionals[1];

  const attachOptions: AttachOptions = {};
  if (noNetlink) attachOptions.netlink = false;
  const connections = options.get("connections");
  if (typeof connections === "string") {
    attachOptions.connections = parseCount(connections, "--connections", 1, 64);
  }
  if (options.has("persist")) attachOptions.persist = true;
  const dead = options.get("dead-timeout");
  if (typeof dead === "string") {
    attachOptions.deadConnectionTimeout = parseCount(
      dead,
      "--dead-timeout",
      0,
      0xffffffff,
    );
  }
  if (noNetlink) {
    const needs = (attachOptions.connections ?? 1) > 1
      ? "--connections above 1"
      : attachOptions.persist
      ? "--persist"
      : attachOptions.deadConnectionTimeout !== undefined
      ? "--dead-timeout"
      : undefined;
    if (needs) {
      throw new UsageError(
        `${needs} needs netlink; --no-netlink takes one connection and cannot persist`,
      );
    }
  }
  if (options.has("read-only")) attachOptions.readOnly = true;
  const timeout = options.get("timeout");
  if (typeof timeout === "string") {
    attachOptions.timeout = parseCount(timeout, "--timeout", 0, 0xffffffff);
  }
  const blockSize = options.get("block-size");
  if (typeof blockSize === "string") {
    attachOptions.blockSize = parseSize(blockSize, "--block-size");
  }
  if (options.has("tls")) attachOptions.tls = "require";
  const certs = options.get("tls-certificates");
  if (typeof certs === "string") attachOptions.tlsCertificates = certs;
  const hostname = options.get("tls-hostname");
  if (typeof hostname === "string") attachOptions.tlsHostname = hostname;
  const verify = options.get("tls-verify-peer");
  if (typeof verify === "string") {
    if (verify !== "true" && verify !== "false") {
      throw new UsageError("--tls-verify-peer takes true or false");
    }
    attachOptions.tlsVerifyPeer = verify === "true";
  }
  if (options.has("debug")) attachOptions.debug = true;

  const dev = await attach(uri, device, attachOptions);
  const how: string[] = [dev.route, dev.kernelInterface];
  if (dev.connections > 1) how.push(`${dev.connections} connections`);
  if (attachOptions.persist) how.push("persist");
  say(
    `${dev.device}: attached ${dev.size} bytes, block size ${dev.blockSize}, ${
      dev.readOnly ? "read-only" : "read-write"
    } (${how.join(", ")})`,
  );
  const release = await dev.closed;
  if (release.requested && release.reason === "disconnect") {
    say(release.message);
    return 0;
  }
  warn(`connect: ${release.message}`);
  return 1;
}

function statusLine(d: DeviceStatus): string {
  if (!d.connected) return `${d.device}: free`;
  const pid = d.pid === null ? "" : `, pid ${d.pid}`;
  return `${d.device}: connected, ${d.size} bytes${pid}`;
}

if (import.meta.main) Deno.exit(await main(Deno.args));

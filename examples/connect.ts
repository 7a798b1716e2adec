/**
 * `connect`: attach an NBD export to a Linux nbd device and stay in the
 * foreground until interrupted, as `nbd-client` and `qemu-nbd -c` do; or
 * detach a device with `-d`.
 *
 * ```sh
 * deno run --allow-net --allow-ffi examples/connect.ts nbd://127.0.0.1/disk /dev/nbd0
 * deno run --allow-net --allow-ffi examples/connect.ts -d /dev/nbd0
 * ```
 *
 * These two permissions are all it needs for TCP and Unix-socket exports:
 * devices and sysfs are reached through libc. TLS exports with a
 * certificate directory also need `--allow-read` for the certificates.
 * Attaching needs root.
 *
 * SIGINT and SIGTERM disconnect cleanly and exit 0. If the server goes
 * away, the device is released and the exit status is 1. Errors are one
 * line on stderr.
 *
 * @module
 */

import {
  attach,
  type AttachOptions,
  detach,
  findFreeDevice,
} from "../ffi/mod.ts";
import {
  errorLine,
  type OptionSpec,
  parseArgs,
  parseCount,
  parseSize,
  UsageError,
  warn,
  warnUsage,
} from "./_cli.ts";

const USAGE = `Usage:
  connect [OPTIONS] URI [DEVICE]   attach the export to DEVICE (default: the
                                   first free /dev/nbdN) until interrupted
  connect -d DEVICE                detach DEVICE (as nbd-client -d)

Options:
  -r, --read-only                  make the device read-only
  -t, --timeout SECONDS            request timeout of the kernel
  -b, --block-size SIZE            logical block size, 512 to the page size
      --tls                        require TLS (as nbds:// does)
      --tls-certificates DIR       ca-cert.pem [client-cert.pem client-key.pem]
      --tls-hostname NAME          name the server certificate must carry
      --tls-verify-peer=false      accept any server certificate
      --debug                      trace the handshake and kernel calls
  -h, --help                       this text`;

const SPECS: OptionSpec[] = [
  { name: "disconnect", kind: "value", short: "d" },
  { name: "read-only", kind: "flag", short: "r" },
  { name: "timeout", kind: "value", short: "t" },
  { name: "block-size", kind: "value", short: "b" },
  { name: "tls", kind: "flag" },
  { name: "tls-certificates", kind: "value" },
  { name: "tls-hostname", kind: "value" },
  { name: "tls-verify-peer", kind: "value" },
  { name: "debug", kind: "flag" },
  { name: "help", kind: "flag", short: "h" },
];

function say(line: string): void {
  Deno.stdout.writeSync(new TextEncoder().encode(line + "\n"));
}

/**
 * Runs the tool: attaches and waits for the release, or detaches with `-d`.
 *
 * @param args Command-line arguments, without the program name.
 * @returns The exit status: 0 after a requested disconnect (SIGINT/SIGTERM)
 *   or a detach; 1 on failure, when the server went away, or for a usage
 *   mistake (as `info` and `copy`).
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
    say(USAGE);
    return 0;
  }
  const detachDevice = options.get("disconnect");
  if (typeof detachDevice === "string") {
    if (positionals.length > 0) {
      throw new UsageError("-d takes only the device");
    }
    const was = await detach(detachDevice);
    if (!was) warn(`connect: ${detachDevice} was not attached`);
    return 0;
  }
  if (positionals.length < 1 || positionals.length > 2) {
    throw new UsageError("expected a URI and a device");
  }
  const uri = positionals[0]!;
  const device = positionals[1] ?? findFreeDevice();

  const attachOptions: AttachOptions = {};
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
  say(
    `${dev.device}: attached ${dev.size} bytes, block size ${dev.blockSize}, ${
      dev.readOnly ? "read-only" : "read-write"
    } (${dev.route})`,
  );
  const release = await dev.closed;
  if (release.requested && release.reason === "disconnect") {
    say(release.message);
    return 0;
  }
  warn(`connect: ${release.message}`);
  return 1;
}

if (import.meta.main) Deno.exit(await main(Deno.args));

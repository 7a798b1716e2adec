/**
 * `fuse`: an NBD export as one file in a FUSE mount, as libnbd's `nbdfuse`
 * does, for machines whose kernel has no nbd module (containers, WSL,
 * many cloud kernels) but has FUSE. `losetup` on the file gives a block
 * device to partition, `mkfs` and mount.
 *
 * ```sh
 * mkdir -p /mnt/nbd
 * deno run -A examples/fuse.ts -P /run/fuse.pid /mnt/nbd nbd://127.0.0.1/disk &
 * # once /run/fuse.pid exists, /mnt/nbd/nbd serves:
 * losetup -f --show /mnt/nbd/nbd
 * fusermount3 -u /mnt/nbd        # or umount, or SIGINT/SIGTERM: exit 0
 * ```
 *
 * Needs root (it calls `mount(2)` itself; no libfuse) and
 * `--allow-ffi --allow-read --allow-write --allow-net` (plus `--allow-run`
 * for a `[ CMD ]` server), or `-A`. Stays in the
 * foreground until the file system is unmounted. Errors are one line on
 * stderr; a busy or stale mount point names the fix (`fusermount3 -u`).
 *
 * @module
 */

import { connect, type ConnectOptions, type NbdClient } from "../mod.ts";
import {
  type FuseCacheMode,
  type FuseMount,
  type FuseOptions,
  mountFuse,
} from "../ffi/mod.ts";
import {
  checkParentDirectory,
  errorLine,
  type OptionSpec,
  parseArgs,
  parseCount,
  serverCommand,
  tlsEngineOption,
  UsageError,
  VERSION_OPTION,
  versionText,
  warn,
  warnUsage,
} from "./_cli.ts";

const USAGE = `Usage:
  fuse [OPTIONS] MOUNTPOINT[/FILENAME] URI
  fuse [OPTIONS] MOUNTPOINT[/FILENAME] [ CMD ARGS ... ]

Mounts the export as one file, MOUNTPOINT/nbd (or MOUNTPOINT/FILENAME), in
a FUSE file system, and serves it until unmounted (fusermount3 -u, umount,
SIGINT or SIGTERM: exit 0). Needs root.

Options:
  -C, --connections N      N connections when the export allows multi-conn
  -P, --pidfile FILE       write the process id to FILE once the file serves
  -r, --readonly           read-only file (also for a read-only export)
      --reconnect          hold requests while a lost connection is dialled
                           again, instead of failing them with EIO
      --direct-io          no page cache: every read and write goes to the
                           server as issued
      --kernel-cache       keep the page cache across opens (only when
                           nothing else writes to the export)
      --in-flight N        requests in flight at once (default 16)
      --readahead KIB      read-ahead of buffered reads (default 1024;
                           0 keeps the kernel's 128)
  -v, --verbose            trace each FUSE request to stderr
  -h, --help               this text
  -V, --version            print the version and exit`;

const SPECS: OptionSpec[] = [
  { name: "connections", kind: "value", short: "C" },
  { name: "pidfile", kind: "value", short: "P" },
  { name: "readonly", kind: "flag", short: "r" },
  { name: "read-only", kind: "flag" },
  { name: "reconnect", kind: "flag" },
  { name: "direct-io", kind: "flag" },
  { name: "kernel-cache", kind: "flag" },
  { name: "in-flight", kind: "value" },
  { name: "readahead", kind: "value" },
  { name: "verbose", kind: "flag", short: "v" },
  { name: "help", kind: "flag", short: "h" },
  VERSION_OPTION,
];

const encoder = new TextEncoder();

function say(text: string): void {
  Deno.stdout.writeSync(encoder.encode(text));
}

/**
 * Runs the tool: mounts and serves until the file system is unmounted.
 *
 * @param args Command-line arguments, without the program name.
 * @returns The exit status: 0 after an unmount (fusermount3 -u, umount,
 *   SIGINT, SIGTERM), `--help` or `--version`; 1 on a usage mistake, a
 *   failure to mount, or when the server went away.
 */
export async function main(args: string[]): Promise<number> {
  try {
    return await run(args);
  } catch (e) {
    if (e instanceof UsageError) {
      warnUsage("fuse", e);
      return 1;
    }
    warn(errorLine("fuse", e));
    return 1;
  }
}

async function run(args: string[]): Promise<number> {
  const { options, positionals, commands } = parseArgs(args, SPECS);
  if (options.has("help")) {
    say(USAGE + "\n");
    return 0;
  }
  if (options.has("version")) {
    say(versionText("fuse"));
    return 0;
  }
  if (positionals.length !== 2) {
    throw new UsageError(
      "expected MOUNTPOINT[/FILENAME] and a URI or [ CMD ARGS ... ]",
    );
  }
  if (commands[0]) {
    throw new UsageError("the mount point comes first, then the export");
  }
  if (options.has("direct-io") && options.has("kernel-cache")) {
    throw new UsageError("--direct-io and --kernel-cache exclude each other");
  }
  const target = positionals[0]!;
  const connectOptions: ConnectOptions = {};
  const connections = options.get("connections");
  if (typeof connections === "string") {
    connectOptions.connections = parseCount(
      connections,
      "--connections",
      1,
      16,
    );
  }
  if (options.has("reconnect")) connectOptions.reconnect = true;
  const fuseOptions: FuseOptions = {};
  if (options.has("readonly") || options.has("read-only")) {
    fuseOptions.readOnly = true;
  }
  const cache: FuseCacheMode = options.has("direct-io")
    ? "direct"
    : options.has("kernel-cache")
    ? "kernel"
    : "coherent";
  fuseOptions.cache = cache;
  const inFlight = options.get("in-flight");
  if (typeof inFlight === "string") {
    fuseOptions.inFlight = parseCount(inFlight, "--in-flight", 1, 256);
  }
  const readahead = options.get("readahead");
  if (typeof readahead === "string") {
    fuseOptions.readahead = parseCount(readahead, "--readahead", 0, 65536);
  }
  if (options.has("verbose")) {
    fuseOptions.debug = (event, fields) =>
      warn(`fuse: ${event} ${JSON.stringify(fields, bigints)}`);
  }
  const pidfile = options.get("pidfile");
  if (typeof pidfile === "string") {
    // Checked before anything is mounted: a pid file that cannot be
    // written would leave a mount nobody was told about.
    checkParentDirectory(`--pidfile ${pidfile}`, pidfile);
  }

  const command = commands[1];
  let client: NbdClient;
  if (command) {
    const server = serverCommand(command);
    client = await connect({ ...connectOptions, ...server.options });
  } else {
    client = await connect(positionals[1]!, {
      ...await tlsEngineOption(positionals[1]),
      ...connectOptions,
    });
  }
  let mount: FuseMount | undefined;
  const stop = (): void => {
    void mount?.unmount();
  };
  try {
    mount = await mountFuse(client, target, fuseOptions);
    Deno.addSignalListener("SIGINT", stop);
    Deno.addSignalListener("SIGTERM", stop);
    if (typeof pidfile === "string") {
      // Written whole under another name, then renamed: a reader never sees
      // a half-written pid. Failing, the mount goes before the error.
      const tmp = `${pidfile}.tmp${Deno.pid}`;
      try {
        Deno.writeTextFileSync(tmp, `${Deno.pid}\n`);
        Deno.renameSync(tmp, pidfile);
      } catch (e) {
        await mount.unmount();
        throw new Error(
          `Cannot write the pid file ${pidfile}: ${
            e instanceof Error ? e.message : String(e)
          }`,
        );
      }
    }
    const end = await mount.closed;
    if (end.reason === "unmounted") return 0;
    warn(errorLine("fuse", end.error ?? new Error(end.reason)));
    return 1;
  } finally {
    if (mount) {
      Deno.removeSignalListener("SIGINT", stop);
      Deno.removeSignalListener("SIGTERM", stop);
    }
    await client.close().catch(() => {});
  }
}

function bigints(_key: string, value: unknown): unknown {
  return typeof value === "bigint" ? Number(value) : value;
}

if (import.meta.main) Deno.exit(await main(Deno.args));

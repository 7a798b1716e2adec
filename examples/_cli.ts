/**
 * What the command-line tools share: option parsing in the getopt_long
 * manner, sizes in words, a progress reporter, and the one-line error.
 *
 * Private to `examples/` (the leading `_`).
 *
 * @module
 */

import manifest from "../deno.json" with { type: "json" };
import type { TlsEngine } from "../mod.ts";

/** How an option takes its value. */
export type OptionKind =
  /** `--json`: present or not. */
  | "flag"
  /** `--connections=4`, `--connections 4`, `-C 4`, `-C4`. */
  | "value"
  /** `--map` or `--map=CONTEXT`; never takes the next word. */
  | "optional";

/** One option a tool accepts. */
export interface OptionSpec {
  /** Long name, without the dashes. */
  name: string;
  /** How it takes a value. */
  kind: OptionKind;
  /** One-letter alias, without the dash. */
  short?: string;
}

/** What {@linkcode parseArgs} found. */
export interface ParsedArgs {
  /**
   * Options by long name. A flag maps to `true`; an optional-value option
   * given bare maps to `true`; anything with a value maps to the last value.
   */
  options: Map<string, string | true>;
  /**
   * Words that are not options, in order. A server command, `[ CMD ARGS … ]`,
   * is one positional written as its words joined by spaces, brackets
   * included.
   */
  positionals: string[];
  /**
   * For each positional, the words of its server command between `[` and
   * `]`, or `undefined` for an ordinary word.
   */
  commands: Array<string[] | undefined>;
  /** Long names of the options, one per occurrence, in the order given. */
  order: string[];
}

/** A mistake on the command line; tools print it with their usage hint. */
export class UsageError extends Error {
  /** @param message What is wrong with the arguments. */
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/**
 * Parses arguments the way getopt_long does for the tools it imitates:
 * options may come before or after positionals, `--` ends the options, and
 * a lone `-` is a positional (stdin or stdout). A `[` word starts a server
 * command, as nbdinfo and nbdcopy take it (`[ qemu-nbd -r -f qcow2 x.qcow2 ]`):
 * every word up to the next `]` is the command's, options included, with or
 * without a `--` before it.
 *
 * @param args The arguments, without the program name.
 * @param specs The options the tool accepts.
 * @returns Options by long name and the positionals.
 * @throws {UsageError} On an unknown option, a missing value, or a `[`
 *   without its `]` or with nothing inside.
 */
export function parseArgs(args: string[], specs: OptionSpec[]): ParsedArgs {
  const byName = new Map(specs.map((s) => [s.name, s]));
  const byShort = new Map(
    specs.filter((s) => s.short).map((s) => [s.short!, s]),
  );
  const options = new Map<string, string | true>();
  const positionals: string[] = [];
  const commands: Array<string[] | undefined> = [];
  const order: string[] = [];
  /** Takes the command that starts at `args[i]`; returns the index of `]`. */
  const command = (i: number): number => {
    const end = args.indexOf("]", i + 1);
    if (end === -1) {
      throw new UsageError("a server command starts with [ but has no ]");
    }
    const words = args.slice(i + 1, end);
    if (words.length === 0 || words[0] === "") {
      throw new UsageError("a server command [ ... ] needs a program");
    }
    positionals.push(["[", ...words, "]"].join(" "));
    commands.push(words);
    return end;
  };
  const set = (name: string, value: string | true) => {
    options.set(name, value);
    order.push(name);
  };

  let optionsEnded = false;
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (arg === "[") {
      i = command(i);
      continue;
    }
    if (optionsEnded) {
      positionals.push(arg);
      commands.push(undefined);
      continue;
    }
    if (arg === "--") {
      optionsEnded = true;
      continue;
    }
    if (arg.startsWith("--")) {
      const eq = arg.indexOf("=");
      const name = eq === -1 ? arg.slice(2) : arg.slice(2, eq);
      const inline = eq === -1 ? undefined : arg.slice(eq + 1);
      const spec = byName.get(name);
      if (!spec) throw new UsageError(`unknown option --${name}`);
      if (spec.kind === "flag") {
        if (inline !== undefined) {
          throw new UsageError(`option --${name} takes no value`);
        }
        set(name, true);
      } else if (spec.kind === "optional") {
        set(name, inline ?? true);
      } else if (inline !== undefined) {
        set(name, inline);
      } else {
        const next = args[++i];
        if (next === undefined) {
          throw new UsageError(`option --${name} needs a value`);
        }
        set(name, next);
      }
      continue;
    }
    if (arg.startsWith("-") && arg !== "-") {
      // A cluster of short flags ("-pv"), the last of which may take a value.
      for (let j = 1; j < arg.length; j++) {
        const letter = arg[j]!;
        const spec = byShort.get(letter);
        if (!spec) throw new UsageError(`unknown option -${letter}`);
        if (spec.kind !== "value") {
          set(spec.name, true);
          continue;
        }
        const rest = arg.slice(j + 1);
        if (rest) {
          set(spec.name, rest);
        } else {
          const next = args[++i];
          if (next === undefined) {
            throw new UsageError(`option -${letter} needs a value`);
          }
          set(spec.name, next);
        }
        break;
      }
      continue;
    }
    positionals.push(arg);
    commands.push(undefined);
  }
  return { options, positionals, commands, order };
}

/**
 * A server the tool starts itself, named on the command line as
 * `[ CMD ARGS … ]`.
 */
export interface ServerCommand {
  /** The program and its arguments. */
  argv: string[];
  /** The command as it is shown in messages: `[ nbdkit -s memory 1G ]`. */
  text: string;
  /**
   * What `connect()` needs to start it: over its stdin and stdout for
   * `nbdkit -s` and programs the library cannot start on a socket, on a
   * private Unix socket (systemd socket activation's way) for `qemu-nbd`,
   * which has no stdio mode, and for `nbdkit` without `-s`.
   */
  options: { command: string[]; socketActivation?: true };
}

/** Programs the library can start on a private socket of their own. */
const SOCKET_SERVERS = new Set(["nbdkit", "qemu-nbd"]);

/**
 * Describes how to start the server of `[ CMD ARGS … ]`.
 *
 * @param argv The words between the brackets.
 */
export function serverCommand(argv: string[]): ServerCommand {
  const program = argv[0]!.split("/").pop()!;
  const single = program === "nbdkit" &&
    argv.some((a) => a === "-s" || a === "--single");
  const onSocket = SOCKET_SERVERS.has(program) && !single;
  return {
    argv,
    text: ["[", ...argv, "]"].join(" "),
    options: onSocket
      ? { command: argv, socketActivation: true }
      : { command: argv },
  };
}

const SIZE_SUFFIXES: Readonly<Record<string, number>> = {
  "": 1,
  b: 1,
  k: 1024,
  kib: 1024,
  m: 1024 ** 2,
  mib: 1024 ** 2,
  g: 1024 ** 3,
  gib: 1024 ** 3,
  t: 1024 ** 4,
  tib: 1024 ** 4,
};

/**
 * Parses a size such as `4096`, `256k`, `32M` or `1GiB` (powers of 1024).
 *
 * @param text The size as typed.
 * @param what The option's name, for the error.
 * @returns The size in bytes.
 * @throws {UsageError} If it is not a non-negative whole number of bytes.
 */
export function parseSize(text: string, what: string): number {
  const m = /^(\d+)\s*([a-z]*)$/i.exec(text.trim());
  const scale = m ? SIZE_SUFFIXES[m[2]!.toLowerCase()] : undefined;
  if (!m || scale === undefined) {
    throw new UsageError(`${what}: cannot parse size "${text}"`);
  }
  const n = Number(m[1]) * scale;
  if (!Number.isSafeInteger(n)) {
    throw new UsageError(`${what}: size "${text}" is too large`);
  }
  return n;
}

/** The largest `--sparse` nbdcopy takes: a power of 2 that 32 bits hold. */
const MAX_SPARSE = 2 ** 31;

/**
 * Parses copy's `-S`/`--sparse` the way nbdcopy 1.22 takes it: 0 (off), or
 * a power of 2 from 512 to 2^31. `-S 1` or `-S 7` would make blocks that no
 * request can be aligned to.
 *
 * @param text The size as typed (`4k`, `65536`, `0`).
 * @returns The block size for sparse detection, 0 for none.
 * @throws {UsageError} For anything else.
 */
export function parseSparse(text: string): number {
  const n = parseSize(text, "--sparse");
  const powerOf2 = n > 0 && 2 ** Math.round(Math.log2(n)) === n;
  if (n !== 0 && (n < 512 || n > MAX_SPARSE || !powerOf2)) {
    throw new UsageError(
      `--sparse: must be 0 or a power of 2 from 512 to ${MAX_SPARSE}, not ${n}`,
    );
  }
  return n;
}

/**
 * Parses a whole number within bounds.
 *
 * @throws {UsageError} If it is not a whole number in `[min, max]`.
 */
export function parseCount(
  text: string,
  what: string,
  min: number,
  max: number,
): number {
  const n = /^\d+$/.test(text) ? Number(text) : NaN;
  if (!Number.isSafeInteger(n) || n < min || n > max) {
    throw new UsageError(
      `${what}: expected a number from ${min} to ${max}, got "${text}"`,
    );
  }
  return n;
}

/**
 * A size the way nbdinfo writes `export-size-str`: the largest power-of-1024
 * unit that divides it exactly ("1M", "2075312K", "1536").
 *
 * @param bytes A non-negative size.
 * @returns The size, and whether a unit was used.
 */
export function exactSize(
  bytes: number | bigint,
): { text: string; scaled: boolean } {
  const units = ["", "K", "M", "G", "T", "P", "E"];
  // Exact for every size an export can have, past 2^53 too.
  let n = BigInt(bytes);
  let u = 0;
  while (n !== 0n && n % 1024n === 0n && u < units.length - 1) {
    n /= 1024n;
    u++;
  }
  return { text: `${n}${units[u]}`, scaled: u > 0 };
}

/**
 * A size rounded for people: "512 B", "1.5 KiB", "3.00 GiB".
 *
 * @param bytes A non-negative size.
 */
export function humanBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let n = bytes;
  let u = 0;
  while (n >= 1024 && u < units.length - 1) {
    n /= 1024;
    u++;
  }
  if (u === 0) return `${n} B`;
  const digits = n < 10 ? 2 : n < 100 ? 1 : 0;
  return `${n.toFixed(digits)} ${units[u]}`;
}

/** Seconds as `m:ss` or `h:mm:ss`. */
export function clock(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

/** JSON's short escapes, which read better than `\u000a`. */
const SHORT_ESCAPES: Readonly<Record<string, string>> = {
  "\b": "\\b",
  "\t": "\\t",
  "\n": "\\n",
  "\f": "\\f",
  "\r": "\\r",
};

/** C0 controls, DEL and C1 controls (U+009B is a one-character CSI). */
// deno-lint-ignore no-control-regex -- matching them is the point.
const CONTROLS = /[\u0000-\u001f\u007f-\u009f]/g;

/**
 * Text from a server made safe for a terminal: every C0 control, DEL and
 * C1 control is shown as an escape (`\n`, `\u001b`, `\u009b`, the way
 * JSON writes them), so an export description, an error reply's text or a
 * server command's stderr can neither set the window title, clear the
 * screen, nor hide what follows. Everything else is left as it is, so the
 * result is idempotent. JSON output is escaped by `JSON.stringify` and by
 * this for what that leaves raw (DEL and C1), and stays exact.
 *
 * @param text Any text.
 * @returns The text with its control characters escaped.
 */
export function visible(text: string): string {
  return text.replace(
    CONTROLS,
    (c) =>
      SHORT_ESCAPES[c] ??
        `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
}

/**
 * The one line a tool prints when it fails: `tool: message`. An
 * `AggregateError` or an error with a `cause` shows the first reason too,
 * because "copy failed" alone helps nobody.
 *
 * @param tool The tool's name.
 * @param error What was thrown.
 */
export function errorLine(tool: string, error: unknown): string {
  let message = error instanceof Error ? error.message : String(error);
  if (error instanceof Error && error.cause instanceof Error) {
    const inner = error.cause.message;
    if (inner && !message.includes(inner)) message += `: ${inner}`;
  }
  // The message may carry a server's words (an error reply's text, a
  // server command's stderr): shown, never obeyed.
  return visible(`${tool}: ${message.replaceAll("\n", " ")}`);
}

const encoder = new TextEncoder();

/** Writes all of `text` to a writer, however short its writes are. */
export async function writeAll(
  w: { write(p: Uint8Array): Promise<number> },
  data: string | Uint8Array,
): Promise<void> {
  let bytes = typeof data === "string" ? encoder.encode(data) : data;
  while (bytes.length > 0) {
    const n = await w.write(bytes);
    bytes = bytes.subarray(n);
  }
}

/**
 * Prints a line (or lines) to stderr, control characters escaped by
 * {@linkcode visible}: what a tool reports may quote a server.
 */
export function warn(line: string): void {
  const safe = line.split("\n").map(visible).join("\n");
  Deno.stderr.writeSync(encoder.encode(safe + "\n"));
}

/**
 * Reports a usage error the way every tool does: `tool: message`, then
 * where to read the usage. The exit status is the tool's to choose.
 *
 * @param tool The tool's name.
 * @param error The usage error.
 */
export function warnUsage(tool: string, error: UsageError): void {
  warn(`${tool}: ${error.message}`);
  warn(`Try '${tool} --help'.`);
}

/** `-V`, `--version`: every tool takes it, as libnbd's tools do. */
export const VERSION_OPTION: OptionSpec = {
  name: "version",
  kind: "flag",
  short: "V",
};

/**
 * What `--version` prints: the tool and the module's version from
 * `deno.json`, then the runtime's, one per line (nbdinfo prints its own
 * version and libnbd's the same way).
 *
 * @param tool The tool's name.
 * @returns The lines, newline-terminated.
 */
export function versionText(tool: string): string {
  return `${tool} ${manifest.version}\n${manifest.name} ${manifest.version}\n` +
    `deno ${Deno.version.deno}\n`;
}

/** What {@linkcode withInterrupt} hands the work it guards. */
export interface Interrupt {
  /**
   * Aborted with {@linkcode Interrupt.reason} by the first SIGINT or
   * SIGTERM. The work may abort it too, for reasons of its own (a failure
   * that must stop the rest); `signal.reason` then tells which it was.
   */
  readonly controller: AbortController;
  /** `controller.signal`. */
  readonly signal: AbortSignal;
  /** The reason the first signal aborts with: `Error("interrupted")`. */
  readonly reason: Error;
  /** Resolves when the first signal arrives; never rejects. */
  readonly stopped: Promise<"interrupted">;
}

/** The signals a tool treats as "stop": ^C and a polite kill. */
const STOP_SIGNALS: readonly Deno.Signal[] = ["SIGINT", "SIGTERM"];

/** The status of a process ended by ^C, as shells report it (128 + 2). */
export const INTERRUPTED_STATUS = 130;

/**
 * Runs `work` with SIGINT and SIGTERM turned into an abort, the one way
 * every tool handles them:
 *
 * - the first signal aborts `interrupt.signal` (and resolves
 *   `interrupt.stopped`); the work is expected to stop, close what it opened
 *   and return, within its own grace time;
 * - a second signal, while the work is still stopping, exits the process at
 *   once with status 130: the user insists, and nothing more is waited for;
 * - once `work` settles the listeners are removed, so a later ^C ends the
 *   process the default way again.
 *
 * @param work What to run; it receives the abort and the means to tell it
 *   apart from its own.
 * @returns What `work` returns.
 * @throws What `work` throws.
 *
 * @example
 * ```ts
 * const status = await withInterrupt(async ({ signal }) => {
 *   await fetch("http://127.0.0.1:8080/", { signal });
 *   return 0;
 * });
 * ```
 */
export async function withInterrupt<T>(
  work: (interrupt: Interrupt) => Promise<T>,
): Promise<T> {
  const controller = new AbortController();
  const reason = new Error("interrupted");
  let signals = 0;
  let onFirst!: (value: "interrupted") => void;
  const stopped = new Promise<"interrupted">((resolve) => onFirst = resolve);
  const onSignal = () => {
    // Counted, not read off the controller: the work may abort it itself.
    if (++signals > 1) Deno.exit(INTERRUPTED_STATUS);
    controller.abort(reason);
    onFirst("interrupted");
  };
  for (const s of STOP_SIGNALS) Deno.addSignalListener(s, onSignal);
  try {
    return await work({
      controller,
      signal: controller.signal,
      reason,
      stopped,
    });
  } finally {
    for (const s of STOP_SIGNALS) Deno.removeSignalListener(s, onSignal);
  }
}

/** What a tool's command line settled before any work: help, the version. */
export type Answered = "help" | "version";

/**
 * The start every tool shares: parse the command line, and answer what needs
 * no work. `--help` prints `usage`, `--version` the version, and a usage
 * error its one line and where to read the usage.
 *
 * @param tool The tool's name, for messages and `--version`.
 * @param usage The `--help` text.
 * @param parse The tool's parser, returning its request or what was asked
 *   instead.
 * @param args The arguments, without the program name.
 * @returns The request to run, or the exit status when nothing is to run.
 * @throws Whatever `parse` throws that is not a {@linkcode UsageError}.
 */
export async function readCommandLine<R>(
  tool: string,
  usage: string,
  parse: (args: string[]) => R | Answered,
  args: string[],
): Promise<{ request: R } | { exit: number }> {
  let parsed: R | Answered;
  try {
    parsed = parse(args);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    warnUsage(tool, e);
    return { exit: 1 };
  }
  if (parsed === "help") {
    await writeAll(Deno.stdout, usage);
    return { exit: 0 };
  }
  if (parsed === "version") {
    await writeAll(Deno.stdout, versionText(tool));
    return { exit: 0 };
  }
  return { request: parsed as R };
}

let engine: { tlsEngine?: TlsEngine } | undefined;

/**
 * Whether a target asks for TLS by itself: an `nbds…` URI or one with a
 * `tls-…` parameter, or options that set `tls` or a TLS file. Plain
 * `nbd://` still upgrades when the server requires TLS, on Deno's own TLS.
 */
function asksForTls(target: unknown): boolean {
  if (typeof target === "string") {
    return /^nbds/i.test(target) || /[?&]tls-/i.test(target);
  }
  if (target === null || typeof target !== "object") return false;
  const o = target as Record<string, unknown>;
  return o.tls === "require" || o.tls === "prefer" ||
    Object.keys(o).some((k) => k.startsWith("tls") && o[k] !== undefined);
}

/**
 * The TLS engine option a tool passes to `connect()` and `probe()` for
 * `target`: GnuTLS when the target asks for TLS and the tool runs with
 * `--allow-ffi` (libnbd's trust, revocation lists, TLS-PSK, at C speed),
 * nothing otherwise (Deno's own TLS). GnuTLS, and the FFI modules around
 * it, are loaded on the first target that needs them, so a tool in clear
 * text never maps the library.
 *
 * @param target The URI or options the tool connects to.
 * @returns `{ tlsEngine }`, or `{}`.
 */
export async function tlsEngineOption(
  target: unknown,
): Promise<{ tlsEngine?: TlsEngine }> {
  if (!asksForTls(target)) return {};
  if (engine === undefined) {
    // Loaded here, not at start-up: a tool in clear text never evaluates
    // the FFI modules.
    const { gnutlsIfAllowed } = await import("../ffi/gnutls/engine.ts");
    const found = gnutlsIfAllowed();
    engine = found ? { tlsEngine: found } : {};
  }
  return engine;
}

/**
 * Refuses, before any work, a file a tool will write later (a pid file, a
 * hash file) whose directory does not exist: the failure would otherwise
 * come after the work, with nothing to show for it.
 *
 * @param option How the command line named it, e.g. `--pidfile /run/x`.
 * @param path The file.
 * @throws {UsageError} Naming the option and the directory.
 */
export function checkParentDirectory(option: string, path: string): void {
  const slash = path.lastIndexOf("/");
  const dir = slash < 0 ? "." : path.slice(0, slash) || "/";
  let isDirectory = false;
  try {
    isDirectory = Deno.statSync(dir).isDirectory;
  } catch {
    // Missing, or not to be looked at: refused below.
  }
  if (!isDirectory) {
    throw new UsageError(`${option}: ${dir} is not a directory`);
  }
}

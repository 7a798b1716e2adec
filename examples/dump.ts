/**
 * `dump`: what `nbddump` does. A hexdump of an export, byte for byte the
 * output of nbddump 1.22 for the same arguments: offsets in ten hex
 * digits, sixteen bytes a line, printable characters beside them, and a
 * run of lines equal to the one before collapsed into one `*` line.
 *
 * ```sh
 * deno run -A examples/dump.ts nbd+unix:///?socket=/tmp/nbd.sock
 * deno run -A examples/dump.ts -o 4096 -n 512 nbd://127.0.0.1/
 * deno run -A examples/dump.ts -- [ qemu-nbd -r -f qcow2 disk.qcow2 ]
 * ```
 *
 * Extents the server reports as zero (`base:allocation`) are never read,
 * and a long zero run costs one block status reply, not a pass over its
 * lines. Colour (ANSI, with `│`, `·` and `☆`) only on a terminal unless
 * `--color` or `--no-color` says otherwise.
 *
 * Two places differ from nbddump 1.22 on purpose: with `--offset`, a
 * first line of zeroes is printed rather than collapsed into a `*` that
 * follows nothing; and with `--length`, the last line of the range is
 * printed rather than collapsed, so the dump always shows where it ends
 * (nbddump keeps both lines only at offset 0 and at the end of the export).
 *
 * @module
 */

import { connect, type NbdClient, STATE_ZERO } from "../mod.ts";
import {
  type Answered,
  errorLine,
  type OptionSpec,
  parseArgs,
  readCommandLine,
  serverCommand,
  tlsEngineOption,
  UsageError,
  VERSION_OPTION,
  warn,
  writeAll,
} from "./_cli.ts";

/** 128 + SIGPIPE: what a shell reports for a writer whose reader left. */
const SIGPIPE_STATUS = 141;
const USAGE = `Usage: dump [OPTIONS] NBD

Hexdump the content of a disk over NBD, as nbddump.

NBD := NBD-URI | [ CMD ARGS ... ]   a server to run, such as
       [ qemu-nbd -r -f qcow2 disk.qcow2 ]

Options:
      --color, --colour   ANSI colours even when not on a terminal
      --no-color, --no-colour
                          no colours even on a terminal
  -n, --length=N, --limit=N
                          dump at most N bytes
  -o, --offset=N, --skip=N
                          start at byte N
  -h, --help              this text
  -V, --version           print the version and exit
`;

const OPTIONS: OptionSpec[] = [
  { name: "color", kind: "flag" },
  { name: "colour", kind: "flag" },
  { name: "colors", kind: "flag" },
  { name: "colours", kind: "flag" },
  { name: "no-color", kind: "flag" },
  { name: "no-colour", kind: "flag" },
  { name: "no-colors", kind: "flag" },
  { name: "no-colours", kind: "flag" },
  { name: "length", kind: "value", short: "n" },
  { name: "limit", kind: "value" },
  { name: "offset", kind: "value", short: "o" },
  { name: "skip", kind: "value" },
  { name: "help", kind: "flag", short: "h" },
  VERSION_OPTION,
];

const MAX_U64 = (1n << 64n) - 1n;

/**
 * Reads a number as nbddump does (`sscanf("%" SCNu64)`): leading blanks,
 * an optional sign, decimal digits, and whatever follows ignored; a minus
 * wraps around 2^64, and a number too large for 64 bits is the largest.
 *
 * @returns The value, from 0 to 2^64 - 1.
 * @throws {UsageError} When there are no digits to read.
 */
export function parseU64(text: string, option: string): bigint {
  const m = /^[ \t\n\v\f\r]*([+-]?)(\d+)/.exec(text);
  if (!m) {
    throw new UsageError(`could not parse --${option} option: ${text}`);
  }
  let n = BigInt(m[2]!);
  if (n > MAX_U64) return MAX_U64;
  if (m[1] === "-") n = (MAX_U64 + 1n - n) & MAX_U64;
  return n;
}

/** ANSI colours of nbddump's output. */
const ANSI = {
  green: "\x1b[22;32m",
  grey: "\x1b[22;90m",
  blue: "\x1b[1;34m",
  red: "\x1b[1;31m",
  magenta: "\x1b[1;35m",
  restore: "\x1b[0m",
} as const;

/** Whether a byte is a C-locale `isalnum()` character. */
function isAlnum(b: number): boolean {
  return (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5a) ||
    (b >= 0x61 && b <= 0x7a);
}

/** Whether a byte is a C-locale `isprint()` character. */
function isPrint(b: number): boolean {
  return b >= 0x20 && b <= 0x7e;
}

const HEX = Array.from(
  { length: 256 },
  (_, i) => i.toString(16).padStart(2, "0"),
);

/**
 * One line of the dump: `n` bytes (at most 16) of `bytes` at `offset`.
 *
 * @param offset The line's offset in the export.
 * @param bytes At least `n` bytes.
 * @param n How many to show; the rest of the line is blank.
 * @param colour ANSI colours and the Unicode frame.
 * @returns The line with its newline (and, in colour, the reset after it).
 */
export function formatLine(
  offset: number | bigint,
  bytes: Uint8Array,
  n: number,
  colour: boolean,
): string {
  const c = (code: string) => colour ? code : "";
  const pipe = colour ? "│" : "|";
  let s = `${c(ANSI.green)}${offset.toString(16).padStart(10, "0")}${
    c(ANSI.grey)
  }: `;
  for (let j = 0; j < n; j++) {
    const b = bytes[j]!;
    s += `${c(b ? ANSI.blue : ANSI.grey)}${HEX[b]} `;
    if (j === 7) s += " ";
  }
  s += c(ANSI.grey);
  for (let j = n; j < 16; j++) s += j === 7 ? "    " : "   ";
  s += pipe;
  for (let j = 0; j < n; j++) {
    const b = bytes[j]!;
    if (isAlnum(b)) s += `${c(ANSI.red)}${String.fromCharCode(b)}`;
    else if (isPrint(b)) s += `${c(ANSI.magenta)}${String.fromCharCode(b)}`;
    else s += `${c(ANSI.grey)}${colour ? "·" : "."}`;
  }
  s += c(ANSI.grey);
  for (let j = n; j < 16; j++) s += " ";
  return `${s}${pipe}\n${c(ANSI.restore)}`;
}

const ZERO_LINE = new Uint8Array(16);

/**
 * The dump of `[start, end)` as bytes and zero runs arrive in order: lines
 * of sixteen bytes from `start`, each line equal to the one before (but
 * the first and the last) collapsed, a run of them into one `*`. Pure:
 * each call returns the text it completes. Offsets are exact to 2^64.
 */
export class HexDumper {
  #start: bigint;
  #end: bigint;
  #colour: boolean;
  /** The offset of the line being filled. */
  #pos: bigint;
  #pending = new Uint8Array(16);
  #fill = 0;
  #last = new Uint8Array(16);
  #splat = false;

  /**
   * @param start The first offset dumped.
   * @param end Where the dump ends.
   * @param colour ANSI colours and the Unicode frame.
   */
  constructor(start: number | bigint, end: number | bigint, colour: boolean) {
    this.#start = BigInt(start);
    this.#end = BigInt(end);
    this.#colour = colour;
    this.#pos = this.#start;
  }

  #line(bytes: Uint8Array, n: number): string {
    const pos = this.#pos;
    this.#pos += BigInt(n);
    const same = pos > this.#start && pos + 16n < this.#end && n === 16 &&
      equal16(bytes, this.#last);
    if (same) {
      if (this.#splat) return "";
      this.#splat = true;
      return this.#colour ? "☆\n" : "*\n";
    }
    this.#splat = false;
    this.#last.set(bytes.subarray(0, 16));
    return formatLine(pos, bytes, n, this.#colour);
  }

  /** Adds bytes read from the export. */
  data(bytes: Uint8Array): string {
    let out = "";
    let i = 0;
    while (this.#fill > 0 && i < bytes.length) {
      this.#pending[this.#fill++] = bytes[i++]!;
      if (this.#fill === 16) {
        this.#fill = 0;
        out += this.#line(this.#pending, 16);
      }
    }
    for (; i + 16 <= bytes.length; i += 16) {
      out += this.#line(bytes.subarray(i, i + 16), 16);
    }
    for (; i < bytes.length; i++) this.#pending[this.#fill++] = bytes[i]!;
    return out;
  }

  /** Adds `count` zero bytes that were never read. */
  zeroes(count: number | bigint): string {
    let n = BigInt(count);
    let out = "";
    while (this.#fill > 0 && n > 0n) {
      this.#pending[this.#fill++] = 0;
      n--;
      if (this.#fill === 16) {
        this.#fill = 0;
        out += this.#line(this.#pending, 16);
      }
    }
    if (n >= 16n) {
      out += this.#line(ZERO_LINE, 16);
      n -= 16n;
      // Now the last line is zeroes: every further zero line is collapsed
      // but the dump's last, so skip to it without visiting the rest.
      const lines = n / 16n;
      const left = (this.#end - this.#pos + 15n) / 16n - 1n;
      const most = left > 0n ? left : 0n;
      const squashed = lines < most ? lines : most;
      if (squashed > 0n) {
        if (!this.#splat) out += this.#colour ? "☆\n" : "*\n";
        this.#splat = true;
        this.#pos += squashed * 16n;
        n -= squashed * 16n;
      }
      for (; n >= 16n; n -= 16n) out += this.#line(ZERO_LINE, 16);
    }
    for (; n > 0n; n--) this.#pending[this.#fill++] = 0;
    return out;
  }

  /** The last, short line, if the range ends inside one. */
  finish(): string {
    if (this.#fill === 0) return "";
    const n = this.#fill;
    this.#fill = 0;
    this.#pending.fill(0, n);
    return this.#line(this.#pending, n);
  }
}

function equal16(a: Uint8Array, b: Uint8Array): boolean {
  for (let i = 0; i < 16; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** Bytes read per request. */
const CHUNK = 4 * 1024 * 1024;
/** Bytes one block status request asks about. */
const STATUS_WINDOW = 1024n * 1024n * 1024n;

function min(a: bigint, b: bigint): bigint {
  return a < b ? a : b;
}

/**
 * Dumps `[start, end)` of the export to `write`: zero extents from block
 * status are not read, the rest is read in chunks. Offsets are bigints, so
 * that exports of 2^53 bytes and more dump exactly.
 */
export async function dump(
  nbd: NbdClient,
  start: bigint,
  end: bigint,
  colour: boolean,
  write: (text: string) => Promise<void>,
): Promise<void> {
  const d = new HexDumper(start, end, colour);
  const useStatus = nbd.metaContexts.includes("base:allocation");
  const buf = new Uint8Array(CHUNK);
  const readData = async (a: bigint, b: bigint) => {
    for (let o = a; o < b; o += BigInt(CHUNK)) {
      const piece = buf.subarray(0, Math.min(CHUNK, Number(b - o)));
      await nbd.readInto(piece, o);
      const text = d.data(piece);
      if (text) await write(text);
    }
  };
  let pos = start;
  while (pos < end) {
    if (!useStatus) {
      const b = min(end, pos + BigInt(CHUNK));
      await readData(pos, b);
      pos = b;
      continue;
    }
    const reply = await nbd.blockStatus(pos, min(end - pos, STATUS_WINDOW));
    const before = pos;
    for (const e of reply["base:allocation"] ?? []) {
      if (pos >= end) break;
      const b = min(end, pos + e.length);
      if ((e.flags & STATE_ZERO) !== 0) {
        const text = d.zeroes(b - pos);
        if (text) await write(text);
      } else {
        await readData(pos, b);
      }
      pos = b;
    }
    if (pos === before) throw new Error(`no extents returned at offset ${pos}`);
  }
  const text = d.finish();
  if (text) await write(text);
}

/** What the command line asks for. */
interface Request {
  target: string | string[];
  colour: boolean;
  offset: bigint;
  limit: bigint;
}

/**
 * Reads the command line.
 *
 * @returns The request, `"help"` or `"version"`.
 * @throws {UsageError} On a malformed option or not exactly one NBD.
 */
function parseRequest(args: string[]): Request | Answered {
  const { options, positionals, commands, order } = parseArgs(args, OPTIONS);
  if (options.has("help")) return "help";
  if (options.has("version")) return "version";
  if (positionals.length !== 1) {
    throw new UsageError("expected one NBD URI or [ CMD ARGS ... ]");
  }
  // The last of --color and --no-color wins, as with getopt.
  let colour = Deno.stdout.isTerminal();
  let limit = MAX_U64;
  let offset = 0n;
  const values = new Map<string, string[]>();
  for (const name of order) {
    if (/^(colou?rs?)$/.test(name)) colour = true;
    else if (/^no-colou?rs?$/.test(name)) colour = false;
  }
  for (const name of ["length", "limit", "offset", "skip"]) {
    const v = options.get(name);
    if (typeof v === "string") values.set(name, [v]);
  }
  // The last given of each pair counts.
  const lastOf = (a: string, b: string): [string, string] | undefined => {
    const i = order.lastIndexOf(a), j = order.lastIndexOf(b);
    const name = i > j ? a : j > i ? b : undefined;
    return name ? [name, values.get(name)![0]!] : undefined;
  };
  const l = lastOf("length", "limit");
  if (l) limit = parseU64(l[1], "length");
  const o = lastOf("offset", "skip");
  if (o) offset = parseU64(o[1], "offset");
  return {
    target: commands[0] ?? positionals[0]!,
    colour,
    offset,
    limit,
  };
}

/**
 * Runs the tool.
 *
 * @param args Command-line arguments, without the program name.
 * @returns The exit status: 0 after a full dump, 1 otherwise.
 */
export async function main(args: string[]): Promise<number> {
  const read = await readCommandLine("dump", USAGE, parseRequest, args);
  if ("exit" in read) return read.exit;
  const request: Request = read.request;
  const { target, colour } = request;
  // ^C in the middle of a coloured line must not leave the terminal
  // coloured.
  const onSignal = () => {
    if (colour) {
      Deno.stdout.writeSync(new TextEncoder().encode(`\n${ANSI.restore}`));
    }
    Deno.exit(1);
  };
  const signals: Deno.Signal[] = ["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"];
  let nbd: NbdClient | undefined;
  try {
    const where = typeof target === "string"
      ? target
      : serverCommand(target).options;
    nbd = await connect(where, {
      ...await tlsEngineOption(where),
      metaContexts: ["base:allocation"],
    });
    const size = nbd.sizeBigInt;
    if (request.offset > size) {
      throw new Error(
        `offset ${request.offset} is past the end of the export (${size} bytes)`,
      );
    }
    const rest = size - request.offset;
    const count = request.limit < rest ? request.limit : rest;
    const start = request.offset;
    for (const s of signals) Deno.addSignalListener(s, onSignal);
    await dump(
      nbd,
      start,
      start + count,
      colour,
      (text) => writeAll(Deno.stdout, text),
    );
    return 0;
  } catch (e) {
    // A reader that went away (`dump ... | head`) ends the dump quietly,
    // with the status a shell reports for SIGPIPE, as nbddump's.
    if (e instanceof Deno.errors.BrokenPipe) return SIGPIPE_STATUS;
    warn(errorLine("dump", e));
    return 1;
  } finally {
    for (const s of signals) {
      try {
        Deno.removeSignalListener(s, onSignal);
      } catch {
        // Never added: the dump did not start.
      }
    }
    await nbd?.close().catch(() => {});
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));

/**
 * Progress as `copy` reports it: a bar on a terminal, or nbdcopy's `N/100`
 * lines on a descriptor.
 *
 * Private to `examples/` (the leading `_`).
 *
 * @module
 */

import { clock, humanBytes, parseCount } from "./_cli.ts";

const encoder = new TextEncoder();

/** Where progress goes. */
export type ProgressMode =
  | { kind: "none" }
  /** A bar redrawn in place on a terminal. */
  | { kind: "bar"; out: { writeSync(p: Uint8Array): number }; width: number }
  /**
   * nbdcopy's machine format, `N/100\n`, written when N changes. `owned`
   * means the reporter opened `out` and closes it when finished.
   */
  | {
    kind: "fd";
    out: { writeSync(p: Uint8Array): number; close(): void };
    owned: boolean;
  };

/**
 * Reports how far a job has got: a bar with bytes, rate and time left on a
 * terminal, or `N/100` lines for a program reading a descriptor. Redraws at
 * most ten times a second; {@linkcode Progress.finish} draws the final
 * state, so a report of 100% only ever follows a finished job.
 */
export class Progress {
  #mode: ProgressMode;
  #total: number | undefined;
  #done = 0;
  #start = performance.now();
  #lastDraw = -Infinity;
  #lastPercent = -1;
  #finished = false;
  /** Finished with success: an empty job (total 0) is then 100% done. */
  #complete = false;

  /**
   * @param mode Where to report.
   * @param total Bytes in the whole job, if known (not for stdin).
   */
  constructor(mode: ProgressMode, total: number | undefined) {
    this.#mode = mode;
    this.#total = total;
  }

  /** Bytes counted so far. */
  get done(): number {
    return this.#done;
  }

  /** Counts `bytes` more as done and redraws if it is time to. */
  add(bytes: number): void {
    this.#done += bytes;
    const now = performance.now();
    if (now - this.#lastDraw >= 100) {
      this.#lastDraw = now;
      this.#draw(false);
    }
  }

  /**
   * Draws the last state. On success the bar reaches 100% and ends its line;
   * on failure it ends the line where it stopped, so the error line that
   * follows starts on a line of its own.
   */
  finish(ok: boolean): void {
    if (this.#finished) return;
    this.#finished = true;
    this.#complete = ok;
    if (ok && this.#total !== undefined) this.#done = this.#total;
    this.#draw(true);
    if (this.#mode.kind === "fd" && this.#mode.owned) this.#mode.out.close();
  }

  #draw(final: boolean): void {
    const mode = this.#mode;
    if (mode.kind === "none") return;
    const total = this.#total;
    const percent = total
      ? Math.floor((this.#done * 100) / total)
      : this.#complete
      ? 100
      : 0;
    if (mode.kind === "fd") {
      const p = Math.min(percent, 100);
      if (p !== this.#lastPercent && total !== undefined) {
        this.#lastPercent = p;
        mode.out.writeSync(encoder.encode(`${p}/100\n`));
      }
      return;
    }
    const elapsed = (performance.now() - this.#start) / 1000;
    const rate = elapsed > 0 ? this.#done / elapsed : 0;
    let tail = `${humanBytes(this.#done)}`;
    if (total !== undefined) tail += ` / ${humanBytes(total)}`;
    tail += `  ${humanBytes(rate)}/s`;
    if (final) {
      tail += `  ${clock(elapsed)}`;
    } else if (total !== undefined && rate > 0) {
      tail += `  ${clock((total - this.#done) / rate)} left`;
    }
    let line: string;
    if (total !== undefined) {
      const head = `${String(Math.min(percent, 100)).padStart(3)}% `;
      const barWidth = Math.max(
        10,
        Math.min(50, mode.width - head.length - tail.length - 4),
      );
      const filled = Math.min(
        barWidth,
        total
          ? Math.floor((barWidth * this.#done) / total)
          : barWidth * percent / 100,
      );
      line = `${head}[${"#".repeat(filled)}${
        ".".repeat(barWidth - filled)
      }] ${tail}`;
    } else {
      line = tail;
    }
    // \r returns to the start of the line, ESC[K clears what is left of it.
    mode.out.writeSync(encoder.encode(`\r${line}\x1b[K${final ? "\n" : ""}`));
  }
}

/**
 * Works out where progress goes from `--progress[=FD]` / `--no-progress`:
 * bare `--progress` or nothing means a bar when stderr is a terminal;
 * `--progress=FD` means nbdcopy's `N/100` lines on that descriptor.
 *
 * @param value The `progress` option, if given.
 * @param disabled Whether `--no-progress` was given.
 * @throws {UsageError} If FD is not a number.
 */
export function progressMode(
  value: string | true | undefined,
  disabled: boolean,
): ProgressMode {
  if (disabled) return { kind: "none" };
  if (typeof value === "string") {
    const fd = parseCount(value, "--progress", 1, 1 << 20);
    if (fd === 1) return { kind: "fd", out: Deno.stdout, owned: false };
    if (fd === 2) return { kind: "fd", out: Deno.stderr, owned: false };
    // Deno has no "open this descriptor"; on Linux /dev/fd/N reopens it.
    return {
      kind: "fd",
      out: Deno.openSync(`/dev/fd/${fd}`, { write: true }),
      owned: true,
    };
  }
  if (!Deno.stderr.isTerminal()) return { kind: "none" };
  let width = 80;
  try {
    width = Deno.consoleSize().columns;
  } catch {
    // Not a console after all; 80 columns will do.
  }
  return { kind: "bar", out: Deno.stderr, width };
}

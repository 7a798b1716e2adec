/**
 * `copy`: what `nbdcopy` does. Copies between NBD exports, local files or
 * block devices, and stdin/stdout (`-`), in any direction; `null:` is a sink
 * for measuring a source.
 *
 * ```sh
 * deno run -A examples/copy.ts nbd+unix:///disk?socket=/tmp/nbd.sock disk.img
 * deno run -A examples/copy.ts --flush disk.img nbd://127.0.0.1/
 * deno run -A examples/copy.ts nbd://127.0.0.1/ null:
 * ```
 *
 * Sparse-aware on both sides: zero extents of the source (from
 * `base:allocation`) are never read, all-zero blocks it does read are not
 * written as data, and the destination gets `NBD_CMD_WRITE_ZEROES` (or, for
 * a file, a hole) instead. Requests are pipelined, over several connections
 * when the servers advertise multi-conn. Any failure prints one line
 * (`copy: ...`) and exits 1; a copy that did not finish never exits 0.
 *
 * The parts live in `copy/`: one file per endpoint kind (`nbd.ts`,
 * `file.ts`, `stream.ts`, `null.ts`) behind the interfaces of
 * `endpoint.ts`, the plan (`plan.ts`), the pump (`pump.ts`), one copy
 * between opened ends (`transfer.ts`), the command line (`options.ts`) and
 * `main()` (`cli.ts`).
 *
 * @module
 */

import { main } from "./copy/cli.ts";

export { main };
export { isZero } from "./copy/sparse.ts";

if (import.meta.main) Deno.exit(await main(Deno.args));

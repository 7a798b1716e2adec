/**
 * `info`: what `nbdinfo` shows about an NBD server and its exports: the
 * fields of nbdinfo 1.22 (libnbd 1.22), with their names, values and order,
 * in text and in `--json`.
 *
 * ```sh
 * deno run --allow-net --allow-read examples/info.ts nbd+unix:///disk?socket=/tmp/nbd.sock
 * deno run --allow-net --allow-read examples/info.ts --map --totals --json nbd://127.0.0.1/
 * deno run -A examples/info.ts [ qemu-nbd -r -f qcow2 disk.qcow2 ]
 * ```
 *
 * Output goes to stdout in one piece at the end, so a failure never leaves
 * half a report; the failure itself is one line on stderr (`info: ...`) and
 * exit status 1. `--can`/`--is`/`--has` print nothing and exit 0 (yes) or 2
 * (no); `--cannot`/`--isnt`/`--hasnt` the other way round.
 *
 * The parts live in `info/`: the command line (`options.ts`), what is
 * gathered about a server (`facts.ts`), the report of one export
 * (`show.ts`), `--list` (`list.ts`), `--map` (`map.ts`), the feature tests
 * (`can.ts`) and the run itself (`main.ts`).
 *
 * @module
 */

import { main } from "./info/main.ts";

export { main };
export { extentDescription } from "./info/map.ts";

if (import.meta.main) Deno.exit(await main(Deno.args));

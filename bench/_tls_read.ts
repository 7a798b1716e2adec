/**
 * One whole-process run of `bench/tls.ts`'s section: reads an
 * `nbdkit pattern` export sequentially over `nbds://` with `readInto()`,
 * checking one word of every request against the pattern, and exits. The
 * benchmark runs it with `DENO_CERT` naming the test CA, so that the server
 * is verified against the system's roots and the client takes the
 * `Deno.startTls` path.
 *
 * ```sh
 * DENO_CERT=ca-cert.pem deno run -A bench/_tls_read.ts URI SIZE REQUEST DEPTH
 * ```
 *
 * @module
 */

import { connect } from "../mod.ts";
import { oursSequential } from "./seq_read.ts";

const [uri, size, request, depth] = Deno.args;
const nbd = await connect(uri!, { maxInFlight: 64 });
try {
  const run = await oursSequential(
    nbd,
    Number(size),
    Number(request),
    Number(depth),
    600,
    "one",
  );
  if (run.bytes !== Number(size)) {
    throw new Error(`Read ${run.bytes} of ${size} bytes`);
  }
} finally {
  await nbd.close();
}

/**
 * Sequential read over TLS on TCP loopback (`nbds://`), ours against
 * nbdcopy with the same request size and depth.
 *
 * @module
 */

import { connect } from "../mod.ts";
import { makeTestPki } from "../tests/support/certs.ts";
import { nbdkit } from "../tests/support/servers.ts";
import {
  type BenchContext,
  GiB,
  KiB,
  MiB,
  type Row,
  timeCommand,
} from "./_harness.ts";
import { nbdcopyMatched } from "./_peers.ts";
import { fmt } from "./_table.ts";
import { oursSequential } from "./seq_read.ts";

/** Bytes read over TLS. */
const TLS_SIZE = GiB;

/**
 * Sequential read over TLS on TCP loopback (`nbds://`), ours against
 * nbdcopy with the same request size and depth: a throwaway PKI, the
 * server's certificate verified against its CA, no client certificate.
 * Ours runs twice: in this process with the CA given (`tls-certificates=`,
 * so `node:tls`, which trusts only that CA), and as a command line with
 * the CA made a system root (`DENO_CERT`), which takes `Deno.startTls`
 * (`bench/_tls_read.ts`). Skipped with `--no-tls`.
 *
 * @param ctx The run's context.
 * @returns Its rows.
 */
export async function sections(ctx: BenchContext): Promise<Row[]> {
  const c = ctx.config;
  if (!c.tls) return [];
  const pki = await makeTestPki();
  const root = new URL("..", import.meta.url).pathname;
  try {
    // The client's CA where every libnbd install can read it.
    const ca = `${ctx.dir}/tls-client`;
    await Deno.mkdir(ca);
    await Deno.copyFile(
      `${pki.clientNoCertDir}/ca-cert.pem`,
      `${ca}/ca-cert.pem`,
    );
    const size = Math.min(TLS_SIZE, c.size);
    const server = await nbdkit([
      "--tls=require",
      `--tls-certificates=${pki.serverDir}`,
      `--threads=${c.threads}`,
      "pattern",
      `size=${size}`,
    ], { tcp: true });
    try {
      const uri = `nbds://127.0.0.1:${server.port}/?tls-certificates=${ca}`;
      const req = c.requestSize;
      const qd = c.seqDepth;
      const nbd = await connect(uri, { maxInFlight: 64 });
      try {
        const matched = nbdcopyMatched(uri, req, qd);
        return await ctx.section(
          `seq read ${fmt(size / MiB)} MiB over TLS (TCP)`,
          [
            {
              client: `ours readInto() ${req / KiB}K x${qd}, node:tls ` +
                "(own CA)",
              ours: true,
              warm: () =>
                oursSequential(
                  nbd,
                  Math.min(size, 256 * MiB),
                  req,
                  qd,
                  60,
                  "full",
                ),
              once: () => oursSequential(nbd, size, req, qd, c.seconds, "one"),
            },
            {
              // The CA as a system root: the server verified against the
              // system's roots, so the client takes Deno.startTls.
              client: `deno run bench/_tls_read.ts ${req / KiB}K x${qd}, ` +
                "Deno.startTls",
              ours: true,
              once: () =>
                timeCommand(
                  [
                    "env",
                    `DENO_CERT=${ca}/ca-cert.pem`,
                    Deno.execPath(),
                    "run",
                    "-A",
                    "bench/_tls_read.ts",
                    `nbds://localhost:${server.port}/`,
                    String(size),
                    String(req),
                    String(qd),
                  ],
                  size,
                  req,
                  root,
                ),
            },
            ...ctx.libs.map((lib) => ({
              client: `nbdcopy ${lib.version} --request-size=${req} ` +
                `--requests=${qd} -C 1`,
              ours: false,
              ...(lib.nbdcopy ? {} : { skip: `nbdcopy ${lib.missing}` }),
              once: () => timeCommand(lib.wrap(matched), size, req),
            })),
          ],
        );
      } finally {
        await nbd.close();
      }
    } finally {
      await server.stop();
    }
  } finally {
    await pki.remove();
  }
}

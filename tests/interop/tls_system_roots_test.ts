/**
 * TLS through `Deno.startTls`: the path `upgradeToTls()` takes over TCP
 * when the server is verified against the system's roots and no client
 * certificate is sent. The test CA becomes a system root through
 * `DENO_CERT`, which Deno reads at start-up, so each case runs a client in
 * a `deno eval` of its own and reports back in one line of JSON.
 */

import assert from "node:assert/strict";
import { output } from "../support/command.ts";
import { makeTestPki, startTlsNbdkits } from "../support/certs.ts";

const BOUND_MS = 20_000;
const MOD = new URL("../../mod.ts", import.meta.url).href;

/** What the client in the child saw. */
interface Outcome {
  ok: boolean;
  /** The fields of the "tls.handshake" debug event. */
  handshake?: Record<string, unknown>;
  /** Whether the bytes read back were the bytes written. */
  same?: boolean;
  error?: { name: string; code?: string; message: string };
}

/**
 * Connects to `uri` in a child process (trusting `caFile` as a system root
 * when given), writes 64 KiB, reads it back and a 512 KiB read after it.
 */
async function inChild(uri: string, caFile?: string): Promise<Outcome> {
  const code = `
    import { connect } from ${JSON.stringify(MOD)};
    let handshake;
    try {
      const c = await connect(${JSON.stringify(uri)}, {
        signal: AbortSignal.timeout(${BOUND_MS / 2}),
        debug: (event, fields) => {
          if (event === "tls.handshake") handshake = fields;
        },
      });
      const data = new Uint8Array(65536).map((_, i) => (i * 7 + 3) & 0xff);
      await c.write(4096, data);
      const back = await c.read(4096, data.length);
      const big = await c.read(0, 512 * 1024);
      const same = back.every((b, i) => b === data[i]) &&
        big.subarray(4096, 4096 + data.length).every((b, i) => b === data[i]);
      await c.close();
      console.log(JSON.stringify({ ok: true, handshake, same }));
    } catch (e) {
      console.log(JSON.stringify({
        ok: false,
        error: { name: e.name, code: e.code, message: e.message },
      }));
    }
  `;
  const out = await output(Deno.execPath(), ["eval", "--ext=js", code], {
    env: caFile ? { DENO_CERT: caFile } : {},
    timeoutMs: BOUND_MS,
  });
  const text = out.text.trim();
  assert.ok(text.length > 0, `the child printed nothing: ${out.stderr}`);
  return JSON.parse(text.split("\n").at(-1)!) as Outcome;
}

Deno.test("upgradeToTls() over Deno.startTls (system roots)", async (t) => {
  await using pki = await makeTestPki();
  await using servers = await startTlsNbdkits(pki);
  const ca = `${pki.serverDir}/ca-cert.pem`;
  const uri = (port: number | undefined, query = "") =>
    `nbds://localhost:${port}/${query ? `?${query}` : ""}`;

  await t.step("carries NBD with the server verified", async () => {
    const r = await inChild(uri(servers.tcp.port), ca);
    assert.equal(r.ok, true, JSON.stringify(r.error));
    assert.equal(r.same, true);
    // Deno.startTls tells neither version nor cipher: this was that path.
    assert.deepEqual(r.handshake, {
      hostname: "localhost",
      verified: true,
      clientCertificate: false,
    });
  });

  await t.step("checks an IP address against the IP names", async () => {
    const r = await inChild(`nbds://127.0.0.1:${servers.tcp.port}/`, ca);
    assert.equal(r.ok, true, JSON.stringify(r.error));
    assert.equal(r.same, true);
  });

  await t.step("rejects a server no system root vouches for", async () => {
    const r = await inChild(uri(servers.tcp.port));
    assert.equal(r.ok, false);
    assert.equal(r.error?.name, "NbdTlsError");
    assert.equal(r.error?.code, "UNABLE_TO_VERIFY_LEAF_SIGNATURE");
    assert.match(r.error?.message ?? "", /not signed by a trusted CA/);
  });

  await t.step("rejects a certificate for another name", async () => {
    const r = await inChild(
      uri(servers.tcp.port, "tls-hostname=nbd.example.com"),
      ca,
    );
    assert.equal(r.ok, false);
    assert.equal(r.error?.name, "NbdTlsError");
    assert.equal(r.error?.code, "ERR_TLS_CERT_ALTNAME_INVALID");
    assert.match(
      r.error?.message ?? "",
      /not valid for the name "nbd\.example\.com"/,
    );
  });

  await t.step(
    "fails clearly without the client certificate a server demands",
    async () => {
      const r = await inChild(uri(servers.verifying.port), ca);
      assert.equal(r.ok, false);
      assert.equal(r.error?.name, "NbdTlsError");
      assert.match(
        r.error?.message ?? "",
        /it may require a client certificate/,
      );
    },
  );
});

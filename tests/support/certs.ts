/**
 * A throwaway PKI for the TLS tests, made with `openssl` in a private
 * temporary directory, in the layout qemu, nbdkit and libnbd share:
 *
 * - `server/`: `ca-cert.pem`, `server-cert.pem`, `server-key.pem` (for
 *   `nbdkit --tls-certificates` and qemu's `tls-creds-x509,dir=`).
 * - `client/`: `ca-cert.pem`, `client-cert.pem`, `client-key.pem`.
 * - `client-nocert/`: `ca-cert.pem` only.
 * - `other/`: a second, unrelated CA with its own client certificate, to be
 *   distrusted by both sides.
 *
 * The server certificate is for `localhost`, `127.0.0.1` and `::1`.
 * {@linkcode startTlsNbdkits} starts the nbdkit servers both TLS suites
 * use with it.
 *
 * @module
 */

import { output } from "./command.ts";
import { nbdkit, type Server } from "./servers.ts";

/** The files of a test PKI; see the module doc for the layout. */
export interface TestPki extends AsyncDisposable {
  /** The temporary directory holding everything. */
  readonly root: string;
  /** Server credentials: CA, server certificate and key. */
  readonly serverDir: string;
  /** Client credentials: CA and client certificate and key. */
  readonly clientDir: string;
  /** The CA alone, for clients without a certificate. */
  readonly clientNoCertDir: string;
  /** A second CA and a client certificate it signed. */
  readonly otherDir: string;
  /** The CA certificate, PEM. */
  readonly caCert: string;
  /** The client certificate, PEM. */
  readonly clientCert: string;
  /** The client key, PEM. */
  readonly clientKey: string;
  /** Removes the directory. */
  remove(): Promise<void>;
}

const OPENSSL_TIMEOUT_MS = 30_000;

/** Runs `command` (openssl, certtool) in `cwd`, bounded; throws with its stderr. */
async function tool(
  command: string,
  cwd: string,
  args: string[],
): Promise<void> {
  const out = await output(command, args, {
    cwd,
    timeoutMs: OPENSSL_TIMEOUT_MS,
  });
  if (out.code !== 0) {
    throw new Error(`${command} ${args.join(" ")} failed: ${out.stderr}`);
  }
}

function openssl(cwd: string, ...args: string[]): Promise<void> {
  return tool("openssl", cwd, args);
}

function config(cn: string, extensions: string[]): string {
  return [
    "[req]",
    "distinguished_name = dn",
    "prompt = no",
    "[dn]",
    `CN = ${cn}`,
    "[ext]",
    ...extensions,
    "",
  ].join("\n");
}

async function makeCa(dir: string, name: string): Promise<void> {
  await Deno.writeTextFile(
    `${dir}/${name}.cnf`,
    config(`NBD test CA ${name}`, [
      "basicConstraints = critical, CA:TRUE",
      "keyUsage = critical, keyCertSign, cRLSign",
      "subjectKeyIdentifier = hash",
    ]),
  );
  await openssl(
    dir,
    "req",
    "-x509",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
    "-keyout",
    `${name}-key.pem`,
    "-out",
    `${name}-cert.pem`,
    "-days",
    "2",
    "-config",
    `${name}.cnf`,
    "-extensions",
    "ext",
  );
}

async function makeLeaf(
  dir: string,
  ca: string,
  name: string,
  usage: "serverAuth" | "clientAuth",
): Promise<void> {
  await Deno.writeTextFile(
    `${dir}/${name}.cnf`,
    config("localhost", [
      "basicConstraints = critical, CA:FALSE",
      "keyUsage = critical, digitalSignature, keyEncipherment",
      `extendedKeyUsage = ${usage}`,
      "subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1",
    ]),
  );
  await openssl(
    dir,
    "req",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
    "-keyout",
    `${name}-key.pem`,
    "-out",
    `${name}.csr`,
    "-config",
    `${name}.cnf`,
  );
  await openssl(
    dir,
    "x509",
    "-req",
    "-in",
    `${name}.csr`,
    "-CA",
    `${ca}-cert.pem`,
    "-CAkey",
    `${ca}-key.pem`,
    "-CAcreateserial",
    "-out",
    `${name}-cert.pem`,
    "-days",
    "2",
    "-extfile",
    `${name}.cnf`,
    "-extensions",
    "ext",
  );
}

async function place(
  from: string,
  to: string,
  files: Record<string, string>,
): Promise<void> {
  await Deno.mkdir(to);
  for (const [name, source] of Object.entries(files)) {
    await Deno.copyFile(`${from}/${source}`, `${to}/${name}`);
  }
}

/** qemu refuses key files others can read. */
async function keysPrivate(dir: string): Promise<void> {
  for await (const entry of Deno.readDir(dir)) {
    if (entry.name.endsWith("-key.pem")) {
      await Deno.chmod(`${dir}/${entry.name}`, 0o600);
    }
  }
}

/**
 * Makes a CA, a server and a client certificate, and a second CA with its
 * own client certificate.
 *
 * @returns The directories; `await using` removes them.
 */
export async function makeTestPki(): Promise<TestPki> {
  const root = await Deno.makeTempDir({ prefix: "nbd-tls-" });
  try {
    const work = `${root}/work`;
    await Deno.mkdir(work);
    await makeCa(work, "ca");
    await makeLeaf(work, "ca", "server", "serverAuth");
    await makeLeaf(work, "ca", "client", "clientAuth");
    await makeCa(work, "other-ca");
    await makeLeaf(work, "other-ca", "other-client", "clientAuth");

    const serverDir = `${root}/server`;
    const clientDir = `${root}/client`;
    const clientNoCertDir = `${root}/client-nocert`;
    const otherDir = `${root}/other`;
    await place(work, serverDir, {
      "ca-cert.pem": "ca-cert.pem",
      "server-cert.pem": "server-cert.pem",
      "server-key.pem": "server-key.pem",
    });
    await place(work, clientDir, {
      "ca-cert.pem": "ca-cert.pem",
      "client-cert.pem": "client-cert.pem",
      "client-key.pem": "client-key.pem",
    });
    await place(work, clientNoCertDir, { "ca-cert.pem": "ca-cert.pem" });
    await place(work, otherDir, {
      "ca-cert.pem": "other-ca-cert.pem",
      "client-cert.pem": "other-client-cert.pem",
      "client-key.pem": "other-client-key.pem",
    });
    for (const dir of [serverDir, clientDir, otherDir]) await keysPrivate(dir);
    const remove = () => Deno.remove(root, { recursive: true });
    return {
      root,
      serverDir,
      clientDir,
      clientNoCertDir,
      otherDir,
      caCert: await Deno.readTextFile(`${clientDir}/ca-cert.pem`),
      clientCert: await Deno.readTextFile(`${clientDir}/client-cert.pem`),
      clientKey: await Deno.readTextFile(`${clientDir}/client-key.pem`),
      remove,
      [Symbol.asyncDispose]: remove,
    };
  } catch (e) {
    await Deno.remove(root, { recursive: true });
    throw e;
  }
}

/**
 * A server directory (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`)
 * whose certificate for localhost is signed by the PKI's other CA: the
 * stand-in for a publicly trusted certificate, which a client given the
 * PKI's own CA must refuse.
 *
 * @param pki The PKI made by {@linkcode makeTestPki}.
 * @returns The directory, inside the PKI's root.
 */
export async function makeOtherCaServerDir(pki: TestPki): Promise<string> {
  const work = `${pki.root}/work`;
  await makeLeaf(work, "other-ca", "other-server", "serverAuth");
  const dir = `${pki.root}/other-server`;
  await place(work, dir, {
    "ca-cert.pem": "other-ca-cert.pem",
    "server-cert.pem": "other-server-cert.pem",
    "server-key.pem": "other-server-key.pem",
  });
  await keysPrivate(dir);
  return dir;
}

/**
 * A client directory with the PKI's CA and a revocation list
 * (`ca-crl.pem`, made by GnuTLS's `certtool`) that revokes the server's
 * certificate when `revoke`, else nothing.
 *
 * @param pki The PKI made by {@linkcode makeTestPki}.
 * @param revoke Whether the list names the server's certificate.
 * @returns The directory, inside the PKI's root.
 */
export async function makeCrlDir(
  pki: TestPki,
  revoke: boolean,
): Promise<string> {
  const work = `${pki.root}/work`;
  const name = revoke ? "crl-revoked" : "crl-empty";
  await Deno.writeTextFile(
    `${work}/${name}.tmpl`,
    "crl_next_update = 2\ncrl_number = 1\n",
  );
  await tool("certtool", work, [
    "--generate-crl",
    "--load-ca-privkey",
    "ca-key.pem",
    "--load-ca-certificate",
    "ca-cert.pem",
    ...(revoke ? ["--load-certificate", "server-cert.pem"] : []),
    "--template",
    `${name}.tmpl`,
    "--outfile",
    `${name}.pem`,
  ]);
  const dir = `${pki.root}/${name}`;
  await place(work, dir, {
    "ca-cert.pem": "ca-cert.pem",
    "ca-crl.pem": `${name}.pem`,
  });
  return dir;
}

/** nbdkit servers of 1 MiB of memory that require TLS; all stop on dispose. */
export interface TlsNbdkits extends AsyncDisposable {
  /** Over loopback TCP. */
  readonly tcp: Server;
  /** Over a Unix socket. */
  readonly unix: Server;
  /** Over loopback TCP, demanding a client certificate signed by the CA. */
  readonly verifying: Server;
}

/**
 * Starts nbdkit with the PKI's server credentials, `--tls=require`, over
 * TCP and a Unix socket, and once more with `--tls-verify-peer`.
 *
 * @returns The servers; `await using` stops them.
 */
export async function startTlsNbdkits(pki: TestPki): Promise<TlsNbdkits> {
  const tls = ["--tls=require", `--tls-certificates=${pki.serverDir}`];
  const started: Server[] = [];
  const stop = async () => {
    await Promise.all(started.map((s) => s.stop()));
  };
  const start = async (args: string[], tcp: boolean) => {
    const server = await nbdkit([...tls, ...args, "memory", "1M"], { tcp });
    started.push(server);
    return server;
  };
  try {
    return {
      tcp: await start([], true),
      unix: await start([], false),
      verifying: await start(["--tls-verify-peer"], true),
      [Symbol.asyncDispose]: stop,
    };
  } catch (e) {
    await stop();
    throw e;
  }
}

/**
 * The main job: connect to an NBD server (or, given none, start a private
 * `nbdkit memory` export) and show what the client sees: size, flags,
 * block sizes, metadata contexts, a write, a read back and a block-status
 * map.
 *
 *     deno run --allow-net --allow-read --allow-write --allow-run --allow-env examples/demo.ts [URI]
 *
 * @module
 */

import {
  connect,
  type Extent,
  NbdError,
  STATE_HOLE,
  STATE_ZERO,
  transmissionFlagNames,
} from "../mod.ts";
import { visible } from "./_cli.ts";

function human(n: number): string {
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${n} bytes` : `${v.toFixed(1)} ${units[u]}`;
}

function flagWords(flags: number): string {
  return transmissionFlagNames(flags)
    .map((name) => name.replace("NBD_FLAG_", "").toLowerCase())
    .join(" ");
}

function describeExtent(e: Extent): string {
  const kinds = [];
  if (e.flags & STATE_HOLE) kinds.push("hole");
  if (e.flags & STATE_ZERO) kinds.push("zero");
  return kinds.length ? kinds.join(",") : "data";
}

/** Starts `nbdkit memory` on a private socket; returns its URI and a stop. */
async function embeddedServer(): Promise<
  { uri: string; stop: () => Promise<void> }
> {
  const dir = await Deno.makeTempDir({ prefix: "nbd-demo-" });
  const sock = `${dir}/nbd.sock`;
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command("nbdkit", {
      args: ["--exit-with-parent", "-f", "-U", sock, "memory", "64M"],
      stdout: "null",
      stderr: "inherit",
    }).spawn();
  } catch (e) {
    await Deno.remove(dir, { recursive: true });
    throw new Error(
      `No URI given and nbdkit could not be started (${
        (e as Error).message
      }); install it with: apt-get install nbdkit`,
    );
  }
  const deadline = Date.now() + 10_000;
  while (true) {
    try {
      await Deno.stat(sock);
      break;
    } catch {
      if (Date.now() > deadline) {
        throw new Error("nbdkit did not start in 10 s");
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  console.log(`started nbdkit memory 64M on ${sock}`);
  return {
    uri: `nbd+unix:///?socket=${sock}`,
    stop: async () => {
      child.kill("SIGTERM");
      await child.status;
      await Deno.remove(dir, { recursive: true });
    },
  };
}

async function main(args: string[]): Promise<number> {
  const server = args[0] ? undefined : await embeddedServer();
  const uri = args[0] ?? server!.uri;
  try {
    await using nbd = await connect(uri, {
      signal: AbortSignal.timeout(10_000),
      metaContexts: ["base:allocation"],
    });
    const row = (k: string, v: string) => console.log(`${k.padEnd(15)}${v}`);
    row("uri:", uri);
    row("export:", JSON.stringify(nbd.exportName));
    if (nbd.description) row("description:", visible(nbd.description));
    row("size:", `${nbd.sizeBigInt} (${human(nbd.size)})`);
    row("protocol:", nbd.protocol);
    row(
      "negotiated:",
      [
        nbd.structuredReplies ? "structured replies" : "simple replies",
        nbd.extendedHeaders ? "extended headers" : "",
        nbd.tls ? "TLS" : "no TLS",
      ].filter(Boolean).join(", "),
    );
    row("flags:", flagWords(nbd.flags));
    const bs = nbd.blockSize;
    row(
      "block sizes:",
      `minimum ${bs.minimum}, preferred ${bs.preferred}, maximum ${bs.maximum}${
        nbd.blockSizeAdvertised ? "" : " (not advertised: defaults)"
      }`,
    );
    row("contexts:", nbd.metaContexts.join(", ") || "(none)");

    const length = Math.min(1 << 20, nbd.size);
    const offset = Math.min(4 << 20, nbd.size - length);
    if (!nbd.readOnly) {
      const data = new Uint8Array(length);
      for (let i = 0; i < length; i++) data[i] = (i * 31 + 7) & 0xff;
      let t = performance.now();
      await nbd.write(offset, data, { fua: nbd.canFua });
      row(
        "write:",
        `${human(length)} at offset ${offset} in ${
          (performance.now() - t).toFixed(1)
        } ms`,
      );
      t = performance.now();
      const back = await nbd.read(offset, length);
      const same = back.every((b, i) => b === data[i]);
      row(
        "read back:",
        `${human(length)} in ${(performance.now() - t).toFixed(1)} ms: ${
          same ? "matches" : "DIFFERS"
        }`,
      );
      if (!same) return 1;
    } else {
      row("write:", "skipped (read-only export)");
    }
    if (nbd.canBlockStatus) {
      console.log("block status (base:allocation):");
      let at = 0;
      let shown = 0;
      while (at < nbd.size && shown < 20) {
        const map = await nbd.blockStatus(at, nbd.size - at);
        const extents = map["base:allocation"] ?? [];
        if (extents.length === 0) break;
        for (const e of extents) {
          console.log(
            `  ${String(e.offset).padStart(12)} ${
              human(e.length).padStart(12)
            }  ${describeExtent(e)}`,
          );
          at = e.offset + e.length;
          if (++shown >= 20) break;
        }
      }
    } else {
      row("block status:", "not available from this server");
    }
    return 0;
  } catch (e) {
    if (e instanceof NbdError || e instanceof Error) {
      console.error(`demo: ${e.message}`);
      return 1;
    }
    throw e;
  } finally {
    await server?.stop();
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));

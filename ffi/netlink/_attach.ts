/**
 * Attaching over the kernel's netlink interface: N negotiated connections
 * handed over in one `NBD_CMD_CONNECT`, `BLKROSET` after it, and a
 * supervisor that either redials (persist) or disconnects when a link
 * dies. No thread of this process waits in the kernel: on the direct path
 * the device outlives the process; on the relay path (TLS) the relays are
 * this process's, so the device's links die with it.
 *
 * @module
 */

import type { ConnectOptions } from "../../lib/connect_options.ts";
import {
  FLAG_CAN_MULTI_CONN,
  FLAG_HAS_FLAGS,
  FLAG_READ_ONLY,
} from "../../lib/constants.ts";
import type { Tracer } from "../../lib/_debug.ts";
import { abortReason, NbdError } from "../../lib/errors.ts";
import type { ExportInfo } from "../../lib/export.ts";
import { exportChanges } from "../../lib/reconnect.ts";
import { AttachedBase, stopRelays } from "../_attached.ts";
import {
  connectForKernel,
  hangUp,
  type KernelConnection,
  type KernelConnectOptions,
} from "../_connect.ts";
import { kernelGeometry } from "../_geometry.ts";
import { setReadOnly } from "../_kernel.ts";
import { cString, E, libc, O_CLOEXEC, O_RDONLY } from "../_libc.ts";
import { superviseDevice } from "./_supervisor.ts";
import { type Relay, startRelay } from "../_relay.ts";
import { NbdKernelError } from "../errors.ts";
import {
  connectDevice,
  type ConnectDeviceOptions,
  disconnectDevice,
  type LinkDeadWatch,
  watchLinkDead,
} from "./mod.ts";

/** Seconds I/O waits for a dead link to be replaced under persist. */
export const PERSIST_DEAD_TIMEOUT = 60;

/** What {@linkcode attachByNetlink} needs, already checked. */
export interface NetlinkAttachPlan {
  /** The device path, or undefined for any free device. */
  path: string | undefined;
  /** Its index, or undefined for any free device. */
  index: number | undefined;
  target: ConnectOptions;
  connect: KernelConnectOptions;
  connections: number;
  persist: boolean;
  /** Seconds; undefined for the kernel's default (fail at once). */
  deadConnectionTimeout: number | undefined;
  timeout: number | undefined;
  blockSize: number | undefined;
  readOnly: boolean;
  page: number;
  trace: Tracer;
}

/**
 * What differs between the export the device was built on and the one a
 * new connection reached, in words (`lib/reconnect.ts`'s rule, the one the
 * library's own reconnect uses); `undefined` when it is the same export.
 *
 * @param first What the device was built on.
 * @param again What a new connection negotiated.
 * @param connections How many connections the device has (several rely
 *   on `NBD_FLAG_CAN_MULTI_CONN` too).
 * @returns The changes joined in one phrase, or `undefined`.
 */
export function exportDiffers(
  first: ExportInfo,
  again: ExportInfo,
  connections: number,
): string | undefined {
  const changes = exportChanges(first, again, connections > 1);
  return changes.length > 0 ? changes.join("; ") : undefined;
}

/**
 * Dials, negotiates and checks `count` connections, handing each to
 * `keep` as it comes; refuses several without multi-conn after the first.
 */
async function dialAll(
  plan: NetlinkAttachPlan,
  keep: (c: KernelConnection) => void,
): Promise<ExportInfo> {
  const device = plan.path ?? "an nbd device";
  const first = await connectForKernel(plan.target, plan.connect, plan.trace);
  keep(first);
  const info = first.info;
  if (plan.connections > 1 && (info.flags & FLAG_CAN_MULTI_CONN) === 0) {
    throw new NbdKernelError(
      device,
      "",
      E.EINVAL,
      `Cannot attach ${device} with ${plan.connections} connections: the export does not allow several (no NBD_FLAG_CAN_MULTI_CONN); use one`,
      "other",
    );
  }
  for (let i = 1; i < plan.connections; i++) {
    const c = await connectForKernel(plan.target, plan.connect, plan.trace);
    keep(c);
    const differs = exportDiffers(info, c.info, plan.connections);
    if (differs) {
      throw new NbdError(
        `Connection ${
          i + 1
        } of ${plan.connections} reached a different export: ${differs}`,
      );
    }
  }
  return info;
}

/** `BLKROSET` on a device that is up, from a pool-thread open. */
async function setReadOnlyAfterConnect(
  path: string,
  readOnly: boolean,
): Promise<void> {
  const c = libc();
  // Opening a device that is up reads its partition table (which also
  // makes partitions appear; no udev does it here). On a pool thread: on
  // the relay path this very thread serves that read.
  const fd = await c.open_nb(cString(path), O_RDONLY | O_CLOEXEC, 0);
  if (fd < 0) {
    throw new NbdKernelError(path, "open", 0, `Cannot open ${path}`);
  }
  try {
    setReadOnly(path, fd, readOnly);
  } finally {
    await c.close_nb(fd);
  }
}

/**
 * Attaches over netlink and starts supervising the device.
 *
 * @throws {NbdKernelError} when the kernel refuses, or the export does
 *   not fit or does not allow several connections.
 * @throws {NbdError} when connecting or negotiating fails.
 */
export async function attachByNetlink(
  plan: NetlinkAttachPlan,
): Promise<NetlinkAttachment> {
  const signal = plan.connect.signal;
  // Subscribed before the connect, so no dead link goes unseen.
  const watch = await watchLinkDead();
  const conns: KernelConnection[] = [];
  const relays: Relay[] = [];
  let index: number | undefined;
  try {
    const info = await dialAll(plan, (c) => conns.push(c));
    if (signal?.aborted) throw abortReason(signal);
    const readOnly = plan.readOnly || (info.flags & FLAG_READ_ONLY) !== 0;
    const geometry = kernelGeometry(
      plan.path ?? "the device",
      info,
      plan.page,
      plan.blockSize,
    );
    for (const c of conns) {
      if (c.relay) relays.push(startRelay(c.relay.local, c.relay.remote));
    }
    const serverFlags = FLAG_HAS_FLAGS | info.flags |
      (readOnly ? FLAG_READ_ONLY : 0);
    plan.trace?.("netlink.connect", {
      device: plan.path,
      connections: conns.length,
      size: geometry.bytes,
      blockSize: geometry.blockSize,
      serverFlags,
    });
    const settings: ConnectDeviceOptions = {
      sockets: conns.map((c) => c.sockFd),
      size: BigInt(geometry.bytes),
      blockSize: geometry.blockSize,
      serverFlags,
    };
    if (plan.index !== undefined) settings.index = plan.index;
    if (plan.timeout !== undefined) settings.timeout = plan.timeout;
    if (plan.deadConnectionTimeout !== undefined) {
      settings.deadConnectionTimeout = plan.deadConnectionTimeout;
    }
    index = await connectDevice(settings);
    // The kernel holds its own references: ours go (the relays keep
    // their ends).
    for (const c of conns.splice(0)) libc().close(c.sockFd);
    const path = `/dev/nbd${index}`;
    // BLKROSET sticks to the device across connections: always set it.
    await setReadOnlyAfterConnect(path, readOnly);
    if (signal?.aborted) throw abortReason(signal);
    plan.trace?.("kernel.up", { device: path, size: geometry.bytes });
    return new NetlinkAttachment({
      plan,
      path,
      index,
      info,
      watch,
      relays,
      readOnly,
      size: geometry.bytes,
      blockSize: geometry.blockSize,
    });
  } catch (e) {
    await watch.return();
    if (index !== undefined) {
      await disconnectDevice(index).catch(() => {});
    }
    for (const c of conns) await hangUp(c);
    for (const r of relays) r.stop();
    throw e;
  }
}

interface Parts {
  plan: NetlinkAttachPlan;
  path: string;
  index: number;
  info: ExportInfo;
  watch: LinkDeadWatch;
  relays: Relay[];
  readOnly: boolean;
  size: number;
  blockSize: number;
}

/**
 * A device attached over netlink, under supervision. Signals,
 * disconnect-once and disposal are the shared base's (`../_attached.ts`).
 */
export class NetlinkAttachment extends AttachedBase {
  readonly kernelInterface = "netlink" as const;
  readonly persist: boolean;
  #disconnect: () => Promise<unknown>;
  #relays: Relay[];

  constructor(parts: Parts) {
    const { plan, info } = parts;
    super({
      device: parts.path,
      size: parts.size,
      blockSize: parts.blockSize,
      readOnly: parts.readOnly,
      info,
      route: parts.relays.length > 0 ? "relay" : "direct",
      connections: plan.connections,
    });
    this.persist = plan.persist;
    this.#relays = parts.relays;
    const redial = async (stop: AbortSignal): Promise<number> => {
      const c = await connectForKernel(plan.target, {
        ...plan.connect,
        signal: stop,
      }, plan.trace);
      const differs = exportDiffers(info, c.info, plan.connections);
      if (differs) {
        await hangUp(c);
        throw new NbdError(
          `The server now offers a different export: ${differs}`,
        );
      }
      if (c.relay) this.#relays.push(startRelay(c.relay.local, c.relay.remote));
      return c.sockFd;
    };
    const supervised = superviseDevice({
      index: parts.index,
      watch: parts.watch,
      connections: plan.connections,
      ...(plan.persist
        ? {
          redial,
          // Redial for as long as I/O waits, and for at least a minute
          // even when I/O fails at once meanwhile.
          giveUpAfterMs: 1000 *
            Math.max(
              plan.deadConnectionTimeout ?? PERSIST_DEAD_TIMEOUT,
              PERSIST_DEAD_TIMEOUT,
            ),
        }
        : {}),
      ...(plan.trace ? { debug: plan.trace } : {}),
    });
    this.#disconnect = () => supervised.disconnect();
    void supervised.closed.then(async (r) => {
      this.beginRelease();
      const relayError = await stopRelays(this.#relays);
      this.settle({
        requested: r.requested,
        reason: r.reason,
        message: r.message,
        error: r.error ??
          (relayError instanceof Error ? relayError : undefined),
      });
    });
  }

  protected askDisconnect(): void {
    void this.#disconnect();
  }

  /**
   * NBD_CMD_DISCONNECT has already shut the kernel's sockets down; what
   * may still wait for the server is a relay carrying NBD_CMD_DISC.
   */
  protected cut(): void {
    for (const relay of this.#relays) relay.stop();
  }
}

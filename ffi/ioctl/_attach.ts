/**
 * Attaching through ioctls: one negotiated connection, the device
 * configured with `NBD_SET_*` (`_configure.ts`), then `NBD_DO_IT` on a
 * worker for as long as the device is up (`_attachment.ts`). The device
 * goes with this process.
 *
 * @module
 */

import type { ConnectOptions } from "../../lib/connect_options.ts";
import { FLAG_READ_ONLY } from "../../lib/constants.ts";
import type { Tracer } from "../../lib/_debug.ts";
import { abortReason } from "../../lib/errors.ts";
import {
  connectForKernel,
  hangUp,
  type KernelConnection,
  type KernelConnectOptions,
} from "../_connect.ts";
import { kernelGeometry } from "../_geometry.ts";
import { deviceName, openDevice } from "../_kernel.ts";
import { libc } from "../_libc.ts";
import { IoctlAttachment } from "./_attachment.ts";
import { configureDevice } from "./_configure.ts";

/** What {@linkcode attachByIoctl} needs, already checked. */
export interface IoctlAttachPlan {
  connect: KernelConnectOptions;
  page: number;
  trace: Tracer;
  readOnly: boolean;
  /** Seconds; undefined for the kernel's default. */
  timeout: number | undefined;
  blockSize: number | undefined;
  /** Milliseconds for the device to come up once handed over. */
  startTimeout: number;
}

/**
 * The ioctl path: one connection, `NBD_DO_IT` on a worker. The device has
 * been checked (it exists, may be opened, and is free).
 *
 * @param connectOptions The server and export.
 * @param path The device path, e.g. `"/dev/nbd0"`.
 * @param plan The rest of the settings.
 * @returns The attachment, up; the caller watches it for signals.
 * @throws {NbdKernelError} when the kernel refuses or the device does not
 *   come up.
 * @throws {NbdError} when connecting or negotiating fails.
 */
export async function attachByIoctl(
  connectOptions: ConnectOptions,
  path: string,
  plan: IoctlAttachPlan,
): Promise<IoctlAttachment> {
  const { connect, page, trace } = plan;
  const name = deviceName(path);
  const signal = connect.signal;
  const devFd = openDevice(path);
  // Until the attachment owns them, the failure path closes the device and
  // hangs up the connection.
  let conn: KernelConnection | undefined;
  let attachment: IoctlAttachment | undefined;
  try {
    conn = await connectForKernel(connectOptions, connect, trace);
    const { info, sockFd, relay } = conn;
    if (signal?.aborted) throw abortReason(signal);
    const readOnly = plan.readOnly || (info.flags & FLAG_READ_ONLY) !== 0;
    const geometry = kernelGeometry(path, info, page, plan.blockSize);
    configureDevice(path, devFd, {
      geometry,
      flags: info.flags,
      readOnly,
      timeout: plan.timeout,
      sockFd,
    }, trace);
    attachment = new IoctlAttachment({
      device: path,
      name,
      devFd,
      sockFd,
      info,
      blockSize: geometry.blockSize,
      size: geometry.bytes,
      readOnly,
      relay,
      trace,
    });
  } catch (e) {
    if (conn) await hangUp(conn);
    libc().close(devFd);
    throw e;
  }
  // From here on the attachment owns the descriptors.
  await attachment.start(plan.startTimeout);
  if (signal?.aborted) {
    // Aborted while the device came up: take it down again.
    await attachment.disconnect();
    throw abortReason(signal);
  }
  return attachment;
}

/**
 * Whether an export fits the kernel, and how: the logical block size, the
 * number of blocks and the bytes the device will show. Pure arithmetic;
 * every refusal is one {@linkcode NbdKernelError} of reason `"size"`.
 *
 * @module
 */

import { errorText } from "../lib/errors.ts";
import type { ExportInfo } from "../lib/export.ts";
import { chooseBlockSize, KERNEL_MAX_BYTES } from "./_kernel.ts";
import { E } from "./_libc.ts";
import { NbdKernelError } from "./errors.ts";

/** How the device will look. */
export interface Geometry {
  /** The logical block size given to the kernel. */
  blockSize: number;
  /** Whole blocks of the export (`NBD_SET_SIZE_BLOCKS`). */
  blocks: bigint;
  /** The device's size in bytes: `blocks * blockSize`, exact as a number. */
  bytes: number;
}

/**
 * Works out the device's geometry for an export.
 *
 * @param device The device path, for messages.
 * @param info What the handshake settled.
 * @param page The page size, the kernel's largest block size.
 * @param requested The block size asked for, if any.
 * @returns The geometry.
 * @throws {NbdKernelError} (reason `"size"`) when the export does not fit.
 */
export function kernelGeometry(
  device: string,
  info: Pick<ExportInfo, "size" | "blockSize">,
  page: number,
  requested: number | undefined,
): Geometry {
  const refuse = (errno: number, why: string) =>
    new NbdKernelError(
      device,
      "",
      errno,
      `Cannot attach to ${device}: ${why}`,
      "size",
    );
  let blockSize: number;
  try {
    blockSize = chooseBlockSize(info, page, requested);
  } catch (e) {
    throw refuse(0, errorText(e));
  }
  if (info.size > KERNEL_MAX_BYTES) {
    throw refuse(
      E.EOVERFLOW,
      `the export's ${info.size} bytes exceed the kernel's limit of ${KERNEL_MAX_BYTES}`,
    );
  }
  const blocks = info.size / BigInt(blockSize);
  if (blocks === 0n) {
    throw refuse(
      0,
      `the export (${info.size} bytes) is smaller than one block of ${blockSize} bytes`,
    );
  }
  const bytes = blocks * BigInt(blockSize);
  if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw refuse(
      E.EOVERFLOW,
      `${bytes} bytes is more than this API can report exactly`,
    );
  }
  return { blockSize, blocks, bytes: Number(bytes) };
}

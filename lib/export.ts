/**
 * What negotiation settles about an export: the types every later phase
 * (transmission, the client, the kernel handoff) reads, and the defaults the
 * spec gives when a server advertises nothing.
 *
 * @module
 */

/** Which handshake the server spoke. */
export type Protocol = "oldstyle" | "newstyle" | "fixed newstyle";

/** Block size constraints, in bytes. */
export interface BlockSize {
  /** Smallest addressable unit; offsets and lengths are multiples of it. */
  minimum: number;
  /** Size at which I/O is efficient. */
  preferred: number;
  /** Largest payload the server takes in one request. */
  maximum: number;
}

/**
 * The constraints in force when the server advertises none
 * (`doc/proto.md`, "Block size constraints"): any byte offset, 4 KiB
 * preferred, no limit beyond the 32-bit length field.
 */
export const DEFAULT_BLOCK_SIZE: Readonly<BlockSize> = Object.freeze({
  minimum: 1,
  preferred: 4096,
  maximum: 0xffffffff,
});

/** What the handshake settled. */
export interface ExportInfo {
  /** The export name (the server's canonical name when it sent one). */
  exportName: string;
  /** The server's description of the export, or `""`. */
  description: string;
  /** Size in bytes. */
  size: bigint;
  /** Transmission flags. */
  flags: number;
  /** Block size constraints in force (defaults when none were advertised). */
  blockSize: BlockSize;
  /** Whether the server advertised `NBD_INFO_BLOCK_SIZE`. */
  blockSizeAdvertised: boolean;
  /** The greeting style. */
  protocol: Protocol;
  /** Whether structured replies are in use. */
  structuredReplies: boolean;
  /** Whether extended headers are in use. */
  extendedHeaders: boolean;
  /** Whether the connection runs over TLS. */
  tls: boolean;
  /** Negotiated metadata contexts, by the id the server gave them. */
  metaContexts: Map<number, string>;
  /**
   * With `listMetaContexts`: every context the server offers for the
   * export, as it listed them; absent when not listed (not asked, or no
   * structured replies).
   */
  availableMetaContexts?: string[];
}

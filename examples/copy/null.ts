/**
 * `null:`, the destination that keeps nothing.
 *
 * @module
 */

import type { Destination, LaneSpec, ZeroMode } from "./endpoint.ts";

/** `null:`: takes everything, keeps nothing. */
export class NullDestination implements Destination {
  readonly name = "null:";
  readonly size = undefined;
  readonly sequential = false;
  readonly alignment = 1;
  readonly preferred = 4096;
  readonly maxLanes = Infinity;
  // "write", not "skip": scanning data for zeroes that are thrown away
  // anyway would only slow down the measurement null: is for.
  readonly zeroMode: ZeroMode = "write";
  prepare(): Promise<void> {
    return Promise.resolve();
  }
  write(): Promise<void> {
    return Promise.resolve();
  }
  zero(): Promise<void> {
    return Promise.resolve();
  }
  finish(): Promise<void> {
    return Promise.resolve();
  }
  addLanes(): Promise<void> {
    return Promise.resolve();
  }
  lane(): LaneSpec {
    return { kind: "null" };
  }
  close(): Promise<void> {
    return Promise.resolve();
  }
}

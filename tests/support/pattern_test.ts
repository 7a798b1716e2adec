import assert from "node:assert/strict";
import { nbdkitPattern, pattern } from "./pattern.ts";

Deno.test("pattern() is one stream per seed, addressable by offset", async (t) => {
  await t.step("any window agrees with the whole", () => {
    const whole = pattern(4096, 3);
    for (const [offset, length] of [[0, 1], [1, 7], [3, 4096 - 3], [4093, 3]]) {
      assert.deepEqual(
        pattern(length!, 3, offset),
        whole.subarray(offset, offset! + length!),
      );
    }
  });

  await t.step("seeds differ, and no short period repeats", () => {
    assert.notDeepEqual(pattern(64, 1), pattern(64, 2));
    const bytes = pattern(1 << 16);
    for (const period of [4, 8, 256, 512, 4096]) {
      assert.notDeepEqual(
        bytes.subarray(0, 512),
        bytes.subarray(period, period + 512),
        `period ${period}`,
      );
    }
  });
});

Deno.test("nbdkitPattern() holds each 8-byte word's offset", () => {
  // The last 2 bytes of word 0, word 8, the first 2 bytes of word 16.
  assert.deepEqual(
    nbdkitPattern(6, 12),
    Uint8Array.of(0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0),
  );
  const far = nbdkitPattern(2 ** 40 + 8, 8);
  assert.equal(
    new DataView(far.buffer, far.byteOffset).getBigUint64(0),
    2n ** 40n + 8n,
  );
});

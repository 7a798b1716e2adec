/**
 * `--can`, `--is`, `--has` and their negations: the feature names nbdinfo
 * 1.22 accepts, each a question about the session or the export.
 *
 * @module
 */

import type { Capabilities } from "../../mod.ts";
import { UsageError } from "../_cli.ts";
import type { ExportFacts, SessionFacts } from "./facts.ts";

/** One question, answered from what was gathered. */
export type FeatureTest = (s: SessionFacts, e: ExportFacts) => boolean;

const can = (name: keyof Capabilities): FeatureTest => (_s, e) => e.can[name];

/**
 * `--can`/`--is`/`--has` answers by the names nbdinfo 1.22 accepts, and
 * only those, in any case.
 */
const FEATURES: ReadonlyArray<[string[], FeatureTest]> = [
  [["connect", "read"], () => true],
  [["tls"], (s) => s.tls],
  [
    [
      "sr",
      "structured",
      "structured reply",
      "structured-reply",
      "structured_reply",
      "structured replies",
      "structured-replies",
      "structured_replies",
    ],
    (s) => s.structuredReplies,
  ],
  [
    [
      "eh",
      "extended header",
      "extended-header",
      "extended_header",
      "extended headers",
      "extended-headers",
      "extended_headers",
    ],
    (s) => s.extendedHeaders,
  ],
  [["readonly", "read-only", "read_only"], can("readOnly")],
  [["write"], (_s, e) => !e.can.readOnly],
  [["rotational"], can("rotational")],
  [
    ["block status payload", "block-status-payload", "block_status_payload"],
    can("canBlockStatusPayload"),
  ],
  [["cache"], can("canCache")],
  [["df"], can("canDf")],
  [["fastzero", "fast-zero", "fast_zero"], can("canFastZero")],
  [["flush"], can("canFlush")],
  [["fua"], can("canFua")],
  [["multiconn", "multi-conn", "multi_conn"], can("canMultiConn")],
  [["trim"], can("canTrim")],
  [["zero"], can("canWriteZeroes")],
];

/**
 * Finds the test for a feature name, negated for `--cannot`, `--isnt` and
 * `--hasnt`.
 *
 * @throws {UsageError} For a name nbdinfo would not know either, in
 *   nbdinfo's words.
 */
export function featureTest(name: string, negated: boolean): FeatureTest {
  const key = name.toLowerCase();
  const found = FEATURES.find(([names]) => names.includes(key));
  if (!found) {
    throw new UsageError(
      `unknown ${
        negated ? "--cannot/--isnt/--hasnt" : "--can/--is/--has"
      } option: ${name}`,
    );
  }
  const test = found[1];
  return negated ? (s, e) => !test(s, e) : test;
}

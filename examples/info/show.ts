/**
 * The report of one export and of the session, in text and in JSON, with
 * nbdinfo 1.22's fields, names and order.
 *
 * @module
 */

import type { Capabilities } from "../../mod.ts";
import { exactSize, visible } from "../_cli.ts";
import type { ExportFacts, SessionFacts, Target } from "./facts.ts";

/**
 * JSON as nbdinfo writes it, where a bigint is a number with every digit
 * (`JSON.stringify` refuses bigints, and a double would round 2^63 - 1).
 */
export function jsonText(value: unknown, indent?: number): string {
  const digits: string[] = [];
  const text = JSON.stringify(
    value,
    (_key, v) => {
      if (typeof v !== "bigint") return v;
      digits.push(v.toString());
      return `\u0000bigint${digits.length - 1}\u0000`;
    },
    indent,
  );
  // JSON.stringify leaves DEL and C1 raw; escaped, they read the same to a
  // parser and do nothing to a terminal. Only strings hold them, and the
  // only newlines are the layout's.
  return text.replace(
    /"\\u0000bigint(\d+)\\u0000"/g,
    (_all, i: string) => digits[Number(i)]!,
  ).split("\n").map(visible).join("\n");
}

/**
 * The URI of another export on the same server; `null` for a server the
 * tool started, which has no address once the tool is gone (nbdinfo leaves
 * `uri` out for `[ CMD ]` too).
 */
export function exportUri(target: Target, name: string): string | null {
  if (typeof target !== "string") return null;
  const uri = target;
  try {
    const u = new URL(uri);
    const path = "/" + encodeURIComponent(name).replaceAll("%2F", "/");
    return `${u.protocol}//${u.host}${path}${u.search}`;
  } catch {
    return uri;
  }
}

/** The booleans nbdinfo reports, in its order. */
function capabilityList(can: Capabilities): Array<[string, boolean]> {
  return [
    ["is_rotational", can.rotational],
    ["is_read_only", can.readOnly],
    ["can_block_status_payload", can.canBlockStatusPayload],
    ["can_cache", can.canCache],
    ["can_df", can.canDf],
    ["can_fast_zero", can.canFastZero],
    ["can_flush", can.canFlush],
    ["can_fua", can.canFua],
    ["can_multi_conn", can.canMultiConn],
    ["can_trim", can.canTrim],
    ["can_zero", can.canWriteZeroes],
  ];
}

/** One export as a JSON object: nbdinfo 1.22's fields, in its order. */
export function exportJson(
  uri: string | null,
  e: ExportFacts,
): Record<string, unknown> {
  const o: Record<string, unknown> = { "export-name": e.exportName };
  if (e.description) o["description"] = e.description;
  if (e.content !== null) o["content"] = e.content;
  if (uri !== null) o["uri"] = uri;
  if (e.contexts) o["contexts"] = e.contexts;
  for (const [name, value] of capabilityList(e.can)) o[name] = value;
  if (e.blockSize) {
    o["block_size_minimum"] = e.blockSize.minimum;
    o["block_size_preferred"] = e.blockSize.preferred;
    o["block_size_maximum"] = e.blockSize.maximum;
  }
  o["export-size"] = e.size;
  o["export-size-str"] = exactSize(e.size).text;
  return o;
}

/** The session as JSON fields. */
export function sessionJson(s: SessionFacts): Record<string, unknown> {
  return {
    protocol: s.protocol,
    TLS: s.tls,
    structured: s.structuredReplies,
    extended: s.extendedHeaders,
  };
}

/** The session in one line of text. */
export function sessionText(s: SessionFacts): string {
  const packets = s.extendedHeaders
    ? "extended"
    : s.structuredReplies
    ? "structured"
    : "simple";
  return `protocol: ${s.protocol} ${
    s.tls ? "with" : "without"
  } TLS, using ${packets} packets\n`;
}

/** A size as nbdinfo prints it in text: `4096 (4K)`, `4294967295`. */
function sizeText(bytes: number | bigint): string {
  const size = exactSize(bytes);
  return `${bytes}${size.scaled ? ` (${size.text})` : ""}`;
}

/** One export as text, a field a line. */
export function exportText(uri: string | null, e: ExportFacts): string {
  // Every string here but the numbers' is the server's: escaped.
  const lines = [`export=${visible(JSON.stringify(e.exportName))}:`];
  if (e.description) lines.push(`\tdescription: ${visible(e.description)}`);
  lines.push(`\texport-size: ${sizeText(e.size)}`);
  if (e.content !== null) lines.push(`\tcontent: ${visible(e.content)}`);
  if (uri !== null) lines.push(`\turi: ${visible(uri)}`);
  if (e.contexts) {
    lines.push("\tcontexts:");
    for (const c of e.contexts) lines.push(`\t\t${visible(c)}`);
  }
  for (const [name, value] of capabilityList(e.can)) {
    lines.push(`\t${name}: ${value}`);
  }
  if (e.blockSize) {
    lines.push(`\tblock_size_minimum: ${sizeText(e.blockSize.minimum)}`);
    lines.push(`\tblock_size_preferred: ${sizeText(e.blockSize.preferred)}`);
    lines.push(`\tblock_size_maximum: ${sizeText(e.blockSize.maximum)}`);
  }
  return lines.join("\n") + "\n";
}

/**
 * `info`'s command line: the usage text, the options, and what they ask for.
 *
 * @module
 */

import {
  type Answered,
  type OptionSpec,
  parseArgs,
  serverCommand,
  UsageError,
  VERSION_OPTION,
} from "../_cli.ts";
import { type FeatureTest, featureTest } from "./can.ts";
import type { Target } from "./facts.ts";

/** What `--help` prints. */
export const USAGE = `Usage:
  info [--json] NBD                      the export and the connection
  info --list [--json] NBD               every export the server lists
  info --map[=CONTEXT] [--totals] [--json] NBD
                                         extents of base:allocation or CONTEXT
  info --size [--json] NBD               the size in bytes
  info --uri [--json] NBD                the URI
  info --can FEATURE NBD                 exit 0 if the export can, 2 if not
  info --cannot FEATURE NBD              exit 0 if it cannot, 2 if it can
  info --is read-only|rotational|tls NBD     (and --isnt)
  info --has structured-reply|extended-headers NBD     (and --hasnt)

NBD: an NBD URI, or a server to run: [ CMD ARGS ... ]
     ([ nbdkit -s memory 1G ], [ qemu-nbd -r -f qcow2 disk.qcow2 ])
FEATURE: connect read write flush fua trim zero fast-zero cache df
         multi-conn block-status-payload (--can, --is and --has take
         each other's words too)
Options:
  --json        JSON output (field names as nbdinfo --json)
  -L, --list    list all exports (the URI's export name is ignored)
  --totals      with --map: bytes and percentage of each extent type
  --content     show what file(1) says of the first 8 KiB (the default,
                but with --list); --no-content: do not
  -h, --help    this text
  -V, --version print the version and exit
`;

const OPTIONS: OptionSpec[] = [
  { name: "json", kind: "flag" },
  { name: "list", kind: "flag", short: "L" },
  { name: "map", kind: "optional" },
  { name: "totals", kind: "flag" },
  { name: "size", kind: "flag" },
  { name: "uri", kind: "flag" },
  { name: "can", kind: "value" },
  { name: "cannot", kind: "value" },
  { name: "is", kind: "value" },
  { name: "isnt", kind: "value" },
  { name: "has", kind: "value" },
  { name: "hasnt", kind: "value" },
  { name: "help", kind: "flag", short: "h" },
  VERSION_OPTION,
  { name: "content", kind: "flag" },
  { name: "no-content", kind: "flag" },
];

/** The feature tests, and those of them that negate. */
const TESTS = ["can", "cannot", "is", "isnt", "has", "hasnt"];
const NEGATED = new Set(["cannot", "isnt", "hasnt"]);

/** What the command line asks for. */
export type Request =
  | {
    mode: "show" | "list";
    target: Target;
    json: boolean;
    content: boolean;
  }
  | { mode: "size" | "uri"; target: Target; json: boolean }
  | {
    mode: "map";
    target: Target;
    json: boolean;
    context: string;
    totals: boolean;
  }
  | { mode: "can"; target: Target; test: FeatureTest };

/**
 * Reads the command line.
 *
 * @throws {UsageError} For anything nbdinfo would refuse too, and for
 *   what this tool cannot do with a server it starts (name its URI).
 */
export function parseRequest(args: string[]): Request | Answered {
  const { options: o, positionals, commands, order } = parseArgs(
    args,
    OPTIONS,
  );
  if (o.has("help")) return "help";
  if (o.has("version")) return "version";
  if (positionals.length !== 1) {
    throw new UsageError(
      positionals.length === 0
        ? "a URI or [ CMD ARGS ... ] is required"
        : "too many arguments",
    );
  }
  const given = ["list", "map", "size", "uri", ...TESTS].filter((m) =>
    o.has(m)
  );
  const modes = given.filter((m) => !TESTS.includes(m));
  if (given.length > modes.length) modes.push("can");
  if (modes.length > 1) {
    throw new UsageError(
      `you cannot use ${given.map((m) => `--${m}`).join(" and ")} together`,
    );
  }
  if (o.has("totals") && !o.has("map")) {
    throw new UsageError("--totals needs --map");
  }
  const command = commands[0];
  const target: Target = command ? serverCommand(command) : positionals[0]!;
  const json = o.has("json");
  // As nbdinfo 1.22: the last feature named is tested, and any negative
  // option negates it.
  const test = order.findLast((name) => TESTS.includes(name));
  if (test !== undefined) {
    const feature = String(o.get(test));
    const negated = order.some((name) => NEGATED.has(name));
    return { mode: "can", target, test: featureTest(feature, negated) };
  }
  const map = o.get("map");
  if (map !== undefined) {
    return {
      mode: "map",
      target,
      json,
      context: typeof map === "string" ? map : "base:allocation",
      totals: o.has("totals"),
    };
  }
  if (command && o.has("uri")) {
    throw new UsageError(
      "--uri needs a URI: a server run as [ CMD ] has no address once info exits",
    );
  }
  if (o.has("size") || o.has("uri")) {
    return { mode: o.has("size") ? "size" : "uri", target, json };
  }
  const mode = o.has("list") ? "list" : "show";
  // As nbdinfo: the content is probed by default, but for every export
  // of a list, where it would cost a read each.
  const content = o.has("content") ||
    (mode === "show" && !o.has("no-content"));
  return { mode, target, json, content };
}

// Error types shared across the project. Messages name what is wrong and where, in the
// project's terms; the CLI prints `message` alone (stack with EP_ACTORS_DEBUG=1).

/** Bad command-line usage or an impossible configuration; exit code 1. */
export class UsageError extends Error {
  override name = 'UsageError';
}

/** A case file or its contents are malformed (names the tensor and what is wrong). */
export class CaseError extends Error {
  override name = 'CaseError';
}

export function describeError(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

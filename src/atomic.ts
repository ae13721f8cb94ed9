// Writing a file so that readers see the old file or the whole new one, never a part.
import { open, rename, rm } from 'node:fs/promises';

/**
 * Write to `${path}.<pid>.<random>.tmp`, flush it, then rename over `path`. On any failure
 * the temporary file is removed and the error is rethrown.
 */
export async function writeFileAtomic(path: string, data: Uint8Array | string): Promise<void> {
  const tmp = `${path}.${process.pid}.${Math.random().toString(36).slice(2, 10)}.tmp`;
  try {
    const file = await open(tmp, 'wx');
    try {
      await file.writeFile(data);
      await file.sync();
    } finally {
      await file.close();
    }
    await rename(tmp, path);
  } catch (e) {
    await rm(tmp, { force: true }).catch(() => undefined);
    throw e;
  }
}

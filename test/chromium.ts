// The one place that decides which Chromium a test drives. EP_ACTORS_CHROMIUM chooses:
//   unset or "auto" — the system's `chromium` when it is on PATH, else the bundled one;
//   "system"        — the system's only (fails, saying so, when there is none);
//   "bundled"       — the headless shell that the npm package @sparticuz/chromium ships, so a
//                     fresh `npm install` can run the browser tests with nothing else installed.
// A test that cannot get a browser fails with one line saying why: never a stack, never a skip.
import { execFileSync } from 'node:child_process';
import { createReadStream, existsSync, mkdtempSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { createBrotliDecompress } from 'node:zlib';
import bundled from '@sparticuz/chromium';
import { chromium, type Browser } from 'playwright-core';
import { extract } from 'tar-fs';
import { onPath, oneLine } from './tools.js';

export const CHROMIUM_ENV = 'EP_ACTORS_CHROMIUM';

export interface Chromium {
  source: 'system' | 'bundled';
  executablePath: string;
  /** The environment to start it with. */
  env: NodeJS.ProcessEnv;
}

const packageDir = join(dirname(fileURLToPath(import.meta.resolve('@sparticuz/chromium'))), '..', '..');

/**
 * The NSS libraries the bundled binary links against (libnss3, libnspr4), which a machine
 * without a system browser may lack. The package ships them for Amazon Linux and unpacks them
 * only there; here they are unpacked once to the folder the package itself would use.
 */
async function bundledLibs(): Promise<string> {
  const dir = join(tmpdir(), 'al2023');
  if (existsSync(join(dir, 'lib', 'libnss3.so'))) return join(dir, 'lib');
  // Unpacked beside it and renamed into place, so a concurrent run never sees half a folder.
  const partial = mkdtempSync(join(tmpdir(), 'al2023-'));
  try {
    await pipeline(createReadStream(join(packageDir, 'bin', 'al2023.tar.br')), createBrotliDecompress(), extract(partial));
    renameSync(partial, dir);
  } catch (e) {
    rmSync(partial, { recursive: true, force: true });
    if (!existsSync(join(dir, 'lib', 'libnss3.so'))) throw e; // else another run put it there first
  }
  return join(dir, 'lib');
}

async function bundledChromium(env: NodeJS.ProcessEnv): Promise<Chromium> {
  // executablePath() unpacks the binary to the OS temp folder on first use (a few seconds) and reuses it after.
  const [executablePath, libs] = await Promise.all([bundled.executablePath(), bundledLibs()]);
  const runEnv = { ...env, LD_LIBRARY_PATH: [libs, env.LD_LIBRARY_PATH].filter(Boolean).join(delimiter) };
  // A binary left there by another version of the package would be used silently: hold it to ours.
  const want = (JSON.parse(readFileSync(join(packageDir, 'package.json'), 'utf8')) as { version: string }).version.split('.')[0];
  let version: string;
  try {
    version = execFileSync(executablePath, ['--version'], { env: runEnv, encoding: 'utf8', timeout: 30_000, stdio: ['ignore', 'pipe', 'pipe'] }).trim();
  } catch (e) {
    const why = String((e as { stderr?: string }).stderr || (e as Error).message).trim().split('\n')[0];
    throw oneLine(`the bundled chromium (${executablePath}, from @sparticuz/chromium) does not start: ${why}`);
  }
  if (!version.includes(` ${want}.`)) {
    throw oneLine(`${executablePath} is "${version}" but @sparticuz/chromium is ${want}: remove ${executablePath} (left by another version) and run again`);
  }
  return { source: 'bundled', executablePath, env: runEnv };
}

/** The Chromium that `env` (default: this process's) asks for; rejects with one line when there is none. */
export async function findChromium(env: NodeJS.ProcessEnv = process.env): Promise<Chromium> {
  const choice = env[CHROMIUM_ENV] || 'auto';
  if (choice !== 'auto' && choice !== 'system' && choice !== 'bundled') {
    throw oneLine(`${CHROMIUM_ENV}=${choice} is not a choice: use auto (the default), system or bundled`);
  }
  const system = choice === 'bundled' ? null : onPath('chromium', env);
  if (system) return { source: 'system', executablePath: system, env };
  if (choice === 'system') {
    throw oneLine(`${CHROMIUM_ENV}=system but chromium is not on PATH: install it (\`apt-get install chromium\`) or unset ${CHROMIUM_ENV} to use the bundled one`);
  }
  return bundledChromium(env);
}

/** A headless browser from findChromium(); launch() gives it a fresh temporary profile, removed on close. */
export async function launchChromium(env: NodeJS.ProcessEnv = process.env): Promise<Browser> {
  const found = await findChromium(env);
  return chromium.launch({
    executablePath: found.executablePath,
    env: found.env,
    headless: true,
    // Without the background-networking flags Chromium keeps trying the (closed) network.
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}

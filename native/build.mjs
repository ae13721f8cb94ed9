#!/usr/bin/env node
// Builds the native addon; run by `npm install` before `prepare`, so plain JavaScript.
// CUDA sources go in when nvcc is found (EP_ACTORS_NO_CUDA=1 leaves them out). Whatever
// fails, the install succeeds: the project then runs on the TypeScript backend and this
// script says so in one line.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const buildDir = join(here, 'build');
const cudaOut = join(buildDir, 'cuda');
const verbose = process.env.EP_ACTORS_BUILD_VERBOSE === '1';

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { cwd: here, encoding: 'utf8', ...opts });
  const out = `${r.stdout ?? ''}${r.stderr ?? ''}`;
  if (verbose) process.stderr.write(out);
  return { ok: r.status === 0, out, error: r.error };
}

function fallback(why, log) {
  if (log) process.stderr.write(`${log.trim().split('\n').slice(-25).join('\n')}\n`);
  console.log(`ep-actors: native addon not built (${why}); the TypeScript expert backend will be used.`);
  process.exit(0);
}

/** node-gyp ships inside npm; find it next to the running Node (no network, no devDependency). */
function findNodeGyp() {
  const fromEnv = process.env.npm_config_node_gyp;
  const candidates = [
    fromEnv,
    join(dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
    join(dirname(process.execPath), 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
  ];
  return candidates.find((p) => p && existsSync(p)) ?? null;
}

function findNvcc() {
  if (process.env.EP_ACTORS_NO_CUDA === '1') return null;
  const cands = [process.env.CUDA_HOME && join(process.env.CUDA_HOME, 'bin', 'nvcc'), '/usr/local/cuda/bin/nvcc'];
  for (const c of cands) if (c && existsSync(c)) return c;
  const w = run('sh', ['-c', 'command -v nvcc']);
  return w.ok && w.out.trim() ? w.out.trim() : null;
}

/** The CUDA toolkit root holding the static runtime, from nvcc's own location. */
function cudaHome(nvcc) {
  const r = run(nvcc, ['--version']);
  if (!r.ok) return null;
  const cands = [process.env.CUDA_HOME, join(dirname(nvcc), '..'), '/usr/local/cuda'];
  // /usr/local/bin/nvcc may be a wrapper script: ask it where its includes are instead.
  const dry = run(nvcc, ['--dryrun', '-x', 'cu', '-c', '/dev/null', '-o', '/dev/null']);
  const m = /_HERE_=([^\s]+)/.exec(dry.out) ?? /TOP=([^\s]+)/.exec(dry.out);
  if (m) cands.unshift(m[1].replace(/\/bin\/?$/, ''));
  return cands.find((c) => c && existsSync(join(c, 'lib64', 'libcudart_static.a'))) ?? null;
}

function buildCuda(nvcc, home) {
  mkdirSync(cudaOut, { recursive: true });
  const srcDir = join(here, 'cuda');
  const objs = [];
  for (const f of readdirSync(srcDir).filter((n) => n.endsWith('.cu')).sort()) {
    const obj = join(cudaOut, f.replace(/\.cu$/, '.o'));
    const r = run(nvcc, [
      '-std=c++17', '-O3', '-Xcompiler', '-fPIC', '--expt-relaxed-constexpr',
      '-gencode=arch=compute_80,code=sm_80', '-gencode=arch=compute_90,code=sm_90',
      '-gencode=arch=compute_90,code=compute_90', // PTX so newer cards can JIT it
      '-cudart', 'static', '-c', join(srcDir, f), '-o', obj,
    ]);
    if (!r.ok) return { ok: false, log: r.out };
    objs.push(obj);
  }
  return { ok: true, objs, home };
}

const nodeGyp = findNodeGyp();
if (!nodeGyp) fallback('node-gyp not found next to this Node');
const cxx = run(process.env.CXX ?? 'c++', ['--version']);
if (!cxx.ok) fallback('no C++ compiler (set CXX or install g++)');

rmSync(buildDir, { recursive: true, force: true });
const gypDefines = ['-Dwith_cuda=0'];
let cudaNote = 'CPU only';
const nvcc = findNvcc();
if (process.env.EP_ACTORS_NO_CUDA === '1') cudaNote = 'CPU only (EP_ACTORS_NO_CUDA=1)';
else if (nvcc) {
  const home = cudaHome(nvcc);
  if (!home) cudaNote = `CPU only (nvcc at ${nvcc} but no libcudart_static.a found)`;
  else {
    const c = buildCuda(nvcc, home);
    if (c.ok) {
      gypDefines.splice(0, 1, '-Dwith_cuda=1', `-Dcuda_home=${home}`, `-Dcuda_objs=${c.objs.join(' ')}`);
      cudaNote = `with CUDA (sm_80, sm_90; ${home})`;
    } else {
      process.stderr.write(`${c.log.trim().split('\n').slice(-25).join('\n')}\n`);
      cudaNote = 'CPU only (the CUDA sources failed to compile, shown above)';
    }
  }
}
// Build against the headers of the Node that runs us when they are installed beside it,
// so no header download (and no network) is needed.
const nodeDir = process.env.npm_config_nodedir
  || [join(dirname(process.execPath), '..')].find((d) => existsSync(join(d, 'include', 'node', 'node_api.h')));
const dirArgs = nodeDir ? [`--nodedir=${nodeDir}`] : [];
const jobs = ['-j', String(Math.max(1, Math.min(4, (await import('node:os')).availableParallelism())))];
// node-gyp's `rebuild` would wipe build/cuda: configure and build separately instead.
const cfg = run(process.execPath, [nodeGyp, 'configure', ...dirArgs, '--', ...gypDefines], { cwd: here });
if (!cfg.ok) fallback('node-gyp configure failed', cfg.out);
let bld = run(process.execPath, [nodeGyp, 'build', ...dirArgs, ...jobs], { cwd: here });
if (!bld.ok && gypDefines[0] === '-Dwith_cuda=1') {
  // A CUDA link problem should not cost the CPU kernels: try again without CUDA.
  process.stderr.write(`${bld.out.trim().split('\n').slice(-25).join('\n')}\n`);
  cudaNote = 'CPU only (building with CUDA failed, shown above)';
  const again = run(process.execPath, [nodeGyp, 'configure', ...dirArgs, '--', '-Dwith_cuda=0'], { cwd: here });
  if (!again.ok) fallback('node-gyp configure failed', again.out);
  bld = run(process.execPath, [nodeGyp, 'build', ...dirArgs, ...jobs], { cwd: here });
}
if (!bld.ok) fallback('compilation failed', bld.out);
const check = run(process.execPath, ['-e', `require(${JSON.stringify(join(buildDir, 'Release', 'ep_actors_native.node'))})`]);
if (!check.ok) fallback('the built addon does not load', check.out);
console.log(`ep-actors: native addon built, ${cudaNote}.`);

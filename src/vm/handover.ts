/**
 * The restart handover (--state-dir): guest memory lives in files there (guest-memory.ts), so a
 * graceful restart needs to carry only the rest of each VM.
 *
 * saveHandover (SIGTERM): every VM is held and paused; its state (every vCPU section, nested state,
 * irqchip, clock, run states: the snapshot format's records, encodeState) goes to `<id>.state`, then
 * one manifest names each VM (id, name, memory file, state file's size and CRC-32C, console
 * history). Each file is written atomically (atomic-file.ts: temporary name, fsync, rename, fsync of
 * the directory); the manifest is the commit point.
 *
 * restoreHandover (start): the manifest is verified (format version first: another version is
 * refused, HandoverVersionError, leaving everything in place for the vcpud that wrote it; then its
 * checksum), each VM re-created with its id and name on its memory file mapped in place, its state
 * verified and applied. The manifest is removed before any vCPU runs again, so a crash from then on
 * cannot bring back state older than the memory. A VM that fails is destroyed (nothing half-made is
 * listed) and its files moved to aside/ for inspection. Memory files no manifest names (a kill -9,
 * a crash, an incoming migration cut short) are removed: those VMs are lost.
 */
import fs from 'node:fs';
import path from 'node:path';
import { VcpudError } from '../errors';
import type { HostCapabilities } from '../ffi/capabilities';
import { packageVersion } from '../package';
import { writeFileAtomic } from './atomic-file';
import { isMemoryFile, LOCK_NAME, type StateDirMemory } from './guest-memory';
import { ManagedVm } from './managed-vm';
import { decodeState, encodeState } from './migration/state-records';
import type { VmRegistry } from './registry';
import { assertCompatible } from './snapshot-compat';
import { crc32c, hex } from './snapshot-format';
import { restoreIntoNewVm, restoreSpec, type LoadedState } from './snapshot-restore';
import { captureState, holdAndPause, type HeldVm } from './snapshot-writer';

export const HANDOVER_FORMAT_VERSION = 1;
export const MANIFEST_NAME = 'handover.manifest';
export const ASIDE_DIR = 'aside';
const STATE_SUFFIX = '.state';
/** First line of the manifest: `vcpud-handover <version> <crc32c of the body, hex> <body bytes>`. */
const MAGIC = 'vcpud-handover';
/** How long a VM still held by an in-flight call (past the grace) is waited for at SIGTERM. */
const HOLD_WAIT_MS = 2000;

export interface ManifestVm {
  id: string;
  name: string;
  createdAt: string;
  memoryFile: string;
  memoryBytes: number;
  vcpuCount: number;
  stateFile: string;
  stateBytes: number;
  stateCrc32c: number;
  /** The console history (base64) and the bytes ever written, so the console continues exactly. */
  console: { history: string; bytesWritten: number };
}

export interface Manifest {
  format: typeof MAGIC;
  formatVersion: number;
  createdAt: string;
  producer: { name: 'vcpud'; version: string };
  vms: ManifestVm[];
}

/** A manifest of another format version: this vcpud cannot read it and leaves it in place. */
export class HandoverVersionError extends Error {
  constructor(
    readonly file: string,
    readonly version: string,
  ) {
    super(
      `handover manifest ${file} is format version ${version}; this vcpud (${packageVersion()}) reads version ${HANDOVER_FORMAT_VERSION} only: ` +
        `run the vcpud version that wrote it to resume its VMs, or remove ${path.dirname(file)}'s contents to discard them`,
    );
    this.name = 'HandoverVersionError';
  }
}

// ---------------------------------------------------------------------------------------------
// Files

async function syncDir(dir: string): Promise<void> {
  const d = await fs.promises.open(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    await d.sync();
  } finally {
    await d.close();
  }
}

export function encodeManifest(m: Manifest): Buffer {
  const body = Buffer.from(JSON.stringify(m));
  return Buffer.concat([Buffer.from(`${MAGIC} ${m.formatVersion} ${crc32c(body).toString(16)} ${body.length}\n`), body]);
}

const corrupt = (file: string, what: string) => new VcpudError('data_loss', `handover manifest ${file} is corrupt: ${what}`);

/** Verifies and parses a manifest: the version first (HandoverVersionError), then length, checksum, shape. */
export function decodeManifest(bytes: Buffer, file: string): Manifest {
  const nl = bytes.indexOf(0x0a);
  const line = (nl < 0 ? bytes : bytes.subarray(0, nl)).toString('latin1');
  const [magic, version, crc, length, ...rest] = line.split(' ');
  if (magic !== MAGIC || nl < 0 || rest.length) throw corrupt(file, `the first line is not "${MAGIC} VERSION CRC LENGTH"`);
  if (version !== String(HANDOVER_FORMAT_VERSION)) throw new HandoverVersionError(file, version);
  const body = bytes.subarray(nl + 1);
  if (String(body.length) !== length) throw corrupt(file, `the body is ${body.length} bytes, the first line says ${length}`);
  if (crc32c(body).toString(16) !== crc) throw corrupt(file, `checksum mismatch (CRC-32C ${crc32c(body).toString(16)}, expected ${crc})`);
  let m: Manifest;
  try {
    m = JSON.parse(body.toString('utf8')) as Manifest;
  } catch (e) {
    throw corrupt(file, `the body is not JSON: ${(e as Error).message}`);
  }
  if (m.format !== MAGIC || m.formatVersion !== HANDOVER_FORMAT_VERSION || !Array.isArray(m.vms)) throw corrupt(file, 'malformed body');
  for (const v of m.vms) {
    const fileName = (n: unknown) => typeof n === 'string' && path.basename(n) === n;
    if (typeof v?.id !== 'string' || !fileName(v.memoryFile) || !fileName(v.stateFile) || !Number.isSafeInteger(v.memoryBytes) || !v.console)
      throw corrupt(file, `malformed VM entry ${JSON.stringify(v?.id)}`);
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// Save (SIGTERM)

export interface SaveReport {
  saved: { id: string; name: string }[];
  /** VMs that could not be saved: destroyed, their memory files removed. */
  failed: { id: string; name: string; error: string }[];
  /** From the first pause to the manifest on disk. */
  ms: number;
}

/** holdAndPause, waiting (bounded) for a hold an in-flight call still has past the grace. */
async function holdWithin(vm: ManagedVm, ms: number): Promise<HeldVm> {
  const until = Date.now() + ms;
  for (;;) {
    try {
      return await holdAndPause(vm, 'vcpud is restarting (handover)');
    } catch (e) {
      if (Date.now() >= until || vm.isDestroyed || !vm.heldBy()) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

/** Saves every VM of `registry` for the next start. The VMs stay paused (the process exits next). */
export async function saveHandover(registry: VmRegistry, caps: HostCapabilities, memory: StateDirMemory): Promise<SaveReport> {
  const report: SaveReport = { saved: [], failed: [], ms: 0 };
  const vms = registry.list();
  const started = performance.now();
  // Every VM paused first (together), so none runs on while another is written.
  const held = await Promise.allSettled(vms.map((vm) => holdWithin(vm, HOLD_WAIT_MS)));
  const entries: ManifestVm[] = [];
  for (const [i, vm] of vms.entries()) {
    try {
      const h = held[i];
      if (h.status === 'rejected') throw h.reason;
      const region = vm.vm.regions[0];
      const memoryFile = region && vm.vm.regions.length === 1 ? memory.fileOf(region.memory) : undefined;
      if (!memoryFile) throw new VcpudError('internal', 'its memory is not a state-directory file');
      // Pages a lazy restore mapped from a snapshot file are private to this process: into the file.
      await region.memory.persistMapped();
      const state = encodeState(await captureState(vm, caps, h.value.before));
      const stateFile = `${vm.id}${STATE_SUFFIX}`;
      await writeFileAtomic(memory.dir, stateFile, state);
      entries.push({
        id: vm.id,
        name: vm.name,
        createdAt: vm.createdAt.toISOString(),
        memoryFile,
        memoryBytes: vm.memoryBytes,
        vcpuCount: vm.vcpus.length,
        stateFile,
        stateBytes: state.length,
        stateCrc32c: crc32c(state),
        console: { history: vm.console.history().toString('base64'), bytesWritten: vm.console.bytesWritten },
      });
      report.saved.push({ id: vm.id, name: vm.name });
    } catch (e) {
      report.failed.push({ id: vm.id, name: vm.name, error: (e as Error).message });
      if (!vm.isDestroyed) registry.destroy(vm.id); // its memory file goes with it: no stale VM later
    }
  }
  const manifest: Manifest = {
    format: MAGIC,
    formatVersion: HANDOVER_FORMAT_VERSION,
    createdAt: new Date().toISOString(),
    producer: { name: 'vcpud', version: packageVersion() },
    vms: entries,
  };
  await writeFileAtomic(memory.dir, MANIFEST_NAME, encodeManifest(manifest));
  // Memory no VM owns (an incoming migration cut short: its source keeps the VM) is not handed over.
  const named = new Set(entries.map((e) => e.memoryFile));
  for (const n of stateFiles(memory.dir)) if (isMemoryFile(n) && !named.has(n)) fs.rmSync(path.join(memory.dir, n), { force: true });
  report.ms = performance.now() - started;
  return report;
}

// ---------------------------------------------------------------------------------------------
// Restore (start)

export interface RestoreReport {
  manifest: 'none' | 'restored' | 'corrupt';
  restored: { id: string; name: string; resumedVcpus: number }[];
  /** VMs that failed verification or restore; their files are in `aside`. */
  failed: { id: string; name: string; error: string; aside: string }[];
  /** Memory files no manifest named (a kill -9 or crash lost their VMs): removed. */
  discarded: string[];
  /** With a corrupt manifest: where everything was moved. */
  aside?: string;
  /** Its error, when the manifest is corrupt. */
  error?: string;
  ms: number;
}

function asideDir(dir: string, what: string): string {
  const d = path.join(dir, ASIDE_DIR, `${new Date().toISOString().replace(/[:.]/g, '-')}-${what}`);
  fs.mkdirSync(d, { recursive: true, mode: 0o700 });
  return d;
}

function moveAside(dir: string, names: string[], to: string): void {
  for (const n of names) {
    try {
      fs.renameSync(path.join(dir, n), path.join(to, n));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
  }
}

/** The files directly in the state directory (aside/, other directories and the lock left out). */
function stateFiles(dir: string): string[] {
  return fs
    .readdirSync(dir, { withFileTypes: true })
    .filter((d) => d.isFile() && d.name !== LOCK_NAME)
    .map((d) => d.name);
}

/** One VM from its manifest entry: created paused (not listed on failure), its memory file owned. */
async function restoreVm(registry: VmRegistry, caps: HostCapabilities, memory: StateDirMemory, e: ManifestVm): Promise<{ vm: ManagedVm; running: number[] }> {
  const file = path.join(memory.dir, e.stateFile);
  const bytes = await fs.promises.readFile(file);
  if (bytes.length !== e.stateBytes || crc32c(bytes) !== e.stateCrc32c)
    throw new VcpudError(
      'data_loss',
      `state file ${file} does not match the manifest (${bytes.length} bytes, CRC-32C ${hex(crc32c(bytes))}; expected ${e.stateBytes}, ${hex(e.stateCrc32c)})`,
    );
  let decoded: ReturnType<typeof decodeState>;
  try {
    decoded = decodeState(bytes, { memoryBytes: e.memoryBytes, vcpuCount: e.vcpuCount });
  } catch (err) {
    throw new VcpudError('data_loss', `state file ${file}: ${(err as Error).message}`);
  }
  const { header } = decoded;
  if (header.vm.id !== e.id) throw new VcpudError('data_loss', `state file ${file} is VM ${header.vm.id}'s, the manifest says ${e.id}`);
  assertCompatible(header, caps, registry.supportedCpuid());
  const spec = restoreSpec(header, e.name || undefined);
  const mem = memory.open(e.memoryFile, e.memoryBytes);
  let kvmVm: Awaited<ReturnType<typeof ManagedVm.prepareKvmVm>>;
  try {
    kvmVm = await ManagedVm.prepareKvmVm(registry.kvm, spec, mem, header.vm.cpuid);
  } catch (err) {
    mem.release(); // not owned yet: the file stays for moveAside
    throw err;
  }
  const loaded: LoadedState = { ...decoded, memory: mem };
  const { vm } = await restoreIntoNewVm(registry, caps, loaded, {
    name: e.name || undefined,
    vm: kvmVm,
    identity: { id: e.id, createdAt: new Date(e.createdAt) },
  });
  memory.own(mem, e.memoryFile);
  vm.console.restore(Buffer.from(e.console.history, 'base64'), e.console.bytesWritten);
  return { vm, running: header.vcpus.filter((v) => v.runState === 'running').map((v) => v.id) };
}

/**
 * Brings back the VMs a SIGTERM saved in the state directory (see the module comment). Throws
 * HandoverVersionError for a manifest of another version, touching nothing.
 */
export async function restoreHandover(registry: VmRegistry, caps: HostCapabilities, memory: StateDirMemory): Promise<RestoreReport> {
  const started = performance.now();
  const { dir } = memory;
  const report: RestoreReport = { manifest: 'none', restored: [], failed: [], discarded: [], ms: 0 };
  const manifestFile = path.join(dir, MANIFEST_NAME);
  let manifest: Manifest | undefined;
  let bytes: Buffer | undefined;
  try {
    bytes = fs.readFileSync(manifestFile);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
  }
  if (bytes) {
    try {
      manifest = decodeManifest(bytes, manifestFile);
    } catch (e) {
      if (e instanceof HandoverVersionError) throw e;
      report.manifest = 'corrupt';
      report.error = (e as Error).message;
      report.aside = asideDir(dir, 'corrupt-manifest');
      moveAside(dir, stateFiles(dir), report.aside);
    }
  }
  const made: { vm: ManagedVm; running: number[] }[] = [];
  const keep = new Set<string>();
  for (const e of manifest?.vms ?? []) {
    try {
      const r = await restoreVm(registry, caps, memory, e);
      made.push(r);
      keep.add(e.memoryFile);
    } catch (err) {
      const aside = asideDir(dir, `vm-${e.id}`);
      moveAside(dir, [e.memoryFile, e.stateFile], aside);
      report.failed.push({ id: e.id, name: e.name, error: (err as Error).message, aside });
    }
  }
  // Commit point: from here on the state files are stale (the memory moves on).
  if (manifest) {
    report.manifest = 'restored';
    fs.rmSync(manifestFile, { force: true });
    await syncDir(dir);
  }
  for (const n of stateFiles(dir)) {
    if (keep.has(n)) continue;
    if (isMemoryFile(n)) report.discarded.push(n);
    fs.rmSync(path.join(dir, n), { force: true }); // state files, temporaries, memory files of lost VMs
  }
  for (const { vm, running } of made) {
    await Promise.all(running.map((id) => vm.vcpu(id).resume()));
    report.restored.push({ id: vm.id, name: vm.name, resumedVcpus: running.length });
  }
  report.ms = performance.now() - started;
  return report;
}

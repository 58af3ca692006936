/**
 * Snapshot writer, reader and restore in-process on real KVM: what is restored equals what was
 * saved (every vCPU section, guest memory byte for byte), memory is mapped lazily and copy-on-write
 * (the guest's writes never reach the file), zero pages take no space, and a failed restore leaves
 * nothing behind.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { probeCapabilities, type HostCapabilities } from '../../src/ffi/capabilities';
import { Kvm } from '../../src/ffi/kvm';
import type { ManagedVm } from '../../src/vm/managed-vm';
import { VmRegistry } from '../../src/vm/registry';
import { assertCompatible } from '../../src/vm/snapshot-compat';
import { FileSource, loadSnapshot, StreamSource, type LoadedSnapshot } from '../../src/vm/snapshot-reader';
import { restoreIntoNewVm, restoreSpec } from '../../src/vm/snapshot-restore';
import { captureSnapshot, holdAndPause, StreamSink } from '../../src/vm/snapshot-writer';
import { fileSink } from '../support/file-sink';
import { readState } from '../../src/vm/vcpu-state';
import { describeKvm, testMemorySource } from '../support/kvm';
import { loadGuest, waitUntil } from '../support/runtime';

const MiB = 1 << 20;

describeKvm('snapshot and restore in-process (real KVM)', () => {
  let kvm: Kvm;
  let caps: HostCapabilities;
  let registry: VmRegistry;
  const memorySource = testMemorySource();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-snap-'));

  beforeAll(() => {
    kvm = Kvm.open();
    caps = probeCapabilities(kvm);
    registry = new VmRegistry(kvm, { maxVms: 4, maxVcpusPerVm: 4, maxMemoryPerVmBytes: 256 * MiB, maxMemoryTotalBytes: 512 * MiB }, memorySource);
  });
  afterEach(() => registry.destroyAll());
  afterAll(() => {
    kvm.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const check = (h: LoadedSnapshot['header']) => {
    assertCompatible(h, caps, registry.supportedCpuid());
    registry.checkSpec(restoreSpec(h));
  };

  async function runningCounter(memory: number, vcpus: number): Promise<ManagedVm> {
    const vm = registry.create({ memoryBytes: memory, vcpuCount: vcpus });
    // a pattern in the upper memory, a zero gap in between
    const pattern = crypto.randomBytes(4 * MiB);
    for (let gpa = memory / 2; gpa < memory; gpa += pattern.length) vm.writeMemory(gpa, pattern.subarray(0, Math.min(pattern.length, memory - gpa)));
    await loadGuest(vm, 'counter64');
    await vm.resumeAll();
    await waitUntil(() => vm.console.bytesWritten > 2000, 'counter output');
    return vm;
  }

  async function snapshotToFile(vm: ManagedVm, name: string) {
    const held = await holdAndPause(vm, 'test');
    try {
      const file = path.join(dir, name);
      const r = await captureSnapshot(vm, await fileSink(file), { caps, runStates: held.before });
      return { file, r, held };
    } catch (e) {
      held.release();
      throw e;
    }
  }

  async function loadFile(file: string, lazy = true): Promise<LoadedSnapshot> {
    const fd = fs.openSync(file, 'r');
    try {
      return await loadSnapshot(new FileSource(fd), { check, lazy }, fd);
    } finally {
      fs.closeSync(fd);
    }
  }

  const sectionsOf = async (vm: ManagedVm, id: number) =>
    vm.vcpu(id).withState(() => readState(vm.vcpu(id).vcpu, { caps, irqchip: vm.vm.hasIrqchip }, []).values);

  it('restores every section of every vCPU and every byte of memory; memory is mapped lazily, zero pages take no space', async () => {
    const vm = await runningCounter(64 * MiB, 2);
    const { file, r, held } = await snapshotToFile(vm, 'full.snap');
    expect(r.end.pagesStored).toBeGreaterThanOrEqual((32 * MiB) / 4096);
    expect(r.end.pagesStored).toBeLessThan((33 * MiB) / 4096);
    expect(fs.statSync(file).blocks * 512).toBeLessThan(34 * MiB); // the zero half is a hole
    const loaded = await loadFile(file);
    expect(loaded.mappedBytes).toBeGreaterThanOrEqual(32 * MiB);
    const { vm: copy, notes } = await restoreIntoNewVm(registry, caps, loaded);
    expect(notes).toEqual([]);
    expect(copy.statuses().map((s) => s.state)).toEqual(['paused', 'paused']);
    expect(copy.cpuid).toEqual(vm.cpuid);
    for (const id of [0, 1]) {
      const a = await sectionsOf(vm, id);
      const b = await sectionsOf(copy, id);
      for (const s of Object.keys(a) as (keyof typeof a)[]) {
        // the TSC moves on; everything else is exactly as saved
        if (s === 'msrs') expect((b.msrs ?? []).filter((m) => m.index !== 0x10)).toEqual((a.msrs ?? []).filter((m) => m.index !== 0x10));
        else expect({ section: s, value: b[s] }).toEqual({ section: s, value: a[s] });
      }
    }
    for (let gpa = 0; gpa < 64 * MiB; gpa += 8 * MiB) expect(copy.readMemory(gpa, 8 * MiB).equals(vm.readMemory(gpa, 8 * MiB))).toBe(true);
    held.release();
  });

  it('copy-on-write: the restored guest writes without changing the file; the source VM resumes where it was', async () => {
    const vm = await runningCounter(16 * MiB, 1);
    const { file, held } = await snapshotToFile(vm, 'cow.snap');
    await held.resume();
    held.release();
    const hash = crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
    const { vm: copy } = await restoreIntoNewVm(registry, caps, await loadFile(file), { run: true });
    expect(copy.statuses()[0].state).toBe('running');
    await waitUntil(() => copy.console.bytesWritten > 2000, 'the copy to count');
    copy.writeMemory(12 * MiB, Buffer.alloc(4 * MiB, 0xee));
    expect(copy.readMemory(12 * MiB, 16).equals(Buffer.alloc(16, 0xee))).toBe(true);
    expect(crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex')).toBe(hash);
    // a second restore of the same file sees the saved bytes, not the first copy's writes
    const { vm: second } = await restoreIntoNewVm(registry, caps, await loadFile(file));
    expect(second.readMemory(12 * MiB, 16).equals(vm.readMemory(12 * MiB, 16))).toBe(true);
    expect(vm.statuses()[0].state).toBe('running');
  });

  it('reading instead of mapping, and from a stream, gives the same VM', async () => {
    const vm = await runningCounter(16 * MiB, 1);
    const { file, held } = await snapshotToFile(vm, 'read.snap');
    const eager = await loadFile(file, false);
    expect(eager.mappedBytes).toBe(0);
    expect(eager.copiedBytes).toBeGreaterThanOrEqual(8 * MiB);
    const { vm: a } = await restoreIntoNewVm(registry, caps, eager);
    const chunks: Buffer[] = [];
    await captureSnapshot(vm, new StreamSink(async (c) => void chunks.push(Buffer.from(c)), 100_000), { caps, runStates: held.before });
    const bytes = Buffer.concat(chunks);
    expect(bytes.length).toBe(fs.statSync(file).size); // the same layout (only the clock and the time differ)
    async function* pieces() {
      for (let off = 0; off < bytes.length; off += 77_777) yield bytes.subarray(off, off + 77_777);
    }
    const { vm: b } = await restoreIntoNewVm(registry, caps, await loadSnapshot(new StreamSource(pieces()), { check }));
    for (const copy of [a, b]) expect(copy.readMemory(0, 16 * MiB).equals(vm.readMemory(0, 16 * MiB))).toBe(true);
    held.release();
  });

  it('a restore over the limits is refused before anything is created; a VM deleted mid-snapshot fails it without a file', async () => {
    const vm = await runningCounter(16 * MiB, 1);
    const { file, held } = await snapshotToFile(vm, 'limits.snap');
    held.release();
    const small = new VmRegistry(kvm, { maxVms: 4, maxVcpusPerVm: 4, maxMemoryPerVmBytes: 8 * MiB, maxMemoryTotalBytes: 512 * MiB });
    const fd = fs.openSync(file, 'r');
    await expect(loadSnapshot(new FileSource(fd), { check: (h) => small.checkSpec(restoreSpec(h)) }, fd)).rejects.toMatchObject({ kind: 'resource_exhausted' });
    fs.closeSync(fd);
    expect(small.list()).toEqual([]);

    const big = registry.create({ memoryBytes: 128 * MiB, vcpuCount: 1 });
    big.writeMemory(0, crypto.randomBytes(64 * MiB));
    const h2 = await holdAndPause(big, 'test');
    const target = path.join(dir, 'deleted.snap');
    const capture = captureSnapshot(big, await fileSink(target), {
      caps,
      runStates: h2.before,
      onProgress: (p) => p.memoryBytesDone > 8 * MiB && !big.isDestroyed && registry.destroy(big.id),
    });
    await expect(capture).rejects.toThrow(/deleted during the snapshot/);
    expect(fs.existsSync(target)).toBe(false);
    expect(fs.readdirSync(dir).filter((n) => n.includes('deleted'))).toEqual([]);
  });
});

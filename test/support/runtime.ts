/** Helpers for tests that run guests: load a guest, wait on its console, parse counter output. */
import fs from 'node:fs';
import { GUESTS, GUEST_ABI, type GuestName } from '../guests/guests';
import { Kvm } from '../../src/ffi/kvm';
import type { Limits } from '../../src/vm/limits';
import type { ManagedVm } from '../../src/vm/managed-vm';
import { VmRegistry } from '../../src/vm/registry';
import { testMemorySource } from './kvm';
import type { VcpuStatus } from '../../src/vm/managed-vcpu';

export async function loadGuest(vm: ManagedVm, name: GuestName): Promise<void> {
  const g = GUESTS[name];
  await vm.loadProgram(fs.readFileSync(g.file), g.loadAddress, g.entry);
}

/** Resolves when `pred` holds, polling every few ms; rejects with `what` after `timeoutMs`. */
export async function waitUntil(pred: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!pred()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

export const consoleText = (vm: ManagedVm) => vm.console.history().toString('latin1');

export function waitForConsole(vm: ManagedVm, text: string | RegExp, timeoutMs = 10_000): Promise<void> {
  const match = () => (typeof text === 'string' ? consoleText(vm).includes(text) : text.test(consoleText(vm)));
  return waitUntil(match, `console to show ${text}; it shows ${JSON.stringify(consoleText(vm).slice(-200))}`, timeoutMs);
}

export function waitForState(vm: ManagedVm, vcpu: number, state: VcpuStatus['state'], timeoutMs = 10_000): Promise<void> {
  return waitUntil(() => vm.vcpu(vcpu).status().state === state, `vCPU ${vcpu} to be ${state} (is ${vm.vcpu(vcpu).status().state})`, timeoutMs);
}

/** The complete lines of counter64's output as numbers (a trailing partial line is left out). */
export function counterValues(text: string): number[] {
  const lines = text.split('\n');
  lines.pop();
  return lines.filter((l) => l.length > 0).map(Number);
}

/** Asserts a strictly consecutive run: no value lost, none repeated. Returns the last value. */
export function expectConsecutive(values: number[]): number {
  for (let i = 1; i < values.length; i++) {
    if (values[i] !== values[i - 1] + 1) throw new Error(`sequence breaks at index ${i}: ${values[i - 1]} then ${values[i]}`);
  }
  return values[values.length - 1];
}

export function counterInMemory(vm: ManagedVm, vcpu = 0): bigint {
  return vm.readMemory(GUEST_ABI.counterBase + 8 * vcpu, 8).readBigUInt64LE(0);
}

/**
 * A VmRegistry over /dev/kvm for a describe block: opened before its tests, every VM destroyed
 * after each test, closed after all. Returns a getter (the registry exists only once beforeAll ran).
 */
export function useRegistry(limits: Limits): () => VmRegistry {
  let kvm: Kvm;
  let registry: VmRegistry;
  const memorySource = testMemorySource();
  beforeAll(() => {
    kvm = Kvm.open();
    registry = new VmRegistry(kvm, limits, memorySource);
  });
  afterEach(() => registry.destroyAll());
  afterAll(() => kvm.close());
  return () => registry;
}

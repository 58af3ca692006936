/**
 * Committing guest memory ahead of its use (NativeGuestMemory.populate), its errors typed: a range
 * the host cannot commit rejects with a KvmError naming madvise(MADV_POPULATE_WRITE) and the errno
 * (ENOMEM classifies as resource_exhausted, HOST_RESOURCES_EXHAUSTED), plus where it stopped.
 */
import { KvmError } from '../errors';
import { toKvmError, type NativeGuestMemory } from './native';

/**
 * A populate that stopped: the KvmError of the failed madvise, and the bytes surely committed
 * before it (the failing 64 MiB chunk begins there; the kernel does not say where in it).
 */
export class PopulateError extends KvmError {
  constructor(
    e: KvmError,
    readonly committedBytes: number,
  ) {
    super(e.ioctl, e.errno, e.code, e.message);
    this.name = 'PopulateError';
  }
}

/** Faults in [offset, +length) of `memory` for writing; `cancel[0] = 1` stops it between 64 MiB chunks (ECANCELED). */
export async function populateMemory(memory: NativeGuestMemory, offset: number, length: number, cancel?: Buffer): Promise<void> {
  try {
    await memory.populate(offset, length, cancel);
  } catch (e) {
    const k = toKvmError(e);
    if (!(k instanceof KvmError)) throw k;
    throw new PopulateError(k, ((e as { offset?: number }).offset ?? offset) - offset);
  }
}

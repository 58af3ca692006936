/**
 * Mutations of a real SVM nested-state blob (KVM_GET_NESTED_STATE of a vCPU running L2), aimed at
 * the checks KVM_SET_NESTED_STATE makes: the header (flags, format, size, vmcb_pa) and the VMCB12
 * fields the kernel validates (VMRUN intercept, ASID, NP, IOPM/MSRPM addresses, EFER, CR0/CR3/CR4,
 * DR6/DR7, RFLAGS, segment attributes). Offsets come from nested-blobs.ts's independent reading
 * of the ABI and the APM; seeded like every other fuzzer here (fuzz.ts's Rng).
 */
import { APM_VMCB_CONTROL, APM_VMCB_SAVE, APM_VMCB_SEGMENTS } from './nested-blobs';
import { interestingU64, mutateBlob, type Rng } from './fuzz';

const VMCB12 = 128; // after the kvm_nested_state header
const SAVE = VMCB12 + 0x400;

type Field = { at: number; width: 1 | 2 | 4 | 8 };

const CONTROL: Field[] = Object.values(APM_VMCB_CONTROL).map(([off, width]) => ({ at: VMCB12 + off, width }));
const SAVE_FIELDS: Field[] = [
  ...Object.values(APM_VMCB_SAVE).map(([off, width]) => ({ at: SAVE + off, width })),
  // each segment's selector, attributes, limit and base
  ...APM_VMCB_SEGMENTS.flatMap((_, i) => [
    { at: SAVE + i * 16, width: 2 as const },
    { at: SAVE + i * 16 + 2, width: 2 as const },
    { at: SAVE + i * 16 + 4, width: 4 as const },
    { at: SAVE + i * 16 + 8, width: 8 as const },
  ]),
];
const HEADER: Field[] = [
  { at: 0, width: 2 }, // flags
  { at: 2, width: 2 }, // format
  { at: 4, width: 4 }, // size
  { at: 8, width: 8 }, // vmcb_pa
];

function read(b: Buffer, f: Field): bigint {
  return f.width === 8
    ? b.readBigUInt64LE(f.at)
    : f.width === 4
      ? BigInt(b.readUInt32LE(f.at))
      : f.width === 2
        ? BigInt(b.readUInt16LE(f.at))
        : BigInt(b[f.at]);
}

function write(b: Buffer, f: Field, v: bigint): void {
  const bits = BigInt(f.width * 8);
  const x = BigInt.asUintN(Number(bits), v);
  if (f.width === 8) b.writeBigUInt64LE(x, f.at);
  else if (f.width === 4) b.writeUInt32LE(Number(x), f.at);
  else if (f.width === 2) b.writeUInt16LE(Number(x), f.at);
  else b[f.at] = Number(x);
}

/** A new value for a field: mostly one bit of its current value flipped, else values at the limits. */
function fieldValue(r: Rng, current: bigint, width: Field['width']): bigint {
  const bits = width * 8;
  switch (r.int(6)) {
    case 0:
    case 1:
    case 2: // a single bit: hits exactly the must-be-set / must-be-zero / reserved-bit checks
      return current ^ (1n << BigInt(r.int(bits)));
    case 3:
      return r.pick([0n, (1n << BigInt(bits)) - 1n, current + 1n, current - 1n, current + 0x1000n]);
    case 4:
      return interestingU64(r);
    default:
      return r.u64();
  }
}

/**
 * A mutation of `base`: 1-3 VMCB12 control, save-area or header fields changed (70%), or the
 * generic header/flip/size edits of mutateBlob (30%). `base` itself is never changed.
 */
export function mutateSvmFrom(r: Rng, base: Buffer): Buffer {
  const blob = Buffer.from(base);
  if (r.chance(0.3)) return mutateBlob(r, blob);
  const edits = 1 + r.int(3);
  for (let i = 0; i < edits; i++) {
    const which = r.int(10);
    const f = r.pick(which < 4 ? CONTROL : which < 8 ? SAVE_FIELDS : HEADER);
    if (f.at + f.width > blob.length) continue;
    write(blob, f, fieldValue(r, read(blob, f), f.width));
  }
  return blob;
}

/** Where `blob` differs from `base` (for failure messages): "off: old->new" runs, and lengths. */
export function blobDiff(base: Buffer, blob: Buffer, max = 12): string {
  const out: string[] = [];
  const n = Math.min(base.length, blob.length);
  for (let i = 0; i < n && out.length < max; i++) {
    if (base[i] === blob[i]) continue;
    let j = i;
    while (j < n && base[j] !== blob[j] && j - i < 8) j++;
    out.push(`0x${i.toString(16)}: ${base.subarray(i, j).toString('hex')}->${blob.subarray(i, j).toString('hex')}`);
    i = j - 1;
  }
  if (base.length !== blob.length) out.push(`length ${base.length}->${blob.length}`);
  return out.join(', ') || 'identical';
}

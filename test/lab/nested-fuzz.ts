/**
 * Seeded fuzzing of SetNestedState against the real nested kernel of the lab (issue 9): mutations
 * of a real SVM blob (a vCPU running L2) sent to the lab's vcpud, a share of them with vcpud's
 * validation bypassed (--test-allow-unvalidated-nested + x-vcpud-skip-validation) so the kernel
 * does the refusing. Invariants:
 * - every answer is OK or a documented status (no INTERNAL: a failed rollback would be one);
 * - after every refused call the vCPU's whole state (GetState of every section, the clock MSRs left
 *   out, and GetNestedState) is identical to before;
 * - an accepted call is followed by a reset to the state the blob came from, which must work.
 * LAB_FUZZ_SEED and LAB_FUZZ_REQUESTS set the run; any seed reproduces its run exactly.
 */
import { isDeepStrictEqual } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { decodeStatusDetails } from '../../src/api/status-details';
import { DOCUMENTED_CODES, Rng, Tally } from '../support/fuzz';
import { blobDiff, mutateSvmFrom } from '../support/fuzz-svm';
import type { Client } from './lab-vm';

export const LAB_FUZZ_SEED = Number(process.env.LAB_FUZZ_SEED ?? 20261124);
/** CI default: about 40 s of the lab's slow (TCG) vcpud (~0.2 s a call); `npm run soak` runs 5,000. */
export const LAB_FUZZ_REQUESTS = Number(process.env.LAB_FUZZ_REQUESTS ?? 200);
/** Share of the calls that skip vcpud's validation, so the kernel's own checks are reached. */
const BYPASS_SHARE = 0.5;
/** The lab's vcpud runs 10-13x slower than on the host. */
const CALL_DEADLINE_MS = 60_000;

export interface NestedFuzzTarget {
  state: Client;
  vmId: string;
  /** The real blob every mutation starts from (GetNestedState of the paused L2 vCPU). */
  base: Buffer;
  /** The vCPU's whole state: compared before/after every refused call. */
  whole(): Promise<unknown>;
  /** Puts the vCPU back as it was when `base` was read (after an accepted call). */
  reset(): Promise<void>;
}

export interface NestedFuzzResult {
  seed: number;
  requests: number;
  durationMs: number;
  /** Answers by "<validated|bypass>:<code>[:<ErrorInfo reason>]". */
  tally: Tally;
  /** Blobs vcpud's validation let through and the kernel refused (validator gaps worth a rule), first 10. */
  kernelOnly: string[];
}

function setNested(t: NestedFuzzTarget, raw: Buffer, bypass: boolean): Promise<grpc.ServiceError | undefined> {
  const md = new grpc.Metadata();
  if (bypass) md.set('x-vcpud-skip-validation', '1');
  return new Promise((resolve) =>
    t.state.SetNestedState({ vmId: t.vmId, vcpuId: 0, raw }, md, { deadline: Date.now() + CALL_DEADLINE_MS }, (e: grpc.ServiceError | null) =>
      resolve(e ?? undefined),
    ),
  );
}

/** Runs the fuzz; throws at the first broken invariant, naming the request, its seed and the blob. */
export async function fuzzSetNestedState(
  t: NestedFuzzTarget,
  seed = LAB_FUZZ_SEED,
  requests = LAB_FUZZ_REQUESTS,
  progress?: (line: string) => void,
): Promise<NestedFuzzResult> {
  const started = Date.now();
  const r = new Rng(seed);
  const tally = new Tally();
  const kernelOnly: string[] = [];
  let before = await t.whole();
  for (let i = 0; i < requests; i++) {
    const bypass = r.chance(BYPASS_SHARE);
    const blob = mutateSvmFrom(r, t.base);
    const err = await setNested(t, blob, bypass);
    const code = err?.code ?? grpc.status.OK;
    const reason = err ? decodeStatusDetails(err.metadata)?.errorInfo?.reason : undefined;
    tally.count(`${bypass ? 'bypass' : 'validated'}:${grpc.status[code]}${reason ? `:${reason}` : ''}`);
    const tag = () => `#${i} (LAB_FUZZ_SEED=${seed}, ${bypass ? 'validation bypassed' : 'validated'}): blob vs the real one: ${blobDiff(t.base, blob)}`;
    if (err && !DOCUMENTED_CODES.has(code)) throw new Error(`${tag()}: undocumented status ${grpc.status[code]}: ${err.details}`);
    if (!bypass && reason === 'KERNEL_REJECTED' && kernelOnly.length < 10) kernelOnly.push(`#${i}: ${blobDiff(t.base, blob)}`);
    if (err) {
      const after = await t.whole();
      if (!isDeepStrictEqual(after, before)) {
        try {
          expect(after).toEqual(before);
        } catch (e) {
          throw new Error(
            `${tag()}: a refused SetNestedState changed the vCPU (${grpc.status[code]}: ${err.details}):\n${(e as Error).message.slice(0, 3000)}`,
          );
        }
      }
    } else {
      await t.reset().catch((e: Error) => {
        throw new Error(`${tag()}: accepted; resetting the vCPU afterwards failed: ${e.message}`);
      });
      before = await t.whole();
    }
    if (progress && (i + 1) % 250 === 0) progress(`lab fuzz ${i + 1}/${requests} after ${((Date.now() - started) / 1000).toFixed(0)} s: ${tally}`);
  }
  return { seed, requests, durationMs: Date.now() - started, tally, kernelOnly };
}

/**
 * The source side of a migration: the engine that moves a ManagedVm to another vcpud over a data
 * connection (channel.ts), pre-copy or stop-and-copy.
 *
 * Pre-copy: pass 1 sends every non-zero page while the VM runs; each later pass sends what the
 * guest (KVM's dirty log) or vcpud dirtied since the previous harvest. It switches over when the
 * expected downtime (dirty bytes / measured bandwidth + the measured fixed switch cost) is within
 * max_downtime or nothing is dirty: pause, last dirty pages, the state records, commit. When the
 * dirty bytes stop falling the vCPUs are throttled (20%, +10% per pass, up to 99%), or the
 * migration fails if the request says so; past the completion deadline it fails.
 *
 * Ownership: the source owns the VM until the destination acknowledges the commit. Every failure
 * before the commit is sent leaves the VM running here as it was (vCPUs resumed, throttle and dirty
 * log off, hold released) and discards the destination's copy. After the commit is sent, a missing
 * acknowledgement is resolved by asking the destination; if it cannot be asked, the VM stays paused
 * here (never two running copies) and the error says so.
 *
 * Run control meanwhile: the VM is held, so resume and memory writes are refused with
 * FAILED_PRECONDITION naming the migration; pausing a vCPU and SetState are allowed (the state is
 * read at the switch-over and the run states recorded then).
 */
import type net from 'node:net';
import { VcpudError } from '../../errors';
import type { HostCapabilities } from '../../ffi/capabilities';
import { dirtyBitmapBytes } from '../../ffi/dirty-log';
import { frameBytes, widenSendBuffer, zeroCopyStagingBytes } from '../../ffi/page-frames';
import type { ManagedVm } from '../managed-vm';
import { assertBackingIntact, backingFaultError } from '../memory-backing';
import { countBits, PAGE_SIZE, type SnapshotHeader, type SnapshotRunState } from '../snapshot-format';
import { captureState, snapshotHeader } from '../snapshot-writer';
import { warmStateCodecs } from '../../ffi/sections/warm-up';
import { Channel } from './channel';
import { collectGarbage } from './collect-garbage';
import { DirtyTracker } from './dirty-tracker';
import { ENVELOPE_HEADER_SIZE, EnvelopeType, PROTOCOL_VERSION, type Committed, type PassAck } from './protocol';
import { encodeState } from './state-records';

export type MigrationMode = 'auto' | 'pre-copy' | 'stop-and-copy';

/** The destination's control plane, as the server layer reaches it (gRPC). */
export interface DestinationControl {
  /** Names the destination in messages. */
  readonly name: string;
  /**
   * `preallocateMemory`: the destination commits the guest's memory before it answers. `signal`
   * cancels the call (the destination then discards what it prepared).
   */
  prepare(
    header: SnapshotHeader,
    vmName: string | undefined,
    preallocateMemory: boolean | undefined,
    signal: AbortSignal,
  ): Promise<{ migrationId: string; endpoint: string; token: Buffer }>;
  /** Opens the data connection to a prepared endpoint. */
  connect(endpoint: string, signal: AbortSignal): Promise<net.Socket>;
  /** Discards the incoming migration unless committed; its state, or 'unknown' when it cannot be asked. */
  abort(migrationId: string, reason: string): Promise<'aborted' | 'committed' | 'unknown'>;
  /** The committed VM's id is known; `destroySource` follows. */
}

export interface MigrationOptions {
  caps: HostCapabilities;
  mode: MigrationMode;
  maxDowntimeMs: number;
  /** Bytes per second, 0 unlimited. */
  bandwidth: number;
  completionTimeoutPerGiBMs: number;
  abortOnNoProgress: boolean;
  /** The destination commits all guest memory before answering prepare (fails early if it cannot). */
  preallocateDestinationMemory?: boolean;
  leavePaused: boolean;
  destinationVmName?: string;
  stallMs: number;
  /** Aborted when the client cancels. */
  signal: AbortSignal;
  onProgress(p: MigrationProgress): void;
  /** Removes the source VM once the destination has it (the registry's destroy). */
  destroySource(): void;
}

export interface MigrationProgress {
  phase: 'memory' | 'state' | 'sync' | 'resume';
  pass: number;
  bytesTotal: number;
  bytesSent: number;
  bytesRemaining: number;
  memoryBytesDone: number;
  dirtyRate: number;
  transferRate: number;
  expectedDowntimeMs: number;
  throttlePercent: number;
  switchingOver: boolean;
  /** The report that closes a pass, with the rates it measured (a client must not miss it). */
  passEnd?: boolean;
}

export interface MigrationReport {
  destinationVmId: string;
  mode: Exclude<MigrationMode, 'auto'>;
  passes: number;
  bytesSent: number;
  durationMs: number;
  downtimeMs: number;
  lastPassMs: number;
  stateMs: number;
  restoreMs: number;
  resumeMs: number;
  /** The phases before the switch-over: PrepareIncomingMigration's round trip, the data connection and its hello, the passes while the VM ran. */
  prepareMs: number;
  connectMs: number;
  preCopyMs: number;
  /** After the commit: deleting the source copy. */
  deleteSourceMs: number;
  /** The committed VM as the destination described it, when it did. */
  destinationVm?: unknown;
  maxThrottlePercent: number;
  /** Page copies that arrived changed (the guest rewrote them on their way) and went again in a later pass. */
  tornPages: number;
  notes: string[];
}

/**
 * Pages per frame: a 64 KiB frame stays in cache between the copy and the CRC on the source, and
 * between the CRC check and the copy into guest memory on the destination (packing 256 MiB ran at
 * 5.8-6.0 GiB/s with 16-page frames, 3.5-4.1 with 256-page ones here).
 */
const FRAME_PAGES = 16;
/**
 * Page envelopes carry 1 MiB of page data (or many frames of zero pages): small envelopes keep the
 * source's packing, the kernel and the destination's applying overlapped (with 2, 8 and 32 MiB
 * envelopes a 256 MiB move took 1.1-1.9x as long here).
 */
const ENVELOPE_FRAMES_BYTES = 16 * frameBytes(FRAME_PAGES);
/** Where a PAGES envelope's frames start: after its header and [u32 region index][u32 0]. */
const PAGES_AT = ENVELOPE_HEADER_SIZE + 8;
/** Envelope buffers in rotation: one being packed while the others are written. */
const ENVELOPE_BUFFERS = 3;
/**
 * On a unix socket the frames go natively and zero-copy (GuestMemory.sendFrames): pages per frame
 * (the destination makes three reads per frame), the least bytes per call under a bandwidth limit,
 * the socket's send buffer (the kernel's 208 KiB default made the two sides take turns: 1.1 GiB/s
 * into fresh memory against 2.0-2.2 GiB/s with 1 MiB asked, 2 MiB in effect,
 * bench/migration-data-plane.ts), and bytes written per call (progress, the bandwidth limit and
 * the VM's deletion are looked at between calls; a sparse pass is one call: a page count per call
 * made a 4 GiB guest's last pass 64 calls, 54 ms).
 */
const STREAM = { framePages: 64, minCallBytes: 1024 * 1024, callBytes: 64 * 1024 * 1024, sendBufferBytes: 1024 * 1024 };
/** A pass counts as progress when it leaves less than this share of the previous pass's dirty bytes. */
const PROGRESS_RATIO = 0.9;
/** A pass that leaves at most this share of the previous pass's dirty bytes is followed by another, never by the switch. */
const HALVING_RATIO = 0.5;
/** Throttle steps: start, step, cap (percent of each run slice spent sleeping). */
const THROTTLE = { start: 20, step: 10, max: 99 };
/**
 * The fixed part of the switch-over (reading the state, the destination applying it and resuming),
 * per vCPU: measured by every migration this process completes (the latest wins, the host's load
 * moves it), 20 ms before the first one (what a loaded 2-core host measured for one vCPU).
 */
const switchCost = { msPerVcpu: 20 };
/** A switch-over follows a full garbage collection at most this long ago (the passes start over after it). */
const COLLECTED_FRESH_MS = 1000;
/** The completion deadline never goes below this. */
const MIN_COMPLETION_MS = 10_000;
const GiB = 1024 ** 3;

const now = () => Number(process.hrtime.bigint()) / 1e6;

/** Stage of the migration, for errors: "pass 3 of pre-copy". */
class Stage {
  phase = 'prepare';
  pass = 0;
  toString(): string {
    return this.pass ? `${this.phase}, pass ${this.pass}` : this.phase;
  }
}

interface Paused {
  wasRunning: number[];
  before: { id: number; state: SnapshotRunState; reason?: string }[];
}

function setThrottle(vm: ManagedVm, percent: number): void {
  for (const v of vm.vcpus) v.setThrottle(percent);
}

const KEPT_REASONS: ReadonlySet<string> = new Set(['MIGRATION_TO_SELF', 'MEMORY_BACKING_LOST']);

export async function migrateVm(vm: ManagedVm, dest: DestinationControl, opts: MigrationOptions): Promise<MigrationReport> {
  const started = now();
  const live = opts.mode !== 'stop-and-copy';
  const mode = live ? 'pre-copy' : 'stop-and-copy';
  const stage = new Stage();
  const release = vm.hold(`${mode} migration to ${dest.name} in progress`);
  const tracker = live ? new DirtyTracker(vm.vm) : undefined;
  const totalBytes = vm.memoryBytes;
  const deadline = started + Math.max(MIN_COMPLETION_MS, (opts.completionTimeoutPerGiBMs * totalBytes) / GiB);
  let migrationId: string | undefined;
  let channel: Channel | undefined;
  let paused: Paused | undefined;
  let unacked: Buffer[] | undefined;
  let commitSent = false;
  let throttle = 0;
  let maxThrottle = 0;
  /** Pages that arrived torn (rewritten by the guest in flight), summed over the passes' acknowledgements. */
  let tornPages = 0;

  const pause = async (): Promise<Paused> => {
    const before = vm.statuses().map((s) => ({ id: s.id, state: s.state as SnapshotRunState, reason: s.reason }));
    await vm.pauseAll();
    return { before, wasRunning: before.filter((s) => s.state === 'running').map((s) => s.id) };
  };

  // A fault reading guest memory (a VM restored lazily whose snapshot file was truncated or rewritten)
  // is the memory's loss, not the transport's: MEMORY_BACKING_LOST naming the file. EFAULT is that
  // fault met by a syscall (vmsplice of a lost page) rather than by vcpud's guarded reads.
  const READING = 'reading guest memory';
  const memoryLost =
    (region: number) =>
    (e: unknown): never => {
      if ((e as { code?: unknown })?.code === 'EFAULT') assertBackingIntact(vm.vm.regions, vm.id, READING);
      throw backingFaultError(e, vm.vm.regions[region], vm.vm.regions, vm.id, READING);
    };

  try {
    stage.phase = 'prepare';
    // Refused before the destination is asked: the memory to send is already gone.
    assertBackingIntact(vm.vm.regions, vm.id, READING);
    const placeholder = vm.vcpus.map((v) => ({ id: v.id, runState: 'paused' as const, sections: [], nestedSize: 0, msrsUnreadable: [] }));
    const preparing = dest.prepare(snapshotHeader(vm, opts.caps, placeholder, []), opts.destinationVmName, opts.preallocateDestinationMemory, opts.signal);
    // Dirty logging starts while the destination prepares (it write-protects every page: 1-3 ms for 1-4 GiB here).
    if (tracker) tracker.start();
    const prepared = await preparing;
    migrationId = prepared.migrationId;
    const preparedAt = now();

    stage.phase = 'connect';
    const socket = await dest.connect(prepared.endpoint, opts.signal);
    channel = new Channel(socket, opts.stallMs, `the destination ${dest.name}`, opts.signal);
    const ch = channel;
    const helloAt = now();
    await ch.sendJson(EnvelopeType.Hello, { version: PROTOCOL_VERSION, migrationId, token: prepared.token.toString('base64') });
    await ch.expectJson(EnvelopeType.HelloOk, 'waiting for the destination to accept the data connection');
    const connectedAt = now();
    const rttMs = connectedAt - helloAt;
    const fixedCostMs = 2 * rttMs + switchCost.msPerVcpu * vm.vcpus.length;

    const regions = vm.vm.regions;
    let seq = 0;
    // Envelope buffers are reused, each only once the socket has written it out (fresh 1 MiB
    // buffers cost a page fault per 4 KiB: packing into them ran at half the speed, BENCHMARKS.md).
    // The next envelopes are packed while earlier ones are still being written.
    // Each holds the envelope's header, [u32 region][u32 0] and the frames: one socket write.
    const envelopes = Array.from({ length: ENVELOPE_BUFFERS }, () => ({
      buf: Buffer.allocUnsafe(PAGES_AT + ENVELOPE_FRAMES_BYTES),
      written: Promise.resolve(),
    }));
    let nextEnvelope = 0;
    const fd = regions.length === 1 ? ch.rawFd : undefined;
    if (fd !== undefined) widenSendBuffer(fd, STREAM.sendBufferBytes);
    // Zero-copy: the staging buffer holds a frame's header and page table, not its pages.
    const staging = fd !== undefined ? Buffer.allocUnsafe(zeroCopyStagingBytes(STREAM.framePages)) : undefined;
    // The bandwidth limit is kept per call: a call sends about 100 ms of it.
    const callBytes = opts.bandwidth ? Math.max(STREAM.minCallBytes, Math.floor(opts.bandwidth / 10)) : STREAM.callBytes;
    const streamPass = async (bitmap: Buffer, onChunk: (doneBytes: number) => void) => {
      const memory = regions[0].memory;
      const total = regions[0].size / PAGE_SIZE;
      await ch.sendReusable(EnvelopeType.PagesStream, Buffer.alloc(ENVELOPE_HEADER_SIZE)); // written: the socket is ours
      for (let page = 0; page < total; ) {
        if (vm.isDestroyed) throw new VcpudError('failed_precondition', `VM ${vm.id} was deleted during the migration`, { reason: 'WRONG_RUN_STATE' });
        const from = page;
        const sending = ch.sendStream(`sending to the destination`, (sock, cancel) =>
          memory
            .sendFrames(sock, bitmap, from, staging as Buffer, {
              seq,
              framePages: STREAM.framePages,
              maxBytes: callBytes,
              end: true,
              // The guest's pages go by reference (no copy on this side: copying into the socket's
              // buffers made the source 2-5x slower in some runs, BENCHMARKS.md); while the guest runs
              // a page may change on its way, which the destination then knows (tearable frames) and
              // the next pass mends: the page was dirtied after this pass's harvest.
              zeroCopy: true,
              tearable: !paused,
              stallMs: opts.stallMs,
              cancel,
            })
            .catch(memoryLost(0)),
        );
        // The switch-over's state capture uses the section codecs: compiled while a pool thread
        // sends, not while the guest is paused (only a process's first call does work).
        warmStateCodecs();
        const r = await sending;
        if (r.nextPage <= page) throw new VcpudError('internal', `sendFrames made no progress at page ${page}`);
        seq += r.frames;
        page = r.nextPage;
        onChunk(page * PAGE_SIZE);
        if (page < total) await rateLimit(opts.bandwidth, started, ch.bytesOut, opts.signal);
      }
    };
    const sendPass = async (bitmaps: Buffer[], onChunk: (doneBytes: number) => void) => {
      if (fd !== undefined) return streamPass(bitmaps[0], onChunk);
      warmStateCodecs(); // as in streamPass
      let done = 0;
      for (let i = 0; i < regions.length; i++) {
        const total = regions[i].size / PAGE_SIZE;
        for (let page = 0; page < total; ) {
          if (vm.isDestroyed) throw new VcpudError('failed_precondition', `VM ${vm.id} was deleted during the migration`, { reason: 'WRONG_RUN_STATE' });
          const envelope = envelopes[nextEnvelope];
          await envelope.written;
          const out = envelope.buf;
          const r = await regions[i].memory.packPages(bitmaps[i], page, out.subarray(PAGES_AT), { seq, framePages: FRAME_PAGES }).catch(memoryLost(i));
          if (r.nextPage <= page) throw new VcpudError('internal', `packPages made no progress at page ${page}`);
          seq += r.frames;
          done += (r.nextPage - page) * PAGE_SIZE;
          page = r.nextPage;
          if (!r.bytes) continue;
          out.writeUInt32LE(i, ENVELOPE_HEADER_SIZE);
          out.writeUInt32LE(0, ENVELOPE_HEADER_SIZE + 4);
          envelope.written = ch.sendReusable(EnvelopeType.Pages, out.subarray(0, PAGES_AT + r.bytes), false);
          envelope.written.catch(() => {}); // awaited before the buffer's reuse or at the pass's end
          nextEnvelope = (nextEnvelope + 1) % envelopes.length;
          await rateLimit(opts.bandwidth, started, ch.bytesOut, opts.signal);
          onChunk(done);
        }
      }
      await Promise.all(envelopes.map((e) => e.written));
    };
    const endPass = async (pass: number) => {
      await ch.sendJson(EnvelopeType.PassEnd, { pass });
      const ack = await ch.expectJson<PassAck>(EnvelopeType.PassAck, `waiting for the destination to apply pass ${pass}`);
      if (ack.pass !== pass) throw new VcpudError('internal', `the destination acknowledged pass ${ack.pass} where ${pass} was due`);
      tornPages += ack.tornPages;
      unacked = undefined;
    };
    const progress = (p: Partial<MigrationProgress> & Pick<MigrationProgress, 'phase'>): MigrationProgress => ({
      pass: stage.pass,
      bytesTotal: totalBytes,
      bytesSent: ch.bytesOut,
      bytesRemaining: 0,
      memoryBytesDone: 0,
      dirtyRate: 0,
      transferRate: 0,
      expectedDowntimeMs: 0,
      throttlePercent: throttle,
      switchingOver: !!paused,
      ...p,
    });
    const report = (p: Parameters<typeof progress>[0]) => opts.onProgress(progress(p));
    // The paused window's progress (the last pass, the state, the commit) is written once the
    // destination has acknowledged the commit, outside the downtime: each message cost this thread
    // 0.1-1.3 ms (traced), and written during the destination's restore it competes with it for the
    // host's cores (a same-node migration, the client). A failure names its phase in the error.
    const windowProgress: MigrationProgress[] = [];
    const reportOnceCommitted = (p: Parameters<typeof progress>[0]) => void windowProgress.push(progress(p));

    if (!tracker) paused = await pause(); // stop-and-copy: paused for the whole copy
    const pausedAt = paused ? now() : 0;

    // Pre-copy passes (a stop-and-copy migration makes one, paused).
    stage.phase = live ? 'pre-copy' : 'stop-and-copy';
    // Pass 1 selects every page that may hold data (zero pages found among them cost 8 bytes of frame
    // table and nothing on the destination). Pages known zero without reading them (never touched, or
    // holes of a state directory's file) are left out: the destination's fresh memory is zero there,
    // and reading them would map or allocate every one on both sides. Dirty logging started before
    // this reading, so a page the guest writes after it is in the next harvest.
    let bitmaps: Buffer[] = regions.map((r) => {
      const b = Buffer.alloc(dirtyBitmapBytes(r.size));
      r.memory.candidatePages(0, r.size / PAGE_SIZE).copy(b);
      return b;
    });
    let bandwidth: number;
    let previousDirty = Infinity;
    let dirtyBytes = totalBytes;
    let collectedAt = -Infinity;
    for (;;) {
      stage.pass++;
      const passStart = now();
      const sentBefore = ch.bytesOut;
      unacked = bitmaps;
      let lastReport = 0;
      await sendPass(bitmaps, (done) => {
        if (now() - lastReport < 100) return;
        lastReport = now();
        const elapsed = (now() - passStart) / 1000;
        report({
          phase: 'memory',
          memoryBytesDone: done,
          bytesRemaining: Math.max(0, dirtyBytes - done),
          transferRate: elapsed > 0 ? (ch.bytesOut - sentBefore) / elapsed : 0,
        });
      });
      await endPass(stage.pass);
      const passMs = Math.max(now() - passStart, 0.001);
      const passRate = ((ch.bytesOut - sentBefore) * 1000) / passMs;
      // The last pass's rate, round trip included: the final pass is as short as the last ones, and
      // pass 1's bulk rate made the final pass take about twice the estimate (1 GiB bench).
      bandwidth = passRate;
      if (!tracker) break;

      bitmaps = await tracker.harvest();
      const dirtyPages = bitmaps.reduce((n, b) => n + countBits(b, b.length * 8), 0);
      dirtyBytes = dirtyPages * PAGE_SIZE;
      const dirtyRate = (dirtyBytes * 1000) / passMs;
      const expectedDowntimeMs = (dirtyBytes * 1000) / bandwidth + fixedCostMs;
      report({
        phase: 'memory',
        memoryBytesDone: totalBytes,
        bytesRemaining: dirtyBytes,
        dirtyRate,
        transferRate: passRate,
        expectedDowntimeMs,
        passEnd: true,
      });
      // While a pass at least halves the dirty set, the next one is at most half as long and so is
      // the paused one after it: keep going (at most log2(pages) passes), whatever the estimate.
      // Switching as soon as the estimate fit let the paused pass carry what pass 2 left, and pass
      // 2 grows with the guest (pass 1 is longer, the guest's working set all dirty): a 4 GiB guest
      // switched with 2,700 pages (7.5 ms) where a 1 GiB one had 50-800. While passes still shrink
      // less, one more is cheap and the estimate is rough on a busy host (the last pass took up to
      // 2x its estimate here): aim at half the budget; once they stop shrinking, the whole budget.
      const halving = dirtyBytes <= previousDirty * HALVING_RATIO;
      const shrinking = dirtyBytes <= previousDirty * PROGRESS_RATIO;
      const switchDue = dirtyPages === 0 || (!halving && expectedDowntimeMs <= (shrinking ? opts.maxDowntimeMs / 2 : opts.maxDowntimeMs));
      // The heap is collected while the guest runs, then passes send what it dirtied meanwhile: a
      // collection inside the paused window cost up to 29 ms (a major one at 1 GiB).
      if (switchDue && now() - collectedAt < COLLECTED_FRESH_MS) break;
      unacked = bitmaps; // harvested, not yet acknowledged
      if (now() > deadline)
        throw new VcpudError(
          'unavailable',
          `the completion timeout (${Math.round(deadline - started)} ms for ${(totalBytes / GiB).toFixed(2)} GiB) passed with ${dirtyBytes} bytes still dirty`,
        );
      if (switchDue) {
        collectGarbage();
        collectedAt = now();
        // What the guest dirtied during the collection (15-50 ms here) goes in passes that halve
        // it, as after pass 1, not in the paused one.
        previousDirty = Infinity;
        continue;
      }
      if (!shrinking && stage.pass >= 2) {
        if (opts.abortOnNoProgress)
          throw new VcpudError(
            'failed_precondition',
            `no progress: ${dirtyBytes} bytes dirty after pass ${stage.pass}, ${previousDirty} after the one before (the guest dirties ${Math.round(dirtyRate)} B/s against ${Math.round(bandwidth)} B/s sent), and abort_on_no_progress is set`,
          );
        throttle = throttle ? Math.min(THROTTLE.max, throttle + THROTTLE.step) : THROTTLE.start;
        maxThrottle = Math.max(maxThrottle, throttle);
        setThrottle(vm, throttle);
      }
      previousDirty = dirtyBytes;
    }

    // Switch-over: paused from here (stop-and-copy: since the start).
    stage.phase = 'switch-over';
    const switchAt = paused ? pausedAt : now();
    paused ??= await pause();
    let lastPassDone = now();
    let lastPass: Promise<void> | undefined;
    if (tracker) {
      stage.pass++;
      // The last pre-copy harvest was never sent: its pages go now, with what was dirtied since.
      tracker.mergeBack(bitmaps);
      bitmaps = await tracker.harvest();
      unacked = bitmaps;
      const lastPages = bitmaps.reduce((n, b) => n + countBits(b, b.length * 8), 0);
      reportOnceCommitted({ phase: 'memory', bytesRemaining: lastPages * PAGE_SIZE });
      // The pages go (a pool thread) while this thread reads the state: the vCPUs are paused, so
      // neither changes what the other reads. Nothing dirty (an idle guest): no frames, only the
      // pass's end (a pool thread on each side less).
      lastPass = (lastPages ? sendPass(bitmaps, () => {}) : Promise.resolve()).then(() => void (lastPassDone = now()));
      lastPass.catch(() => {}); // awaited below
    }
    stage.phase = 'state';
    let stateRecords: Buffer;
    try {
      stateRecords = encodeState(await captureState(vm, opts.caps, paused.before));
    } catch (e) {
      await lastPass?.catch(() => {}); // the pages' sender is done with the connection before it goes
      throw e;
    }
    let lastPassAcked: Promise<void> = Promise.resolve();
    if (lastPass) {
      stage.phase = 'switch-over'; // its errors are the last pass's
      await lastPass;
      // The state is sent while the destination applies the last pass and acknowledges it (one
      // round trip less in the downtime); the commit still waits for that acknowledgement.
      lastPassAcked = endPass(stage.pass).catch((e) => {
        stage.phase = 'switch-over'; // the error is the last pass's, whatever runs meanwhile
        throw e;
      });
      lastPassAcked.catch(() => {}); // awaited below
      stage.phase = 'state';
    }
    reportOnceCommitted({ phase: 'state', memoryBytesDone: totalBytes });
    await ch.sendEnvelope(EnvelopeType.State, stateRecords);
    await lastPassAcked;
    const stateDone = now();

    stage.phase = 'commit';
    commitSent = true;
    reportOnceCommitted({ phase: 'sync', memoryBytesDone: totalBytes });
    await ch.sendJson(EnvelopeType.Commit, { run: !opts.leavePaused });
    const committed = await ch.expectJson<Committed>(EnvelopeType.Committed, 'waiting for the destination to commit');
    const committedAt = now();
    for (const p of windowProgress.splice(0)) opts.onProgress(p);
    report({ phase: 'resume', memoryBytesDone: totalBytes });
    tracker?.stop();
    ch.close();
    // The destination has it: this copy goes.
    opts.destroySource();
    const deleteSourceMs = now() - committedAt;
    const downtimeMs = committedAt - switchAt;
    switchCost.msPerVcpu = (committedAt - lastPassDone) / vm.vcpus.length;
    return {
      destinationVmId: committed.vmId,
      mode,
      passes: stage.pass,
      bytesSent: ch.bytesOut,
      durationMs: committedAt - started,
      downtimeMs,
      lastPassMs: lastPassDone - switchAt,
      stateMs: stateDone - lastPassDone,
      restoreMs: committed.restoreMs,
      resumeMs: Math.max(0, committedAt - stateDone - committed.restoreMs),
      prepareMs: preparedAt - started,
      connectMs: connectedAt - preparedAt,
      preCopyMs: switchAt - connectedAt,
      deleteSourceMs,
      destinationVm: committed.vm,
      maxThrottlePercent: maxThrottle,
      tornPages,
      notes: tornPages
        ? [...committed.notes, `${tornPages} page copies changed in flight (the guest rewrote them) and went again in a later pass`]
        : committed.notes,
    };
  } catch (e) {
    if (unacked && tracker) tracker.mergeBack(unacked);
    tracker?.stop();
    setThrottle(vm, 0);
    channel?.destroy();
    const err = e as VcpudError;
    let outcome: string;
    if (commitSent && migrationId) {
      const s = await dest.abort(migrationId, err.message);
      if (s === 'committed') {
        // The commit went through; only its acknowledgement was lost.
        opts.destroySource();
        throw new VcpudError(
          'unavailable',
          `migration of VM ${vm.id} to ${dest.name}: the destination committed but its acknowledgement was lost (${err.message}); the VM runs there and was deleted here`,
          { reason: 'MIGRATION_FAILED' },
        );
      }
      outcome =
        s === 'aborted'
          ? await resumeHere(vm, paused)
          : '; the destination could not be asked whether it committed: the VM is left PAUSED here (resume it only after checking the destination)';
    } else {
      outcome = await resumeHere(vm, paused);
      if (migrationId) {
        // Not awaited: a stalled destination must not hold the VM (or the caller) any longer. It
        // discards the copy by itself anyway once its source connection closes or goes silent.
        void dest.abort(migrationId, err.message);
        outcome += '; the destination was told to discard its copy';
      }
    }
    // Reasons the caller acts on are kept: MIGRATION_TO_SELF (the destination is this server) and
    // MEMORY_BACKING_LOST (this VM's memory is gone: delete it, restore again); anything else failed the migration.
    const reason = err.details?.reason && KEPT_REASONS.has(err.details.reason) ? err.details.reason : 'MIGRATION_FAILED';
    throw Object.assign(new VcpudError(err.kind ?? 'internal', `${stage}: ${err.message ?? String(e)}${outcome}`, { ...(err.details ?? {}), reason }), {
      cause: e,
    });
  } finally {
    setThrottle(vm, 0);
    release();
  }
}

async function resumeHere(vm: ManagedVm, paused: Paused | undefined): Promise<string> {
  if (!paused || vm.isDestroyed) return '; the VM kept running here as it was';
  try {
    await Promise.all(paused.wasRunning.map((id) => vm.vcpus[id].resumeHeld()));
    return '; the VM was resumed here as it was';
  } catch (r) {
    return `; resuming the VM here FAILED: ${(r as Error).message}`;
  }
}

/** Sleeps so that `sent` bytes since `startMs` stay within `bandwidth` bytes per second. */
async function rateLimit(bandwidth: number, startMs: number, sent: number, signal: AbortSignal): Promise<void> {
  if (!bandwidth) return;
  const due = startMs + (sent * 1000) / bandwidth - now();
  if (due <= 1) return;
  await new Promise<void>((resolve) => {
    const t = setTimeout(done, due);
    function done() {
      clearTimeout(t);
      signal.removeEventListener('abort', done);
      resolve();
    }
    signal.addEventListener('abort', done, { once: true });
  });
}

/**
 * vcpud.v1.SnapshotService: CreateSnapshot (to a file under the snapshot directory, or streamed),
 * RestoreSnapshot (from a file) and RestoreSnapshotStream (from the client's stream) into a new VM,
 * ListSnapshots, DeleteSnapshot, and MigrateVm (its credentials are resolved here; the move itself
 * is migration-service.ts's).
 *
 * The format, the compatibility check and the restore live in src/vm/snapshot-*.ts; this file maps
 * requests onto them and keeps the run-state promises: the VM is held and paused while it is being
 * captured and put back as it was on any failure.
 */
import fs from 'node:fs';
import path from 'node:path';
import type * as grpc from '@grpc/grpc-js';
import { withBulkHeap } from '../../bulk-heap';
import { msToDuration } from '../../duration';
import { invalidArgument, VcpudError } from '../../errors';
import { loadAndRestore } from '../../vm/snapshot-restore';
import { SnapshotBases } from '../../vm/snapshot-bases';
import { chainLoader } from '../../vm/snapshot-chain';
import { deleteSnapshot, mergeSnapshot } from '../../vm/snapshot-merge';
import { FileSource, StreamSource, type LoadedSnapshot } from '../../vm/snapshot-reader';
import { SnapshotStore, type OpenTarget, type SnapshotEntry } from '../../vm/snapshot-store';
import { snapshotWriteError } from '../../vm/snapshot-write-error';
import { AtomicFileSink, captureSnapshot, holdAndPause, StreamSink, type CaptureResult, type SnapshotProgress as Progress } from '../../vm/snapshot-writer';
import type { SnapshotHeader } from '../../vm/snapshot-format';
import type { ManagedVm } from '../../vm/managed-vm';
import { checkVmName } from '../../vm/vm-name';
import { timestampToProto, vmToProto } from '../convert';
import { toServiceError } from '../errors';
import type { CreateSnapshotRequest__Output } from '../../api/generated/vcpud/v1/CreateSnapshotRequest';
import type { CreateSnapshotResponse } from '../../api/generated/vcpud/v1/CreateSnapshotResponse';
import type { DeleteSnapshotRequest__Output } from '../../api/generated/vcpud/v1/DeleteSnapshotRequest';
import type { ListSnapshotsRequest__Output } from '../../api/generated/vcpud/v1/ListSnapshotsRequest';
import type { MergeSnapshotRequest__Output } from '../../api/generated/vcpud/v1/MergeSnapshotRequest';
import type { MigrateVmRequest__Output } from '../../api/generated/vcpud/v1/MigrateVmRequest';
import type { MigrateVmResponse } from '../../api/generated/vcpud/v1/MigrateVmResponse';
import type { RestoreSnapshotStreamRequest__Output } from '../../api/generated/vcpud/v1/RestoreSnapshotStreamRequest';
import type { RestoreSnapshotStreamResponse } from '../../api/generated/vcpud/v1/RestoreSnapshotStreamResponse';
import type { SnapshotInfo } from '../../api/generated/vcpud/v1/SnapshotInfo';
import type { SnapshotPhase } from '../../api/generated/vcpud/v1/SnapshotPhase';
import type { SnapshotProgress } from '../../api/generated/vcpud/v1/SnapshotProgress';
import type { SnapshotServiceHandlers } from '../../api/generated/vcpud/v1/SnapshotService';
import { vcpudServiceDefinitions } from '../service-definitions';
import type { ServiceSink } from '../server';
import { decodedRequest } from '../undecodable-request';
import { serverStream, unary, type ServiceContext } from './context';
import { BYTES_FIELD_HEADROOM, bytesFieldMessage } from '../../api/preserialized';
import { uploadStalled } from '../request-limits';
import { migrationDestination, type MigrationTlsFiles } from './migration-destination';
import type { MigrationService } from './migration-service';
import { cancelledWithin, limitReadAhead, stallGuarded, writeAndWait, writeWithBackpressure, type WritableLike } from './streams';

/** Snapshot bytes per gRPC message (CreateSnapshot.data, the migration stream). */
export const STREAM_CHUNK = 1024 * 1024;
/** CreateSnapshot data messages being sent at once (their buffers are reused once sent). */
export const STREAM_IN_FLIGHT = 8;
/** CreateSnapshotResponse.data's field number. */
const CREATE_SNAPSHOT_DATA_FIELD = 2;
/** A CreateSnapshotResponse carrying `framed`'s snapshot bytes, encoded in place (StreamSink's headroom). */
export const streamData = (framed: Buffer) => bytesFieldMessage(CREATE_SNAPSHOT_DATA_FIELD, framed, BYTES_FIELD_HEADROOM);
/** Progress messages at most this often (plus one per phase change). */
const PROGRESS_INTERVAL_MS = 100;
/** How long a RestoreSnapshotStream whose input ended too early waits for the client's cancel. */
const CANCEL_AFTER_END_GRACE_MS = 250;

export interface SnapshotServiceOptions {
  snapshotDir: string;
  /** Default client credentials for MigrateVm (files). */
  migrationTls?: MigrationTlsFiles;
  /** A RestoreSnapshotStream upload that sends nothing for this long fails (UPLOAD_STALLED). */
  uploadStallTimeoutMs: number;
  /** Runs MigrateVm. */
  migration?: MigrationService;
}

const PHASES: Record<Progress['phase'], SnapshotPhase> = {
  state: 'SNAPSHOT_PHASE_STATE',
  memory: 'SNAPSHOT_PHASE_MEMORY',
  sync: 'SNAPSHOT_PHASE_SYNC',
  done: 'SNAPSHOT_PHASE_DONE',
};

export function snapshotInfo(
  header: SnapshotHeader,
  extra: { name?: string; sizeBytes: number; pagesStored?: number; durationMs?: number; problem?: string },
): SnapshotInfo {
  return {
    name: extra.name ?? '',
    sizeBytes: String(extra.sizeBytes),
    vmId: header.vm.id,
    vmName: header.vm.name,
    memoryBytes: String(header.vm.memoryBytes),
    vcpuCount: header.vm.vcpuCount,
    memoryPagesStored: String(extra.pagesStored ?? 0),
    formatVersion: header.formatVersion,
    createTime: timestampToProto(new Date(header.createdAt)),
    sourceHost: header.source.hostname,
    vendor: header.source.vendor,
    ...(extra.durationMs !== undefined ? { duration: msToDuration(extra.durationMs) } : {}),
    problem: extra.problem ?? '',
    parent: header.parent?.name ?? '',
    chainDepth: header.chainDepth ?? 0,
    snapshotId: header.snapshotId ?? '',
  };
}

function entryInfo(e: SnapshotEntry): SnapshotInfo {
  if (!e.header) return { name: e.name, sizeBytes: String(e.sizeBytes), problem: e.problem ?? 'unreadable header' };
  return snapshotInfo(e.header, { name: e.name, sizeBytes: e.sizeBytes });
}

/** Progress messages, throttled: every phase change, then at most every PROGRESS_INTERVAL_MS. */
function progressSender(send: (p: SnapshotProgress) => void): (p: Progress) => void {
  let lastPhase = '';
  let last = 0;
  return (p) => {
    const now = Date.now();
    if (p.phase === lastPhase && now - last < PROGRESS_INTERVAL_MS) return;
    lastPhase = p.phase;
    last = now;
    send({
      phase: PHASES[p.phase],
      memoryBytesDone: String(p.memoryBytesDone),
      memoryBytesTotal: String(p.memoryBytesTotal),
      bytesWritten: String(p.bytesWritten),
    });
  };
}

const elapsedMs = (since: bigint) => Number(process.hrtime.bigint() - since) / 1e6;

export class SnapshotService {
  readonly store: SnapshotStore;
  /**
   * Crashed runs' temporary files anywhere under the directory (a kill -9 mid-snapshot), removed once
   * at start, on the pool; resolves to their names. A directory vcpud cannot read is reported by the
   * calls that need it, not here.
   */
  readonly startupSweep: Promise<string[]>;

  constructor(
    private readonly ctx: ServiceContext,
    private readonly opts: SnapshotServiceOptions,
  ) {
    this.store = new SnapshotStore(opts.snapshotDir);
    this.startupSweep = this.store.removeStaleTemps().catch(() => []);
  }

  register(server: ServiceSink): void {
    server.addService(vcpudServiceDefinitions().SnapshotService, this.handlers());
  }

  /** CreateSnapshot's `parent`: its link and depth, or why it cannot be the parent (nothing touched yet). */
  private async parentOf(vm: ManagedVm, name: string) {
    let read: Awaited<ReturnType<typeof this.store.identify>>;
    try {
      read = await this.store.identify(name, (id) => SnapshotBases.recorded(vm, id));
    } catch (e) {
      if (e instanceof VcpudError) throw Object.assign(e, { message: `parent: ${e.message}` });
      throw new VcpudError('data_loss', `parent ${JSON.stringify(name)} is not a whole snapshot: ${(e as Error).message}`, {
        reason: 'SNAPSHOT_CORRUPT',
        field: 'parent',
      });
    }
    return SnapshotBases.parentLink(vm, name, read.header, read.identity);
  }

  private restoreResponse(loaded: LoadedSnapshot, vm: ManagedVm, notes: string[], started: bigint) {
    return {
      vm: vmToProto(vm),
      notes,
      stats: {
        memoryBytesMapped: String(loaded.mappedBytes),
        memoryBytesCopied: String(loaded.copiedBytes),
        snapshotBytes: String(loaded.bytes),
        duration: msToDuration(elapsedMs(started)),
      },
    };
  }

  handlers(): SnapshotServiceHandlers {
    const ctx = this.ctx;
    return {
      CreateSnapshot: serverStream<CreateSnapshotRequest__Output, CreateSnapshotResponse>(ctx, async (call) => {
        const req = call.request;
        const vm = ctx.registry.get(req.vmId);
        const toStream = req.destination === 'stream' && req.stream;
        if (!toStream && req.destination !== 'name')
          throw invalidArgument('CreateSnapshot needs a destination: name or stream', [
            { rule: 'required', field: 'destination', message: 'set name or stream' },
          ]);
        // The name and the parent are checked (and the name's directories created and opened) before the VM is touched.
        const name = req.name ?? '';
        if (req.parent && req.parent === name)
          throw invalidArgument('parent and name are the same snapshot', [
            { rule: 'parent.not_self', field: 'parent', message: 'a child cannot replace its own parent: give it another name' },
          ]);
        const parent = req.parent ? await this.parentOf(vm, req.parent) : undefined;
        let target: OpenTarget | undefined;
        try {
          target = toStream ? undefined : await this.store.openForWrite(name, { replace: req.replace });
        } catch (e) {
          throw snapshotWriteError(e, name, path.join(this.store.dir, name)); // mkdir of a subdirectory
        }
        try {
          const held = await holdAndPause(vm, `snapshot ${toStream ? 'to a stream' : JSON.stringify(name)} in progress`);
          let ok = false;
          try {
            // Paused: what the VM dirtied up to now goes to its bases (tracking starts here if asked).
            const bases = parent || req.trackDirty ? SnapshotBases.start(vm) : SnapshotBases.of(vm);
            await bases?.collect();
            const incremental =
              parent && bases ? { parent: parent.link, parentDepth: parent.depth, dirty: bases.dirtySince(parent.link.snapshotId) } : undefined;
            let r: CaptureResult;
            try {
              const sink = target
                ? await AtomicFileSink.create(target)
                : new StreamSink((_chunk, framed) => writeAndWait(call as WritableLike<unknown>, streamData(framed)), {
                    maxChunk: STREAM_CHUNK,
                    headroom: BYTES_FIELD_HEADROOM,
                    inFlight: STREAM_IN_FLIGHT,
                  });
              const capture = () =>
                captureSnapshot(vm, sink, {
                  caps: ctx.caps,
                  runStates: held.before,
                  onProgress: progressSender((progress) => call.write({ progress })),
                  cancelled: () => call.cancelled,
                  incremental,
                });
              r = await (target ? capture() : withBulkHeap(capture));
            } catch (e) {
              throw target ? snapshotWriteError(e, name, target.displayPath) : e;
            }
            ok = true;
            if (target) bases?.add(r.identity);
            await writeWithBackpressure(call, {
              done: snapshotInfo(r.header, { name: toStream ? '' : name, sizeBytes: r.bytes, pagesStored: r.end.pagesStored, durationMs: r.durationMs }),
            });
          } finally {
            if (!ok || !req.leavePaused) await held.resume();
            held.release();
          }
        } finally {
          await target?.close();
        }
      }),

      RestoreSnapshot: unary(ctx, async (req: { name: string; run: boolean; vmName: string; noLazyMemory: boolean }) => {
        const started = process.hrtime.bigint();
        checkVmName(req.vmName, 'vm_name');
        const { fd } = await this.store.openForRead(req.name);
        try {
          const lazy = !req.noLazyMemory;
          const loadParent = chainLoader(this.store, req.name, { lazy });
          const r = await loadAndRestore(ctx.registry, ctx.caps, new FileSource(fd), {
            fileFd: fd,
            lazy,
            loadParent,
            name: req.vmName || undefined,
            run: req.run,
          });
          return this.restoreResponse(r.loaded, r.vm, r.notes, started);
        } finally {
          fs.closeSync(fd); // mappings of the file outlive the descriptor
        }
      }),

      RestoreSnapshotStream: (
        call: grpc.ServerReadableStream<RestoreSnapshotStreamRequest__Output, RestoreSnapshotStreamResponse>,
        callback: grpc.sendUnaryData<RestoreSnapshotStreamResponse>,
      ) => {
        const started = process.hrtime.bigint();
        let options: { run: boolean; vmName: string } = { run: false, vmName: '' };
        let sawData = false;
        let inputEnded = false;
        const stallMs = this.opts.uploadStallTimeoutMs;
        let received = 0;
        const messages = stallGuarded(call as AsyncIterable<RestoreSnapshotStreamRequest__Output>, stallMs, () =>
          uploadStalled(`the RestoreSnapshotStream upload (after ${received} bytes)`, stallMs),
        );
        async function* chunks(): AsyncGenerator<Buffer> {
          for await (const message of messages) {
            const msg = decodedRequest(message);
            if (msg.message === 'options' && msg.options) {
              if (sawData)
                throw invalidArgument('options must be the first message', [
                  { rule: 'options.first', field: 'options', message: 'send options before any data' },
                ]);
              checkVmName(msg.options.vmName, 'options.vm_name'); // before any byte of the snapshot is read
              options = { run: msg.options.run, vmName: msg.options.vmName };
              continue;
            }
            sawData = true;
            received += msg.data?.length ?? 0;
            if (msg.data?.length) yield msg.data;
          }
          inputEnded = true;
        }
        Promise.resolve()
          .then(async () => {
            if (ctx.shuttingDown()) throw new VcpudError('unavailable', 'vcpud is shutting down');
            // The VM this upload will make counts against max_vms from its first message (its memory
            // from the header on): uploads beyond the limit are refused before they send anything.
            const reservation = ctx.registry.reserve();
            // grpc-js's readable side reads 16 messages ahead by default; one is enough to keep the upload moving.
            limitReadAhead(call, 1);
            // options arrive with the first message, before any byte of the snapshot is read
            const source = new StreamSource(chunks());
            const loadParent = chainLoader(this.store, '(streamed snapshot)');
            const opts = {
              get name() {
                return options.vmName || undefined;
              },
              get run() {
                return options.run;
              },
              reservation,
              loadParent,
            };
            const r = await withBulkHeap(() => loadAndRestore(ctx.registry, ctx.caps, source, opts));
            return this.restoreResponse(r.loaded, r.vm, r.notes, started);
          })
          .then(
            (res) => callback(null, res),
            async (e) => {
              // A grpc-js client's cancel reaches us as the end of its input first (Node's http2
              // sends END_STREAM before RST_STREAM) and as the cancel a moment later: a snapshot
              // cut short by a cancel is not DATA_LOSS. Waiting for the cancel before answering
              // lets it be counted and logged as what it is (grpc-js drops the late status).
              if (inputEnded) await cancelledWithin(call, CANCEL_AFTER_END_GRACE_MS);
              callback(toServiceError(e));
            },
          );
      },

      ListSnapshots: unary(ctx, async (req: ListSnapshotsRequest__Output) => {
        const page = await this.store.list(req.pageSize, req.pageToken);
        return { snapshots: page.entries.map(entryInfo), nextPageToken: page.nextPageToken };
      }),

      DeleteSnapshot: unary(ctx, (req: DeleteSnapshotRequest__Output) => deleteSnapshot(this.store, req.name, req.cascade)),

      MergeSnapshot: unary(ctx, async (req: MergeSnapshotRequest__Output) => {
        const started = process.hrtime.bigint();
        const r = await mergeSnapshot(this.store, req.name, req.target || req.name);
        return {
          snapshot: snapshotInfo(r.header, { name: r.name, sizeBytes: r.bytes, pagesStored: r.end.pagesStored, durationMs: elapsedMs(started) }),
          chainLength: r.chainLength,
          duration: msToDuration(elapsedMs(started)),
        };
      }),

      MigrateVm: serverStream<MigrateVmRequest__Output, MigrateVmResponse>(ctx, (call) => this.migrate(call)),
    };
  }

  /** MigrateVm: the live-migration engine (migration-service.ts) moves the VM. */
  private async migrate(call: grpc.ServerWritableStream<MigrateVmRequest__Output, MigrateVmResponse>): Promise<void> {
    checkVmName(call.request.destinationVmName, 'destination_vm_name');
    if (!this.opts.migration) throw new VcpudError('unavailable', 'this server has no migration service');
    await this.opts.migration.migrate(call, migrationDestination(call.request, this.opts.migrationTls));
  }
}

/** The error CreateSnapshot reports when writing the snapshot file fails with an errno. */
import * as grpc from '@grpc/grpc-js';
import { KvmError, VcpudError } from '../../src/errors';
import { decodeStatusDetails } from '../../src/api/status-details';
import { toServiceError } from '../../src/server/errors';
import { snapshotWriteError } from '../../src/vm/snapshot-write-error';

const errno = (code: string, syscall: string) => Object.assign(new Error(`${syscall} failed: ${code}`), { code, syscall });

describe('snapshotWriteError', () => {
  it.each(['ENOSPC', 'EDQUOT', 'EFBIG'])('%s: RESOURCE_EXHAUSTED, STORAGE_FULL, naming the snapshot, the errno and the directory', (code) => {
    const s = toServiceError(snapshotWriteError(errno(code, 'pwrite'), 'a/b.snap', '/srv/snaps/a/b.snap'));
    expect(s.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect(s.details).toMatch(
      new RegExp(
        `^snapshot "a/b.snap" could not be written to /srv/snaps/a: ${code} \\(.+\\) from pwrite; the previous snapshot under that name, if any, is unchanged$`,
      ),
    );
    expect(decodeStatusDetails(s.metadata as grpc.Metadata)?.errorInfo).toMatchObject({ reason: 'STORAGE_FULL', metadata: { errno: code } });
  });

  it('another errno (EIO) is INTERNAL with the same clear message', () => {
    const s = toServiceError(snapshotWriteError(errno('EIO', 'fsync'), 'x.snap', '/srv/snaps/x.snap'));
    expect(s.code).toBe(grpc.status.INTERNAL);
    expect(s.details).toContain('snapshot "x.snap" could not be written to /srv/snaps: EIO (i/o error) from fsync');
    expect(decodeStatusDetails(s.metadata as grpc.Metadata)?.errorInfo?.metadata.errno).toBe('EIO');
  });

  it.each(['EACCES', 'EPERM'])('%s: FAILED_PRECONDITION, SNAPSHOT_DIR_ACCESS_DENIED, naming the directory', (code) => {
    const s = toServiceError(snapshotWriteError(errno(code, 'openat'), 'a/b.snap', '/srv/snaps/a/b.snap'));
    expect(s.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(s.details).toContain(`/srv/snaps/a: ${code}`);
    expect(decodeStatusDetails(s.metadata as grpc.Metadata)?.errorInfo).toMatchObject({ reason: 'SNAPSHOT_DIR_ACCESS_DENIED', metadata: { errno: code } });
  });

  it("vcpud's own errors and errors without an errno pass through unchanged", () => {
    for (const e of [new VcpudError('unavailable', 'cancelled'), new KvmError('KVM_GET_REGS', 5, 'EIO', 'x'), new Error('plain')])
      expect(snapshotWriteError(e, 'x.snap', '/d/x.snap')).toBe(e);
  });
});

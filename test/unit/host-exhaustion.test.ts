/** Running out of descriptors or memory is RESOURCE_EXHAUSTED naming the errno, whichever layer saw it. */
import * as grpc from '@grpc/grpc-js';
import { KvmError, VcpudError } from '../../src/errors';
import { decodeStatusDetails } from '../../src/api/status-details';
import { toServiceError } from '../../src/server/errors';
import { snapshotWriteError } from '../../src/vm/snapshot-write-error';

const nodeErrno = (code: string) => Object.assign(new Error(`${code}: something, open '/srv/x'`), { code, errno: -24, syscall: 'open' });

describe('host exhaustion errnos', () => {
  it.each(['EMFILE', 'ENFILE', 'ENOMEM'])('%s from an ioctl, a Node fs call or a snapshot write: RESOURCE_EXHAUSTED, HOST_RESOURCES_EXHAUSTED', (code) => {
    for (const e of [
      new KvmError('KVM_CREATE_VM', 24, code, 'KVM_CREATE_VM failed'),
      nodeErrno(code),
      snapshotWriteError(nodeErrno(code), 'a.snap', '/srv/a.snap'),
    ]) {
      const s = toServiceError(e);
      expect(s.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
      expect(s.details).toContain(code);
      expect(decodeStatusDetails(s.metadata as grpc.Metadata)?.errorInfo).toMatchObject({ reason: 'HOST_RESOURCES_EXHAUSTED', metadata: { errno: code } });
    }
    expect(decodeStatusDetails(toServiceError(new KvmError('KVM_CREATE_VM', 24, code, 'x')).metadata as grpc.Metadata)?.errorInfo?.metadata.ioctl).toBe(
      'KVM_CREATE_VM',
    );
  });

  it('an error deliberately classified otherwise keeps its kind, and other errnos stay INTERNAL', () => {
    expect(toServiceError(new VcpudError('unavailable', 'peer gone', { errno: 'EMFILE' })).code).toBe(grpc.status.UNAVAILABLE);
    expect(toServiceError(new KvmError('KVM_RUN', 5, 'EIO', 'x')).code).toBe(grpc.status.INTERNAL);
    expect(toServiceError(nodeErrno('EIO')).code).toBe(grpc.status.INTERNAL);
  });
});

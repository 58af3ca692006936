/**
 * vcpud started on a host that gives it no KVM stays up, health NOT_SERVING, and answers UNAVAILABLE with
 * its own reason, KVM_UNAVAILABLE (not SHUTTING_DOWN), the errno, and a message saying how to grant access.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { decodeStatusDetails } from '../../src/api/status-details';
import { describeKvm } from '../support/kvm';
import { call, callError, startVcpud } from '../support/vcpud-process';

async function expectKvmUnavailable(args: string[], how: Parameters<typeof startVcpud>[3], errno: string, hint: RegExp) {
  const d = await startVcpud(args, {}, [], how);
  try {
    expect(await call<{ status: string }>(d.health(), 'Check', { service: '' })).toEqual({ status: 'NOT_SERVING' });
    for (const [service, method] of [
      ['VcpuStateService', 'GetCapabilities'],
      ['VmService', 'ListVms'],
    ] as const) {
      const err = await callError(d.client(service), method, {});
      expect(err.code).toBe(grpc.status.UNAVAILABLE);
      expect(decodeStatusDetails(err.metadata)?.errorInfo).toMatchObject({ reason: 'KVM_UNAVAILABLE', metadata: { errno } });
      expect(err.details).toMatch(hint);
    }
  } finally {
    await d.stop();
  }
}

describeKvm('vcpud without access to KVM', () => {
  it('a device it may not open (EACCES): KVM_UNAVAILABLE, and the message names the kvm group and the device mode', async () => {
    if (process.getuid?.() === 0) {
      // root opens anything: run vcpud as nobody:nogroup, outside /dev/kvm's group (mode 0660 root:kvm).
      const mode = fs.statSync('/dev/kvm').mode & 0o777;
      expect(mode & 0o006).toBe(0); // a world-accessible /dev/kvm cannot show the refusal
      const nogroup = Number(execFileSync('getent', ['group', 'nogroup']).toString().split(':')[2]);
      await expectKvmUnavailable(
        ['--kvm-path', '/dev/kvm'],
        { as: { uid: 65534, gid: nogroup } },
        'EACCES',
        /cannot open \/dev\/kvm: EACCES.*group.*kvm.*usermod -aG kvm.*mode 0660/,
      );
    } else {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-nokvm-'));
      const dev = path.join(dir, 'kvm');
      fs.writeFileSync(dev, '');
      fs.chmodSync(dev, 0);
      try {
        await expectKvmUnavailable(['--kvm-path', dev], {}, 'EACCES', /EACCES.*usermod -aG kvm.*mode 0660/);
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    }
  });

  it('no device at all (ENOENT): KVM_UNAVAILABLE, and the message says to load the module', async () => {
    await expectKvmUnavailable(['--kvm-path', '/nonexistent/kvm'], {}, 'ENOENT', /\/nonexistent\/kvm.*modprobe/);
  });
});

/**
 * A floor for GetState that counts the ioctls where they run: a trivial grpc-js handler (the empty
 * server of floors.ts) that, before answering GetState's own response bytes, makes the same 12 GET
 * ioctls on a paused vCPU of its own with one native batch call (buffers planned once, nothing
 * decoded, no lock, no metrics). The raw ioctl sum in the floor is measured in a tight C loop;
 * between gRPC calls the same ioctls cost more on a nested host (each loads the vCPU with cold
 * caches), and this handler pays that as vcpud does. It is information beside the floors,
 * not a replacement for them.
 *
 *   node dist/bench/ioctl-handler-server.js SOCKET REPLY_FILE     (prints "ready" when serving)
 *
 * A vCPU is usable only from the process that created its VM, so the handler creates its own:
 * counter64 run for 50 ms and paused, as pausedCounterVm does in vcpud.
 */
import fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { probeCapabilities } from '../src/ffi/capabilities';
import { Kvm } from '../src/ffi/kvm';
import { native } from '../src/ffi/native';
import { sregsAnsweredBySregs2 } from '../src/ffi/sregs-from-sregs2';
import { VmRegistry } from '../src/vm/registry';
import { SAVE_ORDER, readableSections } from '../src/vm/vcpu-state';
import { EMPTY_METHOD, fatal, guestBin } from './floors';

async function main(): Promise<void> {
  const [socket, replyFile] = process.argv.slice(2);
  if (!socket || !replyFile) throw new Error('usage: ioctl-handler-server SOCKET REPLY_FILE');
  const reply = fs.readFileSync(replyFile);
  const kvm = Kvm.open();
  const caps = probeCapabilities(kvm);
  const vm = new VmRegistry(kvm).create({ memoryBytes: 2 << 20, vcpuCount: 1 });
  await vm.loadProgram(fs.readFileSync(guestBin('counter64')), 0x1000);
  await vm.resumeAll();
  await new Promise((r) => setTimeout(r, 50));
  await vm.vcpu(0).pause();
  const vcpu = vm.vcpu(0).vcpu;
  const ctx = { caps, irqchip: vm.vm.hasIrqchip };
  const wanted = readableSections(ctx);
  // The ioctls vcpud's batch makes: KVM_GET_SREGS is answered from KVM_GET_SREGS2 and KVM_GET_VCPU_EVENTS.
  const all = SAVE_ORDER.filter((s) => wanted.includes(s)).map((s) => vcpu.planRead(s, caps.msrIndexList));
  const answered = sregsAnsweredBySregs2(all);
  const plans = all.filter((_, i) => i !== answered?.index);
  const ops = Uint8Array.from(plans, (p) => native.batchOps.indexOf(p.ioctl));
  const bufs = plans.map((p) => p.buf);
  const out = new Float64Array(2 * plans.length);
  const xsave = plans.some((p) => p.ioctl === 'KVM_GET_XSAVE2') ? vcpu.xsaveSize() : 0;
  const fd = vcpu.fd;
  const readAll = () => {
    const failure = native.getBatch(fd, ops, bufs, out, xsave);
    if (failure) throw failure;
  };
  readAll(); // fails here, before "ready", if this host refuses one of them

  const id = (x: Buffer) => x;
  const server = new grpc.Server();
  server.addService(
    {
      Call: {
        path: EMPTY_METHOD,
        requestStream: false,
        responseStream: false,
        requestSerialize: id,
        requestDeserialize: id,
        responseSerialize: id,
        responseDeserialize: id,
      },
    },
    {
      Call: (_call: unknown, cb: grpc.sendUnaryData<Buffer>) => {
        readAll();
        cb(null, reply);
      },
    },
  );
  server.bindAsync(`unix:${socket}`, grpc.ServerCredentials.createInsecure(), (e) => {
    if (e) fatal(e);
    console.log('ready');
  });
}

if (require.main === module) main().catch(fatal);

/** `vcpuctl load|run|pause|resume`: put a flat binary into a VM and drive its vCPUs. */
import { UsageError } from '../args';
import type { Command } from '../command';
import { VCPU_OPTION } from '../command';
import { formatVcpus, hex } from '../format';

const VCPU_SCOPE = { ...VCPU_OPTION, help: 'only this vCPU (default: every vCPU of the VM)' };

function runStateCommand(verb: 'run' | 'pause' | 'resume', summary: string): Command {
  return {
    path: [verb],
    summary,
    positionals: ['VM'],
    options: [VCPU_SCOPE],
    async run(ctx) {
      const client = ctx.client();
      const vmId = ctx.positionals[0];
      const vcpu = ctx.options.int('vcpu');
      if (vcpu === undefined) {
        const resp = await (verb === 'run' ? client.runVm(vmId) : verb === 'pause' ? client.pauseVm(vmId) : client.resumeVm(vmId));
        if (ctx.json) ctx.printJson(resp);
        else ctx.print(formatVcpus(resp.vm?.vcpus ?? []));
      } else {
        const resp = await (verb === 'run' ? client.runVcpu(vmId, vcpu) : verb === 'pause' ? client.pauseVcpu(vmId, vcpu) : client.resumeVcpu(vmId, vcpu));
        if (ctx.json) ctx.printJson(resp);
        else ctx.print(formatVcpus(resp.vcpu ? [resp.vcpu] : []));
      }
    },
  };
}

export const programCommands: Command[] = [
  {
    path: ['load'],
    summary: 'Load a flat binary and set every vCPU up to start it in real mode (LoadProgram); then `run`.',
    positionals: ['VM', 'FILE'],
    options: [
      { name: 'load-address', type: 'u64', arg: 'ADDR', help: 'guest-physical address of the image (default 0x1000)' },
      { name: 'entry', type: 'u64', arg: 'ADDR', help: 'real-mode entry point, at most 0xffff (default: the load address)' },
    ],
    async run(ctx) {
      const [vmId, file] = ctx.positionals;
      const image = ctx.readFile('FILE', file);
      if (!image.length) throw new UsageError(`FILE ${file} is empty: there is no program to load`);
      const loadAddress = ctx.options.big('load-address') ?? 0x1000n;
      const entry = ctx.options.big('entry') ?? loadAddress;
      const resp = await ctx.client().loadProgram({ vmId, image, loadAddress: loadAddress.toString(), entry: entry.toString() });
      if (ctx.json) ctx.printJson(resp);
      else ctx.print(`loaded ${image.length} bytes into ${vmId} at ${hex(loadAddress)}, entry ${hex(entry)}`);
    },
  },
  runStateCommand('run', 'Start the vCPUs (RunVm) or one vCPU (RunVcpu) from any state but RUNNING.'),
  runStateCommand('pause', 'Take RUNNING vCPUs out of KVM_RUN (PauseVm / PauseVcpu).'),
  runStateCommand('resume', 'Resume PAUSED vCPUs (ResumeVm / ResumeVcpu).'),
];

/** `vcpuctl vm create|list|get|delete`: VM lifecycle (VmService). */
import type { Vm__Output } from '../../../api/generated/vcpud/v1/Vm';
import { UsageError } from '../args';
import type { Command } from '../command';
import { formatVm, formatVmList } from '../format';

export const vmCommands: Command[] = [
  {
    path: ['vm', 'create'],
    summary: 'Create a VM with guest memory at GPA 0 and its vCPUs (all CREATED; nothing runs yet).',
    positionals: [],
    options: [
      { name: 'memory', type: 'size', arg: 'SIZE', required: true, help: 'guest memory, a multiple of 4 KiB, e.g. 64Mi' },
      { name: 'vcpus', type: 'int', arg: 'N', help: 'number of vCPUs (default 1)' },
      { name: 'name', type: 'string', arg: 'NAME', help: 'a label for humans' },
      { name: 'expose-nested', type: 'bool', help: 'keep VMX/SVM in the guest CPUID (needs host nested support)' },
      { name: 'no-irqchip', type: 'bool', help: 'no in-kernel irqchip: no LAPIC section, HLT exits to the server' },
    ],
    async run(ctx) {
      const o = ctx.options;
      const vcpus = o.int('vcpus') ?? 1;
      if (vcpus < 1) throw new UsageError('--vcpus must be at least 1', 'vm create');
      const resp = await ctx.client().createVm({
        name: o.string('name') ?? '',
        memoryBytes: (o.big('memory') as bigint).toString(),
        vcpuCount: vcpus,
        cpuidPolicy: { exposeNested: o.bool('expose-nested') },
        noIrqchip: o.bool('no-irqchip'),
      });
      if (ctx.json) ctx.printJson(resp);
      else if (resp.vm) ctx.print(formatVm(resp.vm));
    },
  },
  {
    path: ['vm', 'list'],
    summary: 'List the VMs in creation order (every page).',
    positionals: [],
    options: [{ name: 'page-size', type: 'int', arg: 'N', help: 'VMs per ListVms call (default: the server default, 50)' }],
    async run(ctx) {
      const client = ctx.client();
      const vms: Vm__Output[] = [];
      let pageToken = '';
      do {
        const page = await client.listVms({ pageSize: ctx.options.int('page-size') ?? 0, pageToken });
        vms.push(...page.vms);
        pageToken = page.nextPageToken;
      } while (pageToken);
      if (ctx.json) ctx.printJson({ vms });
      else ctx.print(formatVmList(vms));
    },
  },
  {
    path: ['vm', 'get'],
    summary: 'Show one VM and the run state of its vCPUs.',
    positionals: ['VM'],
    options: [],
    async run(ctx) {
      const resp = await ctx.client().getVm(ctx.positionals[0]);
      if (ctx.json) ctx.printJson(resp);
      else if (resp.vm) ctx.print(formatVm(resp.vm));
    },
  },
  {
    path: ['vm', 'delete'],
    summary: 'Stop every vCPU of a VM and free it.',
    positionals: ['VM'],
    options: [],
    async run(ctx) {
      const resp = await ctx.client().deleteVm(ctx.positionals[0]);
      if (ctx.json) ctx.printJson(resp);
      else ctx.print(`deleted ${ctx.positionals[0]}`);
    },
  },
];
